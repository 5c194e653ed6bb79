"""The usage log: one JSON line per /v1 request, upstream tokens, keys only fingerprinted."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as redis
from conftest import API_KEY, AUTH, LogSink, MakeProxy, Proxy, RedisServer
from fake_openai import FakeOpenAI, Fault

from proxy import tokens
from proxy.answers import UsageRecorder, UsageStripper
from proxy.app import part
from proxy.config import ConfigError, load_settings
from proxy.keys import bearer_token, fingerprint
from proxy.usage import UsageLog

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "count me"}]}


def test_fingerprint_is_12_hex_of_sha256() -> None:
    assert fingerprint(API_KEY) == hashlib.sha256(API_KEY.encode()).hexdigest()[:12]
    assert bearer_token(f"Bearer {API_KEY}") == API_KEY.encode()
    assert bearer_token(f"bearer   {API_KEY}") == API_KEY.encode()
    assert bearer_token(None) is None
    assert bearer_token("Bearer ") is None


async def test_one_line_per_request_with_the_documented_fields(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH) as r:
            answer = await r.json()
        async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:
            await r.read()
        async with s.get(proxy.url + "/healthz") as r:  # not a /v1 request: no line
            await r.read()
    chat, models = await proxy.usage.wait(2)
    assert len(proxy.usage.records()) == 2
    assert chat["key"] == fingerprint(API_KEY)
    assert chat["endpoint"] == "/v1/chat/completions"
    assert chat["model"] == "gpt-4o-mini"
    assert chat["stream"] is False
    assert chat["status"] == 200
    assert chat["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert chat["completion_tokens"] == answer["usage"]["completion_tokens"]
    assert chat["total_tokens"] == answer["usage"]["total_tokens"]
    assert chat["cached_tokens"] == 0
    assert chat["tokens_source"] == "upstream"
    assert chat["latency_ms"] > 0
    assert chat["ts"].endswith("Z")
    assert len(chat["request_id"]) == 32
    assert chat["request_id"] != models["request_id"]
    assert models["endpoint"] == "/v1/models"
    assert models["model"] is None
    assert models["total_tokens"] is None


async def test_raw_key_never_logged(proxy: Proxy, fake: FakeOpenAI, app_logs: LogSink) -> None:
    fake.fail_next(Fault(status=500), Fault(reset=True))
    async with aiohttp.ClientSession() as s:
        no_retry = {**AUTH, "x-thriftgate-max-retries": "0"}
        for body in (CHAT, CHAT, CHAT):
            async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=no_retry) as r:
                await r.read()
        async with s.post(proxy.url + "/v1/embeddings", data=b"{", headers=AUTH) as r:
            await r.read()
    await proxy.usage.wait(4)
    assert API_KEY.encode() not in proxy.usage.getvalue()
    assert API_KEY.encode() not in app_logs.getvalue()
    statuses = [r["status"] for r in proxy.usage.records()]
    assert statuses == [500, 502, 200, 400]


async def test_stream_usage_from_include_usage_chunk_even_gzipped(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.compress_streams = True
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        usage = [c.usage async for c in stream if c.usage is not None][-1]
    record = (await proxy.usage.wait(1))[-1]
    assert record["stream"] is True
    assert record["total_tokens"] == usage.total_tokens
    assert record["ttft_ms"] is not None


async def test_stream_without_usage_is_counted_and_marked_estimated(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    record = (await proxy.usage.wait(1))[-1]
    completion = len(tokens.encoding("o200k_base").encode(text))
    assert record["tokens_source"] == "estimated"
    assert record["prompt_tokens"] == record["prompt_tokens_estimate"]
    assert record["completion_tokens"] == completion
    assert record["total_tokens"] == record["prompt_tokens"] + completion
    assert record["cost_usd"] is not None
    assert record["error"] is None


async def test_stream_with_include_usage_is_exact(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        stream = await client.chat.completions.create(
            **CHAT, stream=True, stream_options={"include_usage": True}
        )
        last = [c async for c in stream][-1]
    record = (await proxy.usage.wait(1))[-1]
    assert record["tokens_source"] == "upstream"
    assert record["total_tokens"] == last.usage.total_tokens


def test_streamed_text_covers_content_tool_arguments_and_legacy_text() -> None:
    rec = UsageRecorder("text/event-stream", None, collect_text=True)
    events = [
        {"choices": [{"delta": {"content": "Hel"}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}]},
        {"choices": [{"text": "lo"}]},
    ]
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    for i in range(0, len(body), 7):  # events split across chunks anywhere
        rec.feed(body[i : i + 7])
    assert rec.streamed_text() == "Helf{}lo"


def test_recorder_handles_responses_api_and_garbage() -> None:
    rec = UsageRecorder("application/json", None)
    rec.feed(b'{"object":"response","usage":{"input_tokens":7,')
    rec.feed(b'"output_tokens":3,"total_tokens":10}}')
    assert rec.usage() == {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10}
    broken = UsageRecorder("application/json", "gzip")
    broken.feed(b"not gzip at all")
    assert broken.usage() is None
    unknown = UsageRecorder("application/json", "br")
    unknown.feed(b"\x00\x01")
    assert unknown.usage() is None
    sse = UsageRecorder("text/event-stream; charset=utf-8", None)
    sse.feed(b'event: response.completed\ndata: {"type":"response.completed","response":')
    sse.feed(b'{"usage":{"input_tokens":1,"output_tokens":2}}}\n\n')
    assert sse.usage() == {"input_tokens": 1, "output_tokens": 2}


def test_usage_lines_are_written_in_pipe_atomic_chunks() -> None:
    from proxy.usage import PIPE_BUF, _atomic_chunks

    lines = [b"x" * 1000 + b"\n" for _ in range(10)] + [b"y" * 5000 + b"\n", b"z\n"]
    chunks = _atomic_chunks(lines)
    assert b"".join(chunks) == b"".join(lines)
    assert all(len(c) <= PIPE_BUF or c.count(b"\n") == 1 for c in chunks)
    assert all(c.endswith(b"\n") for c in chunks)
    assert len(chunks) == 5  # 4+4+2 lines of 1001 bytes, the long line alone, then "z"


async def test_usage_records_also_go_to_a_redis_stream(
    make_proxy: MakeProxy, redis_url: str, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(
        env={"REDIS_URL": redis_url, "THRIFTGATE_USAGE_REDIS_STREAM": "thriftgate:usage"}
    )
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        for i in range(3):
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": f"stream me {i}"}]
            )
    written = await proxy.usage.wait(3)
    usage_log = part(proxy.app, UsageLog)
    await usage_log.drain()
    client = redis.Redis.from_url(redis_url)
    try:
        entries = await client.xrange("thriftgate:usage")
    finally:
        await client.aclose()
    streamed = [orjson.loads(fields[b"r"]) for _, fields in entries]
    assert streamed == written  # the same records, in order
    redis_server.kill()
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Redis is gone"}]
        )
    await proxy.usage.wait(4)  # the file/stdout log still gets every line
    await usage_log.drain()
    assert usage_log.stream_dropped == 1  # counted, not retried forever


def test_redis_stream_needs_redis() -> None:
    with pytest.raises(ConfigError, match="needs a Redis URL"):
        load_settings(env={"THRIFTGATE_USAGE_REDIS_STREAM": "thriftgate:usage"})


def test_usage_stripper_takes_out_what_include_usage_added() -> None:
    plain = [
        b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
        b'data: {"id":"c1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    forced = [
        plain[0].replace(b"]}\n", b'],"usage":null}\n'),
        plain[1].replace(b"]}\n", b'],"usage":null}\n'),
        b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,'
        b'"total_tokens":4}}\n\n',
        plain[2],
    ]
    body = b"".join(forced)
    for size in (1, 5, 64, len(body)):  # however the upstream's chunks fall
        stripper = UsageStripper()
        out = b"".join(stripper.feed(body[i : i + size]) for i in range(0, len(body), size))
        out += stripper.end()
        assert out == b"".join(plain)
        assert stripper.usage == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}


async def test_force_stream_usage_is_exact_and_invisible(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    plain = await make_proxy(env={"THRIFTGATE_CACHE": "0"})
    forced = await make_proxy(env={"THRIFTGATE_FORCE_STREAM_USAGE": "1", "THRIFTGATE_CACHE": "0"})
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "count me exactly"}],
        "stream": True,
    }

    async def raw_stream(proxy: Proxy) -> bytes:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                proxy.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {API_KEY}"},
            ) as r,
        ):
            return await r.read()

    def normalised(stream: bytes) -> list[Any]:  # ids and timestamps differ between calls
        events = []
        for line in stream.split(b"\n\n"):
            if line.startswith(b"data: {"):
                event = orjson.loads(line[6:])
                event.pop("id"), event.pop("created")
                events.append(event)
            elif line:
                events.append(line)
        return events

    got_plain = await raw_stream(plain)
    got_forced = await raw_stream(forced)
    assert normalised(got_forced) == normalised(got_plain)  # the client sees no difference
    assert b'"usage"' not in got_forced
    upstream_body = orjson.loads(fake.requests[-1].body)
    assert upstream_body["stream_options"] == {"include_usage": True}  # what was sent upstream
    record = (await forced.usage.wait(1))[-1]
    assert record["tokens_source"] == "upstream"
    assert record["total_tokens"] == fake_usage_total(upstream_body)
    assert (await plain.usage.wait(1))[-1]["tokens_source"] == "estimated"


def fake_usage_total(body: dict[str, Any]) -> int:
    """What the fake upstream reports for a chat body (its own, simple rule)."""
    from fake_openai import answer_for

    prompt = max(1, len(orjson.dumps(body["messages"])) // 4)
    return prompt + len(answer_for(body["messages"]).split(" "))


async def test_responses_api_usage_and_cost(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        answer = await client.responses.create(model="gpt-4o", input="what does this cost?")
    record = (await proxy.usage.wait(1))[-1]
    assert record["endpoint"] == "/v1/responses"
    assert record["model"] == "gpt-4o"  # as asked for (chat's rule too)
    assert record["prompt_tokens"] == answer.usage.input_tokens
    assert record["completion_tokens"] == answer.usage.output_tokens
    expected = (answer.usage.input_tokens * 2.5 + answer.usage.output_tokens * 10) / 1e6
    assert record["cost_usd"] == pytest.approx(expected)


async def test_the_raw_key_never_reaches_any_log(
    make_proxy: MakeProxy, fake: FakeOpenAI, app_logs: LogSink, redis_url: str
) -> None:
    proxy = await make_proxy(
        env={"REDIS_URL": redis_url, "THRIFTGATE_TOKENS_PER_DAY": "20", "THRIFTGATE_RPM": "3"}
    )
    before = len(app_logs.getvalue())
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0) as c:
        await c.embeddings.create(model="text-embedding-3-small", input="a")  # fits the budget
        for _ in range(3):  # then the budget, and the rate limit, refuse
            with pytest.raises(openai.APIStatusError):
                await c.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
    fake.fail_next(Fault(status=500))
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.url + "/v1/models", headers={**AUTH, "x-thriftgate-max-retries": "0"}) as r,
    ):
        assert r.status == 500
    records = await proxy.usage.wait(5)
    assert {r["key"] for r in records} == {fingerprint(API_KEY)}
    everything = proxy.usage.getvalue() + app_logs.getvalue()[before:]
    assert API_KEY.encode() not in everything
    assert API_KEY[3:].encode() not in everything  # not even without its prefix
