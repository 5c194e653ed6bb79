"""Byte-for-byte pass-through: requests reach the upstream unchanged, answers reach the client."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from conftest import AUTH, MakeProxy, Proxy
from fake_openai import FakeOpenAI, Fault, Sent

BARE = ("Accept-Encoding", "User-Agent", "Accept")  # the test client adds no headers either
PASSED_HEADERS = [
    "x-request-id",
    "openai-processing-ms",
    "openai-organization",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
    "content-type",
    "strict-transport-security",
    "cf-cache-status",
]


async def direct_and_proxied(
    proxy: Proxy, fake: FakeOpenAI, method: str, path: str, **kw: object
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, proxy.url + path, **kw) as r,  # type: ignore[arg-type]
    ):
        return r, await r.read()


async def test_chat_json_passes_through_byte_for_byte(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = b'{"model":"gpt-4o-mini",  "messages":[{"role":"user","content":"hi"}],"n":1}'
    sent_headers = {
        **AUTH,
        "Content-Type": "application/json",
        "OpenAI-Project": "proj_1",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "hop-by-hop: dropped",
    }
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=BARE) as s,
        s.post(
            proxy.url + "/v1/chat/completions?trace=1&x=%20y", data=body, headers=sent_headers
        ) as r,
    ):
        got = await r.read()
        headers = r.headers
        status = r.status
    sent = fake.requests[-1]
    assert sent.body == body
    assert sent.method == "POST"
    assert sent.path == "/v1/chat/completions?trace=1&x=%20y"
    # exactly the client's end-to-end headers arrive: none added, none changed, hop-by-hop gone
    expected = {k: v for k, v in sent_headers.items() if k not in {"Connection", "X-Hop"}}
    assert dict(sent.headers) == {
        **expected,
        "Host": sent.headers["Host"],
        "Content-Length": str(len(body)),
    }
    assert status == 200
    payload = orjson.loads(got)
    assert payload["object"] == "chat.completion"
    assert payload["choices"][0]["message"]["content"] == "You said: hi"
    for name in PASSED_HEADERS:
        assert name in headers, name


def assert_same_answer(headers: Mapping[str, str], body: bytes, sent: Sent) -> None:
    """The client got exactly what the upstream wrote: every end-to-end header, the same bytes."""
    hop = {"connection", "keep-alive", "transfer-encoding"}
    theirs = [(k.lower(), v) for k, v in sent.headers.items() if k.lower() not in hop]
    ours = [(k.lower(), v) for k, v in headers.items() if k.lower() not in hop]
    assert ours == theirs
    if sent.body is not None:
        assert body == sent.body


async def test_response_headers_and_body_equal_the_upstream_answer(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    for accept in ("identity", "gzip, deflate"):
        async with (
            aiohttp.ClientSession(auto_decompress=False) as s,
            s.get(proxy.url + "/v1/models", headers={**AUTH, "Accept-Encoding": accept}) as r,
        ):
            body = await r.read()
            assert r.status == 200
            assert_same_answer(r.headers, body, fake.sent[-1])
    assert fake.sent[-1].headers["Content-Encoding"] == "gzip"
    assert "set-cookie" in fake.sent[-1].headers


async def test_gzip_answer_forwarded_compressed(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "zip"}]})
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(
            proxy.url + "/v1/chat/completions",
            data=body,
            headers={
                **AUTH,
                "Accept-Encoding": "gzip, deflate",
                "Content-Type": "application/json",
            },
        ) as r,
    ):
        raw = await r.read()
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) == len(raw)
    assert fake.requests[-1].headers["Accept-Encoding"] == "gzip, deflate"
    decoded = orjson.loads(gzip.decompress(raw))
    assert decoded["choices"][0]["message"]["content"] == "You said: zip"
    # the proxy read a decoded copy for the usage log
    record = proxy.usage.records()[-1]
    assert record["total_tokens"] == decoded["usage"]["total_tokens"]


async def test_every_v1_path_and_method_is_forwarded(proxy: Proxy, fake: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/models/gpt-4o", headers=AUTH) as r:
            assert r.status == 200
            assert (await r.json())["id"] == "gpt-4o"
        async with s.delete(proxy.url + "/v1/models/ft-123", headers=AUTH) as r:
            assert (await r.json())["deleted"] is True
        async with s.get(proxy.url + "/v1/models/nope", headers=AUTH) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"
        async with s.post(proxy.url + "/v1/moderations", headers=AUTH, json={"input": "x"}) as r:
            assert r.status == 404  # the fake has no moderations; its own 404 passes through
            assert (await r.json())["error"]["message"] == "Invalid URL (POST /v1/moderations)"
        # GET on the chat path is the stored-completions list: forwarded, not parsed
        async with s.get(proxy.url + "/v1/chat/completions?limit=2", headers=AUTH) as r:
            assert r.status == 405 or r.status == 404
    assert [r.method for r in fake.requests] == ["GET", "DELETE", "GET", "POST", "GET"]
    assert fake.requests[-1].path == "/v1/chat/completions?limit=2"


async def test_multipart_upload_streams_through_unchanged(proxy: Proxy, fake: FakeOpenAI) -> None:
    content = bytes(range(256)) * 4096  # 1 MiB of every byte value
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", content, filename="input.jsonl", content_type="application/jsonl")
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/files", data=form, headers=AUTH) as r:
            assert r.status == 200
            info = await r.json()
        assert info["bytes"] == len(content)
        assert info["sha256"] == hashlib.sha256(content).hexdigest()
        async with s.get(proxy.url + f"/v1/files/{info['id']}/content", headers=AUTH) as r:
            assert await r.read() == content


async def test_upstream_api_key_replaces_client_key(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_UPSTREAM_API_KEY": "sk-sidecar-key"})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/models") as r:  # the client sends no key at all
            assert r.status == 200
        async with s.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer sk-x"}) as r:
            assert r.status == 200
    assert [r.headers["Authorization"] for r in fake.requests] == ["Bearer sk-sidecar-key"] * 2


async def test_upstream_path_prefix_is_kept(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy()
    prefixed = await make_proxy(upstream=proxy.base_url)  # thriftgate in front of thriftgate
    async with (
        aiohttp.ClientSession() as s,
        s.get(prefixed.url + "/v1/models?after=x", headers=AUTH) as r,
    ):
        assert r.status == 200
    assert fake.requests[-1].path == "/v1/models?after=x"


async def test_cookies_are_never_carried_between_clients(proxy: Proxy, fake: FakeOpenAI) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.get(proxy.url + "/v1/models", headers=AUTH) as r:
                assert r.status == 200
            s.cookie_jar.clear()
    assert all("Cookie" not in r.headers for r in fake.requests)


async def test_stream_chunks_arrive_before_upstream_finishes(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.gate = asyncio.Event()  # the upstream sends one chunk, then waits for this
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert b'"role":"assistant"' in first
        assert not fake.gate.is_set()  # the upstream has not finished: no buffering
        fake.gate.set()
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b'"content":"c"' in rest


async def test_client_disconnect_cancels_upstream(proxy: Proxy, fake: FakeOpenAI) -> None:
    fake.gate = asyncio.Event()
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        r = await s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH)
        await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        r.close()  # the client goes away mid-stream
    await asyncio.wait_for(fake.disconnected.wait(), 5)
    record = await proxy.usage.wait(1)
    assert record[-1]["error"] == "client_disconnected"


async def test_upstream_cut_mid_stream_ends_client_stream_with_error(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.fail_next(Fault(cut_after=3))
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "a b c d"}]}
    received = b""
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r,
    ):
        try:
            async with asyncio.timeout(5):
                async for chunk in r.content.iter_any():
                    received += chunk
            raised = False
        except aiohttp.ClientPayloadError:
            raised = True
    assert raised, "the client must see an incomplete stream, not a clean end"
    assert b"[DONE]" not in received
    assert received.count(b"data: ") == 3
    record = (await proxy.usage.wait(1))[-1]
    assert record["error"] == "upstream_disconnected"


async def test_upstream_unreachable_is_502(make_proxy: MakeProxy) -> None:
    from conftest import free_port

    port = free_port()
    proxy = await make_proxy(upstream=f"http://127.0.0.1:{port}/v1")
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/v1/models", headers=AUTH) as r:
        assert r.status == 502
        err = (await r.json())["error"]
    assert err["type"] == "server_error"
    assert err["code"] == "upstream_unavailable"
    assert set(err) == {"message", "type", "param", "code"}
    assert f"127.0.0.1:{port}" in err["message"]  # where, and why, in words
    assert "connection refused" in err["message"]


@pytest.mark.parametrize(
    ("upstream_url", "reason"),
    [
        ("http://no-such-host.invalid/v1", "does not resolve (DNS)"),
        ("https://{fake}/v1", "TLS handshake failed"),
    ],
    ids=["dns", "tls"],
)
async def test_upstream_connection_errors_say_why(
    make_proxy: MakeProxy, upstream: TestServer, upstream_url: str, reason: str
) -> None:
    fake = f"{upstream.host}:{upstream.port}"
    proxy = await make_proxy(upstream=upstream_url.format(fake=fake))
    no_retry = {**AUTH, "x-thriftgate-max-retries": "0"}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/v1/models", headers=no_retry) as r:
        assert r.status == 502
        message = (await r.json())["error"]["message"]
    assert reason in message, message


async def test_upstream_timeout_is_504(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_FIRST_BYTE_TIMEOUT_S": "0.2"})
    fake.fail_next(Fault(delay=5))
    no_retry = {**AUTH, "x-thriftgate-max-retries": "0"}
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/v1/models", headers=no_retry) as r:
        assert r.status == 504
        assert (await r.json())["error"]["code"] == "upstream_timeout"


async def test_upstream_errors_pass_through_unchanged(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = (
        b'{"error":{"message":"custom","type":"tokens","param":null,"code":"rate_limit_exceeded"}}'
    )
    fake.fail_next(Fault(status=429, body=body, headers={"retry-after": "7"}))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            proxy.url + "/v1/embeddings",
            json={"model": "m", "input": "x"},
            headers={**AUTH, "x-thriftgate-max-retries": "0"},
        ) as r,
    ):
        assert r.status == 429
        assert await r.read() == body
        assert r.headers["retry-after"] == "7"
        assert "x-thriftgate-error" not in r.headers


async def test_a_404_from_an_upstream_without_v1_is_explained_in_the_log(
    make_proxy: MakeProxy, upstream: TestServer, app_logs: Any
) -> None:
    from aiohttp import web

    async def nginx_404(request: web.Request) -> web.Response:
        return web.Response(status=404, text="404: Not Found")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", nginx_404)
    bare = TestServer(app)
    await bare.start_server()
    try:
        proxy = await make_proxy(upstream=str(bare.make_url("")))
        before = len(app_logs.lines())
        for _ in range(2):
            async with (
                aiohttp.ClientSession() as s,
                s.get(proxy.url + "/v1/models", headers=AUTH) as r,
            ):
                assert r.status == 404 and await r.text() == "404: Not Found"  # untouched
        hints = [x for x in app_logs.lines()[before:] if x["event"] == "upstream_not_found"]
        assert len(hints) == 1 and "is /v1 missing?" in hints[0]["hint"]  # once
    finally:
        await bare.close()
