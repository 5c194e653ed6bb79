"""The lean upstream client (proxy/client.py): the bytes it sends are aiohttp's, its connections
are kept alive and bounded, and a connection whose answer was not read whole is never reused."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import AUTH, MakeProxy, Proxy, post
from fake_openai import FakeOpenAI
from multidict import CIMultiDict
from redis_fleet import free_port
from yarl import URL

from proxy.client import CannotConnect, Connections
from proxy.upstream import SKIP_AUTO_HEADERS

CHAT = "/v1/chat/completions"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class RawServer:
    """A TCP server that records the bytes of each request and answers with ``reply(request)``;
    ``closed`` is set each time a client connection ends."""

    def __init__(
        self, reply: Callable[[bytes, asyncio.StreamReader], Awaitable[bytes]] | None = None
    ) -> None:
        self.reply = reply
        self.received: list[bytes] = []
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> URL:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return URL(f"http://127.0.0.1:{port}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"\r\nContent-Length: (\d+)", head)
                request = head + (await reader.readexactly(int(length[1])) if length else b"")
                self.received.append(request)
                writer.write(await self.reply(request, reader) if self.reply else ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()
            self.closed.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    server = RawServer()
    yield server
    await server.close()


def connections(**kw: float) -> Connections:
    return Connections(
        int(kw.pop("limit", 0)),
        connect_timeout_s=kw.pop("connect", 5.0),
        total_timeout_s=kw.pop("total", 30.0),
        **kw,
    )


@pytest.mark.parametrize(
    "body", [b'{"model":"m","messages":[]}', b"", b"x" * 100_000], ids=["json", "empty", "large"]
)
async def test_the_bytes_sent_are_aiohttps(raw: RawServer, body: bytes) -> None:
    base = await raw.start()
    url = URL(str(base) + "/v1/chat/completions?x=%20y&q=1", encoded=True)
    headers = CIMultiDict(
        [("Authorization", "Bearer sk-x"), ("Content-Type", "application/json"), ("X-A", "é")]
    )
    async with (
        aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=SKIP_AUTO_HEADERS,
        ) as session,
        session.request("POST", url, headers=headers, data=body, allow_redirects=False) as r,
    ):
        assert await r.read() == b"{}"
    pool = connections()
    answer = await pool.send("POST", url, headers, body)
    assert (answer.status, await answer.read()) == (200, b"{}")
    await pool.close()
    assert raw.received[1] == raw.received[0]  # byte for byte: line, Host, order, length


async def test_connections_are_kept_alive_and_bounded(raw: RawServer) -> None:
    base = await raw.start()
    pool = connections(limit=2)

    async def call(i: int) -> bytes:
        answer = await pool.send("POST", base / "x", CIMultiDict(), str(i).encode())
        return await answer.read()

    assert await asyncio.gather(*(call(i) for i in range(20))) == [b"{}"] * 20
    assert len(raw.received) == 20
    assert raw.most_open <= 2  # the limit held while 20 requests wanted a connection at once
    assert raw.connections <= 2  # and they were reused, not reopened
    await pool.close()
    await asyncio.wait_for(raw.closed.wait(), 5)


async def test_an_answer_not_read_whole_closes_its_connection() -> None:
    async def reply(request: bytes, reader: asyncio.StreamReader) -> bytes:
        if request.endswith(b"2"):
            return ANSWER
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"  # 8 bytes still to come

    raw = RawServer(reply)
    base = await raw.start()
    pool = connections()
    first = await pool.send("POST", base / "x", CIMultiDict(), b"1")
    first.release()  # the body was not read: the connection cannot be trusted for another request
    await asyncio.wait_for(raw.closed.wait(), 5)
    second = await pool.send("POST", base / "x", CIMultiDict(), b"2")
    assert await second.read() == b"{}"
    assert raw.connections == 2
    await pool.close()
    await raw.close()


async def test_interim_answers_are_skipped() -> None:
    async def reply(_: bytes, __: asyncio.StreamReader) -> bytes:
        return (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + ANSWER
        )

    raw = RawServer(reply)
    base = await raw.start()
    pool = connections()
    answer = await pool.send("POST", base / "x", CIMultiDict(), b"{}")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert await answer.read() == b"{}"
    await pool.close()
    await raw.close()


async def test_an_answer_without_a_length_is_read_to_the_connections_end() -> None:
    stream = b"data: one\n\ndata: two\n\n"
    server = await asyncio.start_server(
        lambda r, w: _close_after(
            r, w, b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + stream
        ),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    pool = connections()
    answer = await pool.send("POST", URL(f"http://127.0.0.1:{port}/x"), CIMultiDict(), b"{}")
    assert answer.status == 200
    assert await answer.read() == stream  # not an empty body: the close delimits it
    await pool.close()
    server.close()
    await server.wait_closed()


async def _close_after(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(answer)
    await writer.drain()
    writer.close()


async def test_the_total_timeout_ends_a_silent_exchange() -> None:
    async def reply(_: bytes, reader: asyncio.StreamReader) -> bytes:
        assert await reader.read() == b""  # no answer: wait for the client to hang up
        return b""

    raw = RawServer(reply)
    base = await raw.start()
    pool = connections(total=0.2)
    with pytest.raises(aiohttp.ServerTimeoutError):
        await asyncio.wait_for(pool.send("POST", base / "x", CIMultiDict(), b"{}"), 10)
    await asyncio.wait_for(raw.closed.wait(), 5)  # and the connection was closed
    await pool.close()
    await raw.close()


async def test_a_cancelled_request_closes_its_connection() -> None:
    arrived = asyncio.Event()

    async def reply(_: bytes, reader: asyncio.StreamReader) -> bytes:
        arrived.set()
        assert await reader.read() == b""  # no answer: wait for the client to hang up
        return b""

    raw = RawServer(reply)
    base = await raw.start()
    pool = connections()
    task = asyncio.create_task(pool.send("POST", base / "x", CIMultiDict(), b"{}"))
    await asyncio.wait_for(arrived.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(raw.closed.wait(), 5)
    await pool.close()
    await raw.close()


async def test_nothing_listening_is_cannot_connect() -> None:
    pool = connections()
    with pytest.raises(CannotConnect) as caught:
        await pool.send("POST", URL(f"http://127.0.0.1:{free_port()}/x"), CIMultiDict(), b"{}")
    assert isinstance(caught.value.os_error, ConnectionRefusedError)
    await pool.close()


# -- through the proxy: chat calls (a body in hand) take the lean client ------------------------


async def test_chat_calls_reuse_one_upstream_connection(proxy: Proxy, fake: FakeOpenAI) -> None:
    for i in range(5):
        status, _, _ = await post(
            proxy,
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"question {i}"}]},
        )
        assert status == 200
    peers = {r.peer for r in fake.requests if r.path == CHAT}
    assert len(fake.requests) == 5
    assert len(peers) == 1  # one kept-alive connection carried all five


async def test_a_client_gone_mid_stream_does_not_leave_its_connection_for_the_next(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.gate = asyncio.Event()  # the stream stops after its first chunk
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(proxy.url + CHAT, json=body, headers=AUTH) as r,
        ):
            assert r.status == 200
            await r.content.readany()  # then the client leaves
        await asyncio.wait_for(fake.disconnected.wait(), 10)  # the upstream saw it go
    finally:
        fake.gate.set()
    fake.gate = None
    status, _, data = await post(
        proxy, {"model": "gpt-4o", "messages": [{"role": "user", "content": "next"}]}
    )
    assert status == 200 and data["object"] == "chat.completion"
    assert fake.requests[-1].peer != fake.requests[0].peer  # a new connection, not the torn one


@pytest.mark.parametrize(
    ("upstream_url", "reason"),
    [
        ("http://127.0.0.1:{free}/v1", "connection refused"),
        ("http://no-such-host.invalid/v1", "does not resolve (DNS)"),
        ("https://{fake}/v1", "TLS handshake failed"),
    ],
    ids=["refused", "dns", "tls"],
)
async def test_connection_errors_on_chat_calls_say_why(
    make_proxy: MakeProxy, upstream: TestServer, upstream_url: str, reason: str
) -> None:
    url = upstream_url.format(fake=f"{upstream.host}:{upstream.port}", free=free_port())
    proxy = await make_proxy(upstream=url)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    status, _, data = await post(proxy, chat, headers={**AUTH, "x-thriftgate-max-retries": "0"})
    assert status == 502
    assert data["error"]["code"] == "upstream_unavailable"
    assert reason in data["error"]["message"], data["error"]["message"]
