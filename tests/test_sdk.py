"""The official openai SDK, sync and async, pointed at the proxy with base_url and nothing else."""

from __future__ import annotations

import asyncio
import struct

import openai
import pytest
from conftest import API_KEY, MakeProxy, Proxy
from fake_openai import FakeOpenAI, Fault, vector

MESSAGES = [{"role": "user", "content": "hello proxy"}]


def sync_client(proxy: Proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


def async_client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


async def test_sync_chat(proxy: Proxy, fake: FakeOpenAI) -> None:
    def call() -> openai.types.chat.ChatCompletion:
        with sync_client(proxy) as client:
            return client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    completion = await asyncio.to_thread(call)
    assert completion.choices[0].message.content == "You said: hello proxy"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    record = (await proxy.usage.wait(1))[-1]
    assert record["model"] == "gpt-4o-mini"
    assert record["total_tokens"] == completion.usage.total_tokens
    assert record["upstream_request_id"] == fake.sent[-1].headers["x-request-id"]


async def test_sync_streaming_chat(proxy: Proxy) -> None:
    def call() -> list[str]:
        with sync_client(proxy) as client:
            stream = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            return [c.choices[0].delta.content or "" for c in stream if c.choices]

    parts = await asyncio.to_thread(call)
    assert "".join(parts) == "You said: hello proxy"


async def test_async_chat_and_raw_response_headers(proxy: Proxy, fake: FakeOpenAI) -> None:
    async with async_client(proxy) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES
        )
        completion = raw.parse()
    assert completion.choices[0].finish_reason == "stop"
    assert raw.headers["x-request-id"] == fake.sent[-1].headers["x-request-id"]
    assert raw.headers["x-ratelimit-remaining-tokens"] == "29999950"


async def test_async_streaming_with_usage(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
    assert text == "You said: hello proxy"
    assert usage is not None
    record = (await proxy.usage.wait(1))[-1]
    assert record["stream"] is True
    assert record["completion_tokens"] == usage.completion_tokens
    assert record["prompt_tokens"] == usage.prompt_tokens
    assert record["ttft_ms"] is not None and record["ttft_ms"] <= record["latency_ms"]


@pytest.mark.parametrize("fmt", ["float", "base64"])
async def test_embeddings_float_and_base64(proxy: Proxy, fake: FakeOpenAI, fmt: str) -> None:
    async with async_client(proxy) as client:
        if fmt == "float":
            result = await client.embeddings.create(
                model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
            )
        else:  # the SDK asks for base64 by default and decodes it itself
            result = await client.embeddings.create(
                model="text-embedding-3-small", input=["alpha", "beta"]
            )
    assert b'"encoding_format":"base64"' in fake.requests[-1].body or fmt == "float"
    assert [d.index for d in result.data] == [0, 1]
    for item, text in zip(result.data, ["alpha", "beta"], strict=True):
        expected = vector(text, 64)
        got = list(struct.unpack("<64f", struct.pack("<64f", *item.embedding)))
        assert got == expected


async def test_models_list(proxy: Proxy) -> None:
    def call() -> list[str]:
        with sync_client(proxy) as client:
            return [m.id for m in client.models.list()]

    assert "gpt-4o" in await asyncio.to_thread(call)


async def test_upstream_error_becomes_the_right_sdk_exception(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    # the proxy retries a rate limit twice; the third answer goes to the SDK, told not to retry
    fake.fail_next(*[Fault(status=429, code="rate_limit_exceeded")] * 3)
    async with async_client(proxy) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.request_id == fake.sent[-1].headers["x-request-id"]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.headers["x-thriftgate-attempts"] == "3"
    assert fake.calls("/v1/chat/completions") == 3
    with pytest.raises(openai.NotFoundError):
        async with async_client(proxy) as client:
            await client.models.retrieve("does-not-exist")


async def test_proxy_made_error_parses_in_the_sdk(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_MAX_BODY_BYTES": "512"})
    async with async_client(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x" * 1000}]
            )
    assert caught.value.status_code == 413
    assert caught.value.type == "invalid_request_error"
    assert caught.value.code == "payload_too_large"
    assert "512 bytes" in caught.value.message
    assert fake.requests == []  # nothing reached the upstream
