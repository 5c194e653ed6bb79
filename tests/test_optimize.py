"""Opt-in optimisations: history trimming and dynamic max_tokens, in isolation and end to end."""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
import pytest
from conftest import NO_STORE, MakeProxy, Proxy
from conftest import post as post_to
from fake_openai import FakeOpenAI
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import tokens
from proxy.config import ModelInfo, OptimizeSettings
from proxy.errors import InvalidRequest
from proxy.inbound import read_headers
from proxy.optimize import dynamic_max_tokens, keep_for, output_field, trim_history


def msg(role: str, text: str = "", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": text or f"{role} says something", **extra}


def conversation(turns: int) -> list[dict[str, Any]]:
    out = [msg("system", "be brief")]
    for i in range(turns):
        out += [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]
    return out


def test_trim_keeps_system_messages_and_the_last_n() -> None:
    messages = conversation(10)  # 1 system + 20 others
    kept = trim_history(messages, 4)
    assert kept == [messages[0], *messages[-4:]]
    assert trim_history(messages, 20) is messages  # nothing to drop
    dev = [msg("developer", "rules"), *conversation(3)[1:], msg("system", "late system note")]
    assert trim_history(dev, 2) == [dev[0], dev[-3], dev[-2], dev[-1]]


def test_trim_never_separates_tool_calls_from_their_results() -> None:
    call = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
        ],
    }
    results = [msg("tool", "r1", tool_call_id="c1"), msg("tool", "r2", tool_call_id="c2")]
    messages = [*conversation(3), call, *results, msg("assistant", "done")]
    # the last 2 would start at a tool result: the cut moves back to the assistant's call
    kept = trim_history(messages, 2)
    assert kept == [messages[0], call, *results, messages[-1]]
    kept = trim_history(messages, 3)
    assert kept == [messages[0], call, *results, messages[-1]]
    kept = trim_history(messages, 5)
    assert kept == [messages[0], messages[-5], call, *results, messages[-1]]
    only_results = [msg("user", "x"), call, *results]
    assert trim_history([call, *results], 1) == [call, *results]  # nothing it can cut safely
    assert trim_history(only_results, 2) == [call, *results]


def test_trim_header_and_config() -> None:
    off = OptimizeSettings()
    on = OptimizeSettings(trim=True, trim_keep=6)

    def keep(header: str | None, settings: OptimizeSettings) -> int | None:
        given = CIMultiDictProxy(
            CIMultiDict({} if header is None else {"X-Thriftgate-Trim": header})
        )
        return keep_for(read_headers(given), settings)

    assert keep(None, off) is None
    assert keep(None, on) == 6
    assert keep("last-10", off) == 10
    assert keep("LAST-3", on) == 3
    assert keep("off", on) is None
    for bad in ("last", "last-0", "first-10", "10", "last-x", "last-²"):
        with pytest.raises(InvalidRequest) as info:
            keep(bad, off)
        assert info.value.param == "x-thriftgate-trim"


def test_output_field_per_model() -> None:
    for model in ("o1", "o3-mini", "o4-mini-2025-04-16", "gpt-5", "gpt-5-mini", "gpt-5.4"):
        assert output_field(model) == "max_completion_tokens", model
    for model in ("gpt-4o", "gpt-4.1-nano", "gpt-3.5-turbo", "chatgpt-4o-latest"):
        assert output_field(model) == "max_tokens", model


def test_dynamic_max_tokens_arithmetic() -> None:
    info = ModelInfo("gpt-4", 8192, 8192)
    assert dynamic_max_tokens({"model": "gpt-4"}, 100, info, 4096) == ("max_tokens", 4096)
    assert dynamic_max_tokens({"model": "gpt-4"}, 6000, info, 4096) == ("max_tokens", 2192)
    assert dynamic_max_tokens({"model": "gpt-4"}, 8192, info, 4096) is None
    small = ModelInfo("gpt-4o", 128000, 1000)
    assert dynamic_max_tokens({"model": "gpt-4o"}, 10, small, 4096) == ("max_tokens", 1000)
    assert dynamic_max_tokens({"model": "gpt-4", "max_tokens": 5}, 10, info, 4096) is None
    assert dynamic_max_tokens({"model": "x"}, 10, None, 4096) is None


def sent_body(fake: FakeOpenAI) -> dict[str, Any]:
    return orjson.loads(fake.requests[-1].body)


post = partial(post_to, headers=NO_STORE)  # past the cache


async def test_trim_header_trims_what_goes_upstream(proxy: Proxy, fake: FakeOpenAI) -> None:
    messages = conversation(10)
    body = {"model": "gpt-4o", "messages": messages}
    status, headers, _ = await post(
        proxy, body, headers={**NO_STORE, "x-thriftgate-trim": "last-4"}
    )
    assert status == 200
    upstream = fake.requests[-1]
    assert "x-thriftgate-trim" not in upstream.headers
    assert sent_body(fake)["messages"] == [messages[0], *messages[-4:]]
    after = tokens.count_request("/v1/chat/completions", sent_body(fake)).tokens
    before = tokens.count_request("/v1/chat/completions", body).tokens
    assert headers["x-thriftgate-prompt-tokens"] == str(after)
    record = (await proxy.usage.wait(1))[-1]
    assert record["optimized"] == {
        "trim": "last-4",
        "messages_dropped": 16,
        "tokens_saved": before - after,
    }
    status, _, payload = await post(
        proxy, body, headers={**NO_STORE, "x-thriftgate-trim": "everything"}
    )
    assert status == 400 and payload["error"]["code"] == "invalid_header"
    assert len(fake.requests) == 1


async def test_trim_from_config_only_above_the_threshold(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        env={"THRIFTGATE_TRIM": "true", "THRIFTGATE_CONFIG": ""},
    )
    short = {"model": "gpt-4o", "messages": conversation(8)}
    assert (await post(proxy, short))[0] == 200
    assert len(sent_body(fake)["messages"]) == 1 + 10  # trim_keep defaults to 10
    fake.requests.clear()
    assert (await post(proxy, short, headers={**NO_STORE, "x-thriftgate-trim": "off"}))[0] == 200
    assert sent_body(fake)["messages"] == short["messages"]


async def test_trim_threshold(make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Any) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("[optimize]\ntrim = true\ntrim_keep = 2\ntrim_threshold_tokens = 200\n")
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    small = {"model": "gpt-4o", "messages": conversation(5)}  # well under 200 tokens
    assert (await post(proxy, small))[0] == 200
    assert sent_body(fake)["messages"] == small["messages"]
    assert "optimized" not in (await proxy.usage.wait(1))[-1]
    large = {"model": "gpt-4o", "messages": conversation(40)}
    assert (await post(proxy, large))[0] == 200
    assert len(sent_body(fake)["messages"]) == 3


async def test_dynamic_max_tokens_uses_the_models_field(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_DYNAMIC_MAX_TOKENS": "1"})
    messages = [msg("user", "hello")]
    cases = [
        ("gpt-4o-2024-08-06", "max_tokens", 4096),
        ("gpt-4", "max_tokens", 4096),
        ("o3-mini", "max_completion_tokens", 4096),
        ("gpt-5-mini", "max_completion_tokens", 4096),
    ]
    for model, field, value in cases:
        assert (await post(proxy, {"model": model, "messages": messages}))[0] == 200
        sent = sent_body(fake)
        assert sent[field] == value, model
        other = "max_tokens" if field == "max_completion_tokens" else "max_completion_tokens"
        assert other not in sent
    near_full = {"model": "gpt-4", "messages": [msg("user", "hi " * 7000)]}
    assert (await post(proxy, near_full))[0] == 200
    prompt = tokens.count_request("/v1/chat/completions", near_full).tokens
    assert sent_body(fake)["max_tokens"] == 8192 - prompt
    explicit = {"model": "gpt-4o", "messages": messages, "max_tokens": 7}
    assert (await post(proxy, explicit))[0] == 200
    assert fake.requests[-1].body == orjson.dumps(explicit)  # untouched, byte for byte
    unknown = {"model": "my-local-model", "messages": messages}
    assert (await post(proxy, unknown))[0] == 200
    assert "max_tokens" not in sent_body(fake)
    records = await proxy.usage.wait(7)
    assert records[0]["optimized"] == {"max_tokens_field": "max_tokens", "max_tokens": 4096}
    assert "optimized" not in records[5]


async def test_off_by_default_and_bytes_untouched(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = {"model": "gpt-4o", "messages": conversation(12)}
    assert (await post(proxy, body))[0] == 200
    assert fake.requests[-1].body == orjson.dumps(body)
