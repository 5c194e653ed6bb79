"""Retries of transient upstream failures: what is retried, how long it waits, what clients see."""

from __future__ import annotations

import asyncio
import email.utils
import time
from functools import partial
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from conftest import API_KEY, AUTH, NO_STORE, MakeProxy, Proxy
from conftest import post as post_to
from fake_openai import FakeOpenAI, Fault, error_body
from multidict import CIMultiDict

from proxy.retry import RetryStage, retry_after_s

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "retry me"}]}


def retries(proxy: Proxy, reason: str) -> float:
    stage = next(m for m in proxy.app.middlewares if isinstance(m, RetryStage))
    return (
        stage.metrics.registry.get_sample_value("thriftgate_retries_total", {"reason": reason}) or 0
    )


post = partial(post_to, body=CHAT, headers=NO_STORE)  # past the cache


async def test_503_503_200_is_one_success_after_three_attempts(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.fail_next(Fault(status=503), Fault(status=503))
    status, headers, body = await post(proxy)
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "You said: retry me"
    assert headers["x-thriftgate-attempts"] == "3"
    assert "x-should-retry" not in headers
    assert fake.calls("/v1/chat/completions") == 3
    assert [r.body for r in fake.requests] == [fake.requests[0].body] * 3  # replayed exactly
    # full jitter: a random wait up to 0.5 s, then up to 1 s
    assert len(proxy.waits) == 2
    assert 0 <= proxy.waits[0] <= 0.5 and 0 <= proxy.waits[1] <= 1.0
    record = (await proxy.usage.wait(1))[-1]
    assert record["attempts"] == 3
    assert record["retry_wait_ms"] == pytest.approx(sum(proxy.waits) * 1000, abs=0.01)
    assert retries(proxy, "status_503") == 2


async def test_retry_after_ms_is_honoured(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.fail_next(Fault(status=429, headers={"retry-after-ms": "50", "retry-after": "9"}))
    status, headers, _ = await post(proxy)
    assert status == 200
    assert proxy.waits == [0.05]
    assert headers["x-thriftgate-attempts"] == "2"


def test_retry_after_forms() -> None:
    def reply(**h: str) -> web.StreamResponse:
        return web.StreamResponse(headers=CIMultiDict(h))

    assert retry_after_s(reply(**{"retry-after-ms": "1500"})) == 1.5
    assert retry_after_s(reply(**{"retry-after": "2"})) == 2.0
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert retry_after_s(reply(**{"retry-after": date}), now=now) == pytest.approx(30, abs=1)
    assert retry_after_s(reply(**{"retry-after": "soon"})) is None
    assert retry_after_s(reply(**{"retry-after-ms": "-5"})) is None
    assert retry_after_s(reply()) is None


async def test_retry_after_is_capped(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Any
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[retry]\nretry_after_cap_s = 2.0\n")
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    fake.fail_next(Fault(status=503, headers={"retry-after": "20"}))
    assert (await post(proxy))[0] == 200
    assert proxy.waits == [2.0]


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504])
async def test_each_transient_status_is_retried(
    proxy: Proxy, fake: FakeOpenAI, status: int
) -> None:
    fake.fail_next(Fault(status=status))
    got, headers, _ = await post(proxy)
    assert got == 200 and headers["x-thriftgate-attempts"] == "2"
    assert retries(proxy, f"status_{status}") == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_other_4xx_are_not_retried(proxy: Proxy, fake: FakeOpenAI, status: int) -> None:
    fake.fail_next(Fault(status=status))
    got, headers, _ = await post(proxy)
    assert got == status
    assert fake.calls("/v1/chat/completions") == 1
    assert "x-thriftgate-attempts" not in headers and "x-should-retry" not in headers


async def test_insufficient_quota_is_not_retried(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = error_body("You exceeded your current quota", "insufficient_quota", "insufficient_quota")
    fake.fail_next(Fault(status=429, body=body))
    answer = await post(proxy)
    status, headers = answer.status, answer.headers
    assert status == 429
    assert answer.raw == body  # the upstream's answer, unchanged...
    assert headers["x-should-retry"] == "false"  # ...and the SDK told not to try again
    assert fake.calls("/v1/chat/completions") == 1
    assert proxy.waits == []


async def test_reset_and_timeout_are_retried(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_FIRST_BYTE_TIMEOUT_S": "0.3"})
    fake.fail_next(Fault(reset=True), Fault(delay=5))
    status, headers, _ = await post(proxy)
    assert status == 200
    assert headers["x-thriftgate-attempts"] == "3"
    assert retries(proxy, "connection") == 1 and retries(proxy, "timeout") == 1


async def test_final_failure_goes_out_unchanged_and_tells_the_sdk_not_to_retry(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.fail_next(*[Fault(status=503)] * 9)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:  # SDK
        with pytest.raises(openai.InternalServerError) as caught:  # default: 2 retries of its own
            await client.chat.completions.create(**CHAT)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert caught.value.response.headers["x-thriftgate-attempts"] == "3"
    assert fake.calls("/v1/chat/completions") == 3  # not 3 x 3: the SDK did not retry


async def test_the_sdk_sees_exactly_one_success(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.fail_next(Fault(status=500), Fault(status=502))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.parse().choices[0].message.content == "You said: retry me"
    assert raw.retries_taken == 0
    assert raw.headers["x-thriftgate-attempts"] == "3"


async def test_unreachable_upstream_after_retries_is_502_not_retried_by_the_sdk(
    make_proxy: MakeProxy,
) -> None:
    from conftest import free_port

    proxy = await make_proxy(upstream=f"http://127.0.0.1:{free_port()}/v1")
    status, headers, body = await post(proxy)
    assert status == 502
    assert body["error"]["code"] == "upstream_unavailable"
    assert headers["x-should-retry"] == "false"
    assert headers["x-thriftgate-attempts"] == "3"


async def test_deadline_gives_up_rather_than_sleeping_past_it(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RETRY_DEADLINE_S": "5"})
    fake.fail_next(Fault(status=503, headers={"retry-after": "20"}))  # capped at 30 s > 5 s left
    status, headers, _ = await post(proxy)
    assert status == 503
    assert proxy.waits == []
    assert headers["x-should-retry"] == "false"
    assert fake.calls("/v1/chat/completions") == 1


async def test_per_request_max_retries(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.fail_next(*[Fault(status=503)] * 5)
    status, headers, _ = await post(proxy, headers={**NO_STORE, "x-thriftgate-max-retries": "1"})
    assert status == 503 and headers["x-thriftgate-attempts"] == "2"
    status, _, body = await post(proxy, headers={**NO_STORE, "x-thriftgate-max-retries": "lots"})
    assert status == 400
    assert body["error"]["code"] == "invalid_max_retries"
    assert all("x-thriftgate-max-retries" not in r.headers for r in fake.requests)


async def test_stream_cut_after_bytes_is_not_retried(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.fail_next(Fault(cut_after=2))
    received = b""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH
        ) as r,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in r.content.iter_any():
                received += chunk
    assert received.count(b"data: ") == 2  # no duplicate chunks, no second attempt
    assert fake.calls("/v1/chat/completions") == 1


async def test_stream_retried_before_its_first_byte(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.fail_next(Fault(status=503))
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        stream = await client.chat.completions.create(**CHAT, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "You said: retry me"
    assert fake.calls("/v1/chat/completions") == 2


async def test_client_disconnect_cancels_a_pending_retry(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    waiting = asyncio.Event()
    never = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        waiting.set()
        await never.wait()  # a wait that only a cancellation ends

    proxy = await make_proxy(retry_sleep=slow_sleep)
    fake.fail_next(Fault(status=503))
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(
            s.post(proxy.url + "/v1/chat/completions", json=CHAT, headers=AUTH)
        )
        await asyncio.wait_for(waiting.wait(), 5)
        task.cancel()  # the client goes away while the proxy waits to retry
        with pytest.raises(asyncio.CancelledError):
            await task
    record = (await proxy.usage.wait(1))[-1]
    assert record["error"] == "client_disconnected"
    assert fake.calls("/v1/chat/completions") == 1


async def test_requests_with_streamed_bodies_are_not_retried(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.fail_next(Fault(status=503), Fault(status=503))
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b"{}", filename="x.jsonl")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/files", data=form, headers=AUTH) as r:
            assert r.status == 503  # its body was streamed upstream: it cannot be sent again
        async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:
            assert r.status == 200  # no body: retried
            assert r.headers["x-thriftgate-attempts"] == "2"


async def test_retries_can_be_switched_off(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RETRY": "false"})
    fake.fail_next(Fault(status=503))
    assert (await post(proxy))[0] == 503
    assert fake.calls("/v1/chat/completions") == 1
