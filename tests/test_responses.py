"""The Responses API as a first-class endpoint: cached (JSON and event streams), counted before
the call, guarded, budgeted, rate-limited and priced like chat, driven by the official SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import API_KEY, AUTH, MakeProxy, Proxy, post
from fake_openai import FakeOpenAI, Fault
from test_accounting import tokens_spent

from proxy.tokens import count_request

RESPONSES = "/v1/responses"


def sync_client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


def async_client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


# -- counting, offline -----------------------------------------------------------------------


def test_instructions_and_a_string_input_count_as_a_system_and_a_user_message() -> None:
    chat = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief and exact."},
            {"role": "user", "content": "How many moons has Mars?"},
        ],
    }
    responses = {
        "model": "gpt-4o",
        "instructions": "Be brief and exact.",
        "input": "How many moons has Mars?",
    }
    items = {
        "model": "gpt-4o",
        "instructions": "Be brief and exact.",
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "How many moons has Mars?"}],
            }
        ],
    }
    expected = count_request("/v1/chat/completions", chat).tokens
    assert count_request(RESPONSES, responses).tokens == expected
    assert count_request(RESPONSES, items).tokens == expected
    assert count_request(RESPONSES, responses).source == "exact"


def test_tools_function_calls_and_outputs_are_counted() -> None:
    base: dict[str, Any] = {"model": "gpt-4o", "input": [{"role": "user", "content": "weather?"}]}
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    plain = count_request(RESPONSES, base).tokens
    with_tool = count_request(RESPONSES, {**base, "tools": [tool]}).tokens
    chat_tool = count_request(
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [], "tools": [{"type": "function", "function": tool}]},
    ).tokens
    assert with_tool - plain == chat_tool - 3  # the same tool definition costs the same
    call = {
        "type": "function_call",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city":"Paris"}',
    }
    output = {"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}
    longer = {**base, "input": [*base["input"], call, output]}
    assert count_request(RESPONSES, longer).tokens > plain + 10
    assert not count_request(RESPONSES, longer).approximate


def test_images_files_and_earlier_state_are_not_exact() -> None:
    image = {
        "model": "gpt-4o",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": "https://x/y.png", "detail": "low"},
                ],
            }
        ],
    }
    counted = count_request(RESPONSES, image)
    text_only = count_request(
        RESPONSES, {"model": "gpt-4o", "input": [{"role": "user", "content": "what is this?"}]}
    )
    assert counted.tokens == text_only.tokens + 85  # a low-detail image is 85 tokens
    assert counted.parts_estimated and counted.source == "approximate"
    on_state = count_request(
        RESPONSES, {"model": "gpt-4o", "input": "and then?", "previous_response_id": "resp_1"}
    )
    assert on_state.partial and on_state.source == "partial"
    ref = count_request(
        RESPONSES, {"model": "gpt-4o", "input": [{"type": "item_reference", "id": "msg_1"}]}
    )
    assert ref.source == "partial"


# -- the SDK through the proxy -----------------------------------------------------------------


async def test_sync_create_is_counted_priced_and_cached(proxy: Proxy, fake: FakeOpenAI) -> None:
    def call() -> tuple[Any, Any]:
        with sync_client(proxy) as client:
            raw = client.responses.with_raw_response.create(
                model="gpt-4o", instructions="Be brief.", input="hello responses"
            )
            again = client.responses.create(
                model="gpt-4o", instructions="Be brief.", input="hello responses"
            )
            return raw, again

    raw, again = await asyncio.to_thread(call)
    first = raw.parse()
    assert first.output_text == "You said: hello responses"
    assert raw.headers["x-thriftgate-cache"] == "MISS"
    counted = count_request(
        RESPONSES, {"model": "gpt-4o", "instructions": "Be brief.", "input": "hello responses"}
    )
    assert raw.headers["x-thriftgate-prompt-tokens"] == str(counted.tokens)
    assert raw.headers["x-thriftgate-prompt-tokens-source"] == "exact"
    assert again.id == first.id and again.output_text == first.output_text  # a replay
    assert fake.calls(RESPONSES) == 1
    miss, hit = await proxy.usage.wait(2)
    assert miss["cache"] == "miss" and hit["cache"] == "hit"
    assert miss["prompt_tokens"] == first.usage.input_tokens
    assert miss["completion_tokens"] == first.usage.output_tokens
    assert miss["cached_tokens"] == 0 and miss["reasoning_tokens"] == 0
    assert miss["prompt_tokens_estimate"] == counted.tokens
    assert miss["prompt_tokens_estimate_source"] == "exact"
    cost = (first.usage.input_tokens * 2.5 + first.usage.output_tokens * 10) / 1e6
    assert miss["cost_usd"] == pytest.approx(cost)
    assert hit["cost_usd"] == 0 and hit["saved_usd"] == pytest.approx(cost)


async def test_a_stream_is_replayed_event_for_event(proxy: Proxy, fake: FakeOpenAI) -> None:
    async def run() -> tuple[list[Any], Any]:
        async with (
            async_client(proxy) as client,
            client.responses.stream(model="gpt-4o", input="stream me please") as s,
        ):
            events = [e async for e in s]
            final = await s.get_final_response()
        return events, final

    events, final = await run()
    replayed, final_again = await run()
    assert fake.calls(RESPONSES) == 1
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert [e.model_dump(warnings=False) for e in replayed] == [
        e.model_dump(warnings=False) for e in events
    ]
    assert final_again.id == final.id and final_again.output_text == "You said: stream me please"
    miss, hit = await proxy.usage.wait(2)
    assert miss["stream"] and miss["cache"] == "miss" and hit["cache"] == "hit"
    assert miss["total_tokens"] == final.usage.total_tokens  # from response.completed
    assert miss["tokens_source"] == "upstream" and miss["ttft_ms"] is not None


async def test_create_stream_true_through_the_async_sdk(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        stream = await client.responses.create(model="gpt-4o-mini", input="one two", stream=True)
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "You said: one two"


async def test_a_cut_stream_is_not_cached_and_is_charged_what_it_delivered(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    fake.fail_next(Fault(cut_after=7))
    body = {"model": "gpt-4o", "input": "a b c d e f g h", "stream": True}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + RESPONSES, json=body, headers=AUTH) as r,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    record = (await proxy.usage.wait(1))[-1]
    assert record["error"] == "upstream_disconnected"
    assert record["tokens_source"] == "estimated" and record["completion_tokens"] > 0
    assert tokens_spent(proxy) == record["total_tokens"]
    status, headers, _ = await post(proxy, body, RESPONSES)
    assert status == 200 and headers["x-thriftgate-cache"] == "MISS"  # the cut one was not kept


@pytest.mark.parametrize(
    "extra",
    [{"background": True}, {"conversation": "conv_123"}],
    ids=["background", "conversation"],
)
async def test_stateful_requests_are_never_cached(
    proxy: Proxy, fake: FakeOpenAI, extra: dict[str, Any]
) -> None:
    body = {"model": "gpt-4o", "input": "remember this", **extra}
    for _ in range(2):
        status, headers, _ = await post(proxy, body, RESPONSES)
        assert status == 200 and headers["x-thriftgate-cache"] == "BYPASS"
    assert fake.calls(RESPONSES) == 2


async def test_a_request_on_a_previous_response_is_partial_and_settled_from_the_answer(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    async with async_client(proxy) as client:
        first = await client.responses.create(model="gpt-4o", input="my name is Ada")
        raw = await client.responses.with_raw_response.create(
            model="gpt-4o", input="what is my name?", previous_response_id=first.id
        )
        second = raw.parse()
    assert raw.headers["x-thriftgate-prompt-tokens-source"] == "partial"
    counted = int(raw.headers["x-thriftgate-prompt-tokens"])
    assert second.usage.input_tokens > counted  # the stored conversation was not counted
    _, record = await proxy.usage.wait(2)
    assert record["prompt_tokens_estimate_source"] == "partial"
    assert record["tokens_source"] == "upstream"
    assert tokens_spent(proxy) == first.usage.total_tokens + second.usage.total_tokens


async def test_the_context_guard_uses_max_output_tokens(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = {"model": "gpt-4o", "input": "hello", "max_output_tokens": 200_000}
    status, _, raw = await post(proxy, body, RESPONSES)
    assert status == 400
    error = raw["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input"
    assert fake.calls(RESPONSES) == 0


async def test_a_rate_limit_counts_responses_and_settles_their_usage(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "1"})
    assert (await post(proxy, {"model": "gpt-4o", "input": "one"}, RESPONSES))[0] == 200
    status, headers, raw = await post(proxy, {"model": "gpt-4o", "input": "two"}, RESPONSES)
    assert status == 429 and raw["error"]["code"] == "rate_limit_exceeded"
    assert "retry-after" in headers
    assert fake.calls(RESPONSES) == 1


async def test_a_streamed_response_settles_the_budget_from_response_completed(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    async with (
        async_client(proxy) as client,
        client.responses.stream(model="gpt-4o", input="count me") as s,
    ):
        final = await s.get_final_response()
    await proxy.usage.wait(1)
    assert tokens_spent(proxy) == final.usage.total_tokens


async def test_unreadable_input_is_refused_for_a_budgeted_key_and_forwarded_otherwise(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    body = {"model": "gpt-4o", "input": 5}
    plain = await make_proxy()
    status, _, raw = await post(plain, body, RESPONSES)
    assert status == 400 and raw["error"]["param"] == "input"  # the upstream's
    assert fake.calls(RESPONSES) == 1
    budgeted = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "1000"})
    status, _, raw = await post(budgeted, body, RESPONSES)
    error = raw["error"]
    assert status == 400 and error["code"] == "invalid_request_shape" and error["param"] == "input"
    assert fake.calls(RESPONSES) == 1


# -- optimisations -------------------------------------------------------------------------------


async def test_dynamic_output_limit_sets_max_output_tokens(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_DYNAMIC_MAX_TOKENS": "true"})
    assert (await post(proxy, {"model": "gpt-4o", "input": "hi"}, RESPONSES))[0] == 200
    sent = orjson.loads(fake.requests[-1].body)
    assert sent["max_output_tokens"] > 0 and "max_tokens" not in sent


async def test_trimming_keeps_function_calls_with_their_outputs(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    items: list[dict[str, Any]] = [{"role": "developer", "content": "You are terse."}]
    for i in range(6):
        items.append({"role": "user", "content": f"question {i} " + "padding " * 40})
        items.append({"role": "assistant", "content": f"answer {i}"})
    items += [
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "found"},
        {"role": "user", "content": "and so?"},
    ]
    body = {"model": "gpt-4o", "input": items}
    status, _, _ = await post(proxy, body, RESPONSES, headers={"x-thriftgate-trim": "last-2"})
    assert status == 200
    sent = orjson.loads(fake.requests[-1].body)["input"]
    assert sent[0] == items[0]  # the developer message stays
    # the window of 2 would start on the function call's output: it moves back to the message
    # before the call, so the call and its output stay together
    assert sent[1:] == items[-4:]
    record = (await proxy.usage.wait(1))[-1]
    assert record["optimized"]["messages_dropped"] == len(items) - len(sent)


# -- the counting endpoint -----------------------------------------------------------------------


async def test_input_tokens_is_forwarded_and_free_for_a_spent_budget(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "1"})
    status, _, _ = await post(proxy, {"model": "gpt-4o", "input": "x"}, RESPONSES)
    assert status == 429  # nothing fits in this budget...
    async with async_client(proxy) as client:
        counted = await client.responses.input_tokens.count(model="gpt-4o", input="hello there")
    assert counted.input_tokens > 0  # ...but counting is free, and OpenAI's own answer
    assert fake.calls("/v1/responses/input_tokens") == 1
    assert fake.calls(RESPONSES) == 0


def test_the_responses_usage_shape_is_priced_with_its_cached_and_reasoning_tokens() -> None:
    from proxy.outcome import token_fields
    from proxy.pricing import PriceTable

    usage = {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 400, "cache_write_tokens": 0},
        "output_tokens": 100,
        "output_tokens_details": {"reasoning_tokens": 60},
        "total_tokens": 1100,
    }
    fields = token_fields(usage)
    assert fields == {
        "prompt_tokens": 1000,
        "cached_tokens": 400,
        "completion_tokens": 100,
        "reasoning_tokens": 60,
        "total_tokens": 1100,
    }
    # gpt-4o: $2.50 input, $1.25 cached input, $10 output (reasoning tokens are output)
    expected = (600 * 2.5 + 400 * 1.25 + 100 * 10) / 1e6
    assert PriceTable().cost("gpt-4o", fields) == pytest.approx(expected)
