"""Bad input gets an OpenAI error envelope with the right status; it disturbs no other request."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from conftest import AUTH_JSON as AUTH
from conftest import MakeProxy, Proxy
from fake_openai import FakeOpenAI


def assert_envelope(payload: dict[str, object], type_: str, code: str) -> None:
    assert set(payload) == {"error"}
    error = payload["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2, 3]", "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b"\xff\xfe{}", "invalid_json"),
        (b'{"model": "gpt-4o", "messages": [}', "invalid_json"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/embeddings"])
async def test_bad_bodies_get_400_envelope(
    proxy: Proxy, fake: FakeOpenAI, body: bytes, code: str, path: str
) -> None:
    async with aiohttp.ClientSession() as s, s.post(proxy.url + path, data=body, headers=AUTH) as r:
        assert r.status == 400
        assert r.headers["Content-Type"].startswith("application/json")
        assert_envelope(await r.json(), "invalid_request_error", code)
    assert fake.requests == []
    record = (await proxy.usage.wait(1))[-1]
    assert record["status"] == 400
    assert record["error"] == "invalid_json"


async def test_body_over_limit_is_413_on_every_path(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_MAX_BODY_BYTES": "1000"})
    big = b'{"input": "' + b"x" * 2000 + b'"}'
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/embeddings", "/v1/files"):
            async with s.post(proxy.url + path, data=big, headers=AUTH) as r:
                assert r.status == 413, path
                assert_envelope(await r.json(), "invalid_request_error", "payload_too_large")

        async def chunked() -> object:  # no Content-Length: counted while streaming
            for _ in range(4):
                yield b"y" * 400

        async with s.post(proxy.url + "/v1/files", data=chunked(), headers=AUTH) as r:
            assert r.status == 413
            assert_envelope(await r.json(), "invalid_request_error", "payload_too_large")
    assert all(req.path != "/v1/embeddings" for req in fake.requests)


async def test_unknown_paths_and_methods(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v2/whatever") as r:
            assert r.status == 404
            assert_envelope(await r.json(), "invalid_request_error", "not_found")
        async with s.get(proxy.url + "/") as r:
            message = (await r.json())["error"]["message"]
            assert "/v1/*" in message and "/metrics" in message and "OPENAI_BASE_URL" in message
        async with s.post(proxy.url + "/healthz") as r:
            assert r.status == 405
            assert_envelope(await r.json(), "invalid_request_error", "method_not_allowed")


async def test_one_bad_request_does_not_disturb_others(proxy: Proxy, fake: FakeOpenAI) -> None:
    async def send(i: int) -> int:
        good = {"model": "gpt-4o", "messages": [{"role": "user", "content": f"ok {i}"}]}
        async with aiohttp.ClientSession() as s:
            if i % 2:
                req = s.post(proxy.url + "/v1/chat/completions", data=b"{bad", headers=AUTH)
            else:
                req = s.post(proxy.url + "/v1/chat/completions", json=good, headers=AUTH)
            async with req as r:
                await r.read()
                return r.status

    statuses = await asyncio.gather(*(send(i) for i in range(20)))
    assert statuses == [200 if i % 2 == 0 else 400 for i in range(20)]
    assert fake.calls("/v1/chat/completions") == 10


async def test_health_and_readiness(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200
            report = await r.json()
    assert report["status"] == "ready"
    assert [u["url"] for u in report["upstreams"]] == [proxy.settings.upstream.url]
    assert report["redis"] == {"configured": False, "status": "off"}
    assert report["cache"] == "memory"


async def test_readyz_is_503_once_shutdown_began(proxy: Proxy) -> None:
    await proxy.app.shutdown()  # what SIGTERM runs first (the listener is already closed then)
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
        assert r.status == 503
        assert (await r.json())["status"] == "shutting_down"
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/healthz") as r:
        assert r.status == 200  # still serving in-flight work


async def test_total_timeout_ends_a_stuck_stream_with_an_error(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOTAL_TIMEOUT_S": "0.5"})
    fake.gate = asyncio.Event()  # the upstream sends one chunk and then nothing, for ever
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r,
        ):
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(10):
                    await r.read()
    finally:
        fake.gate.set()
    record = (await proxy.usage.wait(1))[-1]
    assert record["error"] == "upstream_timeout"
