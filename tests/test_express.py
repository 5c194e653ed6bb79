"""The express lane (``proxy.express``): a hit answered by the connection as the request arrives,
with the very bytes and the very accounting of the chain's hit; everything else goes down the
chain, with what the lane found, once."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable
from typing import Any

import openai
import orjson
import pytest
from conftest import API_KEY, FUZZ, MakeProxy, Proxy, read_answer
from fake_openai import FakeOpenAI
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.cache import Entry
from proxy.types import METRICS

CHAT = "/v1/chat/completions"
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "express me"}]}
# the fields of a usage line that differ between two hits on one answer
PER_REQUEST = {"request_id", "ts", "latency_ms"}


def request(
    body: Any = BODY, *, path: str = CHAT, headers: dict[str, str] | None = None, extra: bytes = b""
) -> bytes:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {
        "Host": "proxy",
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **(headers or {}),
    }
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in sent.items())
    return head.encode("latin-1") + extra + b"\r\n" + data


class Connection:
    """One kept-alive client connection, reading answers as raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, proxy: Proxy) -> Connection:
        url = URL(proxy.url)
        return cls(*await asyncio.open_connection(url.host, url.port))

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str], bytes]:
        """The next answer: status, headers (lower-case names), and all of its bytes."""
        async with asyncio.timeout(5):
            status, headers, sent, _ = await read_answer(self.reader)
        return status, headers, sent

    async def ask(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        await self.send(raw)
        return await self.answer()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def express(proxy: Proxy) -> float:
    return proxy.app[METRICS].cache["express"]


def hits(proxy: Proxy) -> float:
    return proxy.app[METRICS].cache["hit"]


def timeless(answer: bytes) -> bytes:
    """An answer's bytes but the values that tell when it was written."""
    return re.sub(rb"(\r\n(?:Date|age): )[^\r]*", rb"\1-", answer)


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


async def test_a_hit_on_a_kept_alive_connection_is_the_chains_hit_byte_for_byte(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    conn = await Connection.open(proxy)
    status, miss, _ = await conn.ask(request())
    assert (status, miss["x-thriftgate-cache"]) == (200, "MISS")
    await proxy.usage.wait(1)
    _, lane, lane_bytes = await conn.ask(request())
    assert express(proxy) == 1 and hits(proxy) == 1
    # two requests in one write: the connection has a queue, so the chain answers both
    await conn.send(request() + request())
    chained = [await conn.answer(), await conn.answer()]
    assert express(proxy) == 1 and hits(proxy) == 3
    await conn.close()
    assert lane["x-thriftgate-cache"] == "HIT" and fake.calls() == 1
    for _, _, chain_bytes in chained:
        assert timeless(chain_bytes) == timeless(lane_bytes)
    assert lane_bytes.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")


async def test_a_stream_hit_is_the_chains_stream_hit_byte_for_byte(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    streamed = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    conn = await Connection.open(proxy)
    status, miss, _ = await conn.ask(request(streamed))
    assert (status, miss["x-thriftgate-cache"], miss.get("transfer-encoding")) == (
        200,
        "MISS",
        "chunked",
    )
    await proxy.usage.wait(1)
    _, lane, lane_bytes = await conn.ask(request(streamed))
    await conn.send(request(streamed) + request(streamed))
    chained = [await conn.answer(), await conn.answer()]
    await conn.close()
    assert lane["x-thriftgate-cache"] == "HIT" and lane["content-type"].startswith(
        "text/event-stream"
    )
    assert express(proxy) == 1 and hits(proxy) == 3 and fake.calls() == 1
    for _, _, chain_bytes in chained:
        assert timeless(chain_bytes) == timeless(lane_bytes)
    assert lane_bytes.endswith(b"data: [DONE]\n\n")
    lines = await proxy.usage.wait(4)
    assert [line["cache"] for line in lines] == ["miss", "hit", "hit", "hit"]
    assert lines[1]["total_tokens"] == lines[0]["total_tokens"] > 0


async def test_a_lane_hit_writes_the_usage_line_a_chain_hit_writes(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())
    await conn.ask(request())  # the lane
    await conn.send(request() + request())  # the chain
    await conn.answer()
    await conn.answer()
    await conn.close()
    miss, lane, chain, _ = await proxy.usage.wait(4)
    assert express(proxy) == 1
    assert lane["cache"] == "hit" and lane["saved_usd"] > 0 and lane["cost_usd"] == 0
    assert lane["request_hash"] == miss["request_hash"]
    assert lane["prompt_tokens"] == miss["prompt_tokens"]
    same = {k: v for k, v in lane.items() if k not in PER_REQUEST}
    assert same == {k: v for k, v in chain.items() if k not in PER_REQUEST}
    assert lane["request_id"] != chain["request_id"]


async def test_the_lane_can_be_turned_off(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_EXPRESS": "false"})
    conn = await Connection.open(proxy)
    for _ in range(3):
        await conn.ask(request())
    await conn.close()
    assert (express(proxy), hits(proxy), fake.calls()) == (0, 2, 1)


async def test_a_miss_the_lane_read_goes_upstream_once_as_sent(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    """The lane reads, checks and parses a request it cannot answer; the chain goes on from
    there (the body forwarded as the client sent it, one usage line, one request id)."""
    conn = await Connection.open(proxy)
    raw = b'{"model": "gpt-4o-mini",  "messages": [{"role": "user", "content": "spaced"}]}'
    for i in range(3):  # each a different body: a miss every time, on one connection
        body = raw.replace(b"spaced", b"spaced %d" % i)
        status, headers, _ = await conn.ask(request(body))
        assert (status, headers["x-thriftgate-cache"]) == (200, "MISS")
        assert fake.requests[-1].body == body
    await conn.close()
    lines = await proxy.usage.wait(3)
    assert len({line["request_id"] for line in lines}) == 3 and fake.calls() == 3
    assert express(proxy) == 0


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (request(b'{"model": '), 400, "invalid_json"),
        (request(b"[1, 2]"), 400, "invalid_json"),
        (request(headers={"x-thriftgate-max-retries": "banana"}), 400, "invalid_max_retries"),
        (request(path="/v1/chat/completions/..%2f..%2fx"), 400, "invalid_path"),
        (request(b'{"model": "gpt-4o", "x": "' + b"a" * 2000 + b'"}'), 413, "payload_too_large"),
    ],
)
async def test_what_the_lane_refuses_the_chain_answers_as_it_would(
    make_proxy: MakeProxy, fake: FakeOpenAI, raw: bytes, status: int, code: str
) -> None:
    """The same status, envelope and usage line with the lane on as off, and the connection
    goes on serving."""
    seen = []
    for on in ("true", "false"):
        proxy = await make_proxy(
            env={"THRIFTGATE_EXPRESS": on, "THRIFTGATE_MAX_BODY_BYTES": "1000"}
        )
        conn = await Connection.open(proxy)
        got, headers, answer = await conn.ask(raw)
        error = orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert (got, error["code"], headers["x-thriftgate-error"]) == (status, code, code)
        assert set(error) == {"message", "type", "param", "code"}
        next_status, _, _ = await conn.ask(request())
        await conn.close()
        line = (await proxy.usage.wait(2))[0]
        assert line["status"] == status
        seen.append(({k: v for k, v in line.items() if k not in PER_REQUEST}, error))
        assert next_status == 200
    assert seen[0] == seen[1]
    assert fake.calls() == 2  # the two good requests only


@pytest.mark.parametrize(
    "headers",
    [
        {"Connection": "close"},
        {"Cache-Control": "no-cache"},
        {"Expect": "100-continue"},
        {"x-thriftgate-trim": "last-1"},
    ],
)
async def test_what_the_lane_leaves_to_the_chain(
    proxy: Proxy, fake: FakeOpenAI, headers: dict[str, str]
) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())
    await proxy.usage.wait(1)
    if "Expect" in headers:  # the chain answers 100 Continue, then the answer
        await conn.send(request(headers=headers))
        async with asyncio.timeout(5):
            assert await conn.reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        status, answer, _ = await conn.answer()
    else:
        status, answer, _ = await conn.ask(request(headers=headers))
    await conn.close()
    assert status == 200 and express(proxy) == 0
    expected = "MISS" if headers.get("Cache-Control") == "no-cache" else "HIT"
    if "x-thriftgate-trim" in headers:
        expected = answer["x-thriftgate-cache"]  # trimmed or not, the chain's to say
    assert answer["x-thriftgate-cache"] == expected


async def test_a_body_still_arriving_is_the_chains(proxy: Proxy, fake: FakeOpenAI) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())
    raw = request()
    head, body = raw[: raw.index(b"\r\n\r\n") + 4], raw[raw.index(b"\r\n\r\n") + 4 :]
    await conn.send(head + body[:10])  # the headers and part of the body, then the rest
    await conn.send(body[10:])
    status, headers, _ = await conn.answer()
    await conn.close()
    assert (status, headers["x-thriftgate-cache"]) == (200, "HIT")


async def test_a_kept_alive_connection_serves_on_after_many_lane_hits(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())
    for _ in range(50):
        status, headers, _ = await conn.ask(request())
        assert (status, headers["x-thriftgate-cache"]) == (200, "HIT")
    other = {**BODY, "messages": [{"role": "user", "content": "another"}]}
    status, headers, _ = await conn.ask(request(other))
    await conn.close()
    assert (status, headers["x-thriftgate-cache"]) == (200, "MISS")
    assert express(proxy) == 50 and fake.calls() == 2
    assert len(await proxy.usage.wait(52)) == 52


class Early(asyncio.Protocol):
    """A proxy connection (``factory``'s) whose first requests were read before its task ran:
    ``first`` is handed to it as the connection is made, ``then`` on the loop's next callback.
    (With uvloop a read can come before the connection's task first runs, or before it runs again
    after a request: on Python < 3.12, whose tasks start on the next turn, and after any request
    whose task waited.)"""

    def __init__(self, factory: Callable[[], asyncio.Protocol], first: bytes, then: bytes) -> None:
        self.inner = factory()
        self.first, self.then = first, then

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)
        self.inner.data_received(self.first)
        if self.then:
            asyncio.get_running_loop().call_soon(self.inner.data_received, self.then)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


async def early(proxy: Proxy, first: bytes, then: bytes = b"") -> Connection:
    """A connection to ``proxy`` over a socket pair, its requests read as ``Early`` says."""
    factory = proxy.server.runner.server  # type: ignore[union-attr]  # the connections' factory
    here, there = socket.socketpair()
    loop = asyncio.get_running_loop()
    await loop.connect_accepted_socket(lambda: Early(factory, first, then), here)
    return Connection(*await asyncio.open_connection(sock=there))


async def test_a_hit_read_before_the_connections_task_ran_is_the_lanes(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())  # a miss: its answer stored
    await conn.send(request() + request())  # two in one write: the chain answers both
    _, _, chain_bytes = await conn.answer()
    await conn.answer()
    await conn.close()
    before = express(proxy)
    conn = await early(proxy, request())
    status, headers, lane_bytes = await conn.answer()
    assert (status, headers["x-thriftgate-cache"]) == (200, "HIT")
    assert express(proxy) == before + 1  # the lane's, though no task waited for it yet
    assert timeless(lane_bytes) == timeless(chain_bytes)
    status, headers, _ = await conn.ask(request())  # and the connection serves on
    await conn.close()
    assert (status, headers["x-thriftgate-cache"], express(proxy)) == (200, "HIT", before + 2)
    assert fake.calls() == 1 and len(await proxy.usage.wait(5)) == 5


async def test_a_hit_read_while_a_request_waits_to_start_is_answered_after_it(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    conn = await Connection.open(proxy)
    await conn.ask(request())  # stored: the second request below is a hit
    await conn.close()
    other = {**BODY, "messages": [{"role": "user", "content": "first come, first served"}]}
    # the miss is taken by the connection's task before the hit is read, and has not started yet
    conn = await early(proxy, request(other), request())
    first = await conn.answer()
    second = await conn.answer()
    await conn.close()
    assert (first[0], first[1]["x-thriftgate-cache"]) == (200, "MISS")
    assert (second[0], second[1]["x-thriftgate-cache"]) == (200, "HIT")
    assert fake.calls() == 2 and len(await proxy.usage.wait(3)) == 3


async def test_hits_from_redis_local_copy_take_the_lane(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    proxy = await make_proxy(env={"REDIS_URL": redis_url})
    conn = await Connection.open(proxy)
    await conn.ask(request())
    await proxy.usage.wait(1)
    await conn.ask(request())  # found in Redis by the chain: kept in the local copy
    status, headers, _ = await conn.ask(request())
    await conn.close()
    assert (status, headers["x-thriftgate-cache"]) == (200, "HIT")
    assert express(proxy) >= 1 and fake.calls() == 1


async def test_a_lane_hit_in_flight_at_shutdown_is_logged(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy()
    conn = await Connection.open(proxy)
    await conn.ask(request())
    await conn.ask(request())
    await conn.close()
    await proxy.server.close()  # clean-up concludes what is queued before the log closes
    assert [line["cache"] for line in proxy.usage.records()] == ["miss", "hit"]


header_values = st.sampled_from(
    ["0", "60", "last-2", "off", "a,b", "banana", "-1", "\u00e9", "no-store", "no-cache", ""]
)


@settings(FUZZ, max_examples=60)
@given(
    body=st.sampled_from(
        [
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}]}',
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "same"}], '
            b'"stream": true}',
            b'{"model": "gpt-4o-mini", "messages": "no"}',
            b'{"model": 5}',
            b"{}",
            b"not json",
            b'{"model": "text-embedding-3-small", "input": "same"}',
            b'{"model": "gpt-4o-mini", "input": "same"}',
        ]
    ),
    path=st.sampled_from([CHAT, "/v1/embeddings", "/v1/responses", "/v1/completions"]),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "x-thriftgate-cache-ttl",
                "x-thriftgate-max-retries",
                "x-thriftgate-trim",
                "x-thriftgate-tags",
                "Cache-Control",
                "OpenAI-Project",
            ]
        ),
        header_values,
        max_size=3,
    ),
)
async def test_the_lane_answers_as_the_chain_does(
    make_proxy: MakeProxy, fake: FakeOpenAI, body: bytes, path: str, headers: dict[str, str]
) -> None:
    """Any request, twice on one kept-alive connection (the second may be a lane hit): the same
    statuses, cache outcomes, error codes and usage lines with the lane on as off."""
    seen = []
    for on in ("true", "false"):
        proxy = await make_proxy(env={"THRIFTGATE_EXPRESS": on})
        conn = await Connection.open(proxy)
        answers = []
        for _ in range(2):
            status, got, _ = await conn.ask(request(body, path=path, headers=headers))
            error = got.get("x-thriftgate-error")
            answers.append((status, got.get("x-thriftgate-cache"), error))
            await proxy.usage.wait(len(answers))
        await conn.close()
        lines = [
            {
                k: v
                for k, v in line.items()
                if k not in (*PER_REQUEST, "upstream_request_id") and not k.endswith("_ms")
            }
            for line in proxy.usage.records()
        ]
        seen.append((answers, lines))
        await proxy.server.close()
    assert seen[0] == seen[1]


@pytest.mark.parametrize(
    "headers",
    [
        (("x-request-id", "req_1"),),  # no Content-Type: aiohttp would add one
        (("Content-Type", "application/json"), ("Set-Cookie", "a=b")),  # not a replayed header
        (("Content-Type", "application/json\r\nX-Injected: 1"),),  # aiohttp refuses to write it
    ],
)
def test_an_entry_aiohttp_would_write_otherwise_is_left_to_the_chain(
    headers: tuple[tuple[str, str], ...],
) -> None:
    assert Entry(200, headers, b"{}", 0.0).wired("key") == (b"", b"")
    assert Entry(200, (("Content-Type", "application/json"),), b"", 0.0).wired("key") == (b"", b"")


def test_an_entry_is_wired_once_as_aiohttp_writes_its_status_and_headers() -> None:
    entry = Entry(201, (("Content-Type", "application/json"), ("x-request-id", "r")), b"{}", 0.0)
    head, length = entry.wired("key")
    assert head == (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nx-request-id: r\r\n"
        b"x-thriftgate-cache: HIT\r\nage: "
    )
    assert length == b"\r\nContent-Length: 2\r\nDate: "
    assert entry.wire is not None and entry.wired("key") == (head, length)


async def test_the_sdks_hits_take_the_lane(proxy: Proxy, fake: FakeOpenAI) -> None:
    """The official SDK keeps its connections alive: its repeated calls are the lane's hits,
    and it reads them as it reads the original answer."""
    messages = [{"role": "user", "content": "sdk express"}]

    def sync_calls() -> list[Any]:
        client = openai.OpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)
        with client:
            raw = client.chat.completions.with_raw_response.create
            return [raw(model="gpt-4o-mini", messages=messages) for _ in range(3)]

    answers = await asyncio.to_thread(sync_calls)
    assert [a.headers["x-thriftgate-cache"] for a in answers] == ["MISS", "HIT", "HIT"]
    first, *replayed = (a.parse() for a in answers)
    assert all(r.model_dump() == first.model_dump() for r in replayed)
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=API_KEY, max_retries=0
    ) as client:
        for _ in range(2):
            again = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            assert again.model_dump() == first.model_dump()
    assert express(proxy) >= 2 and hits(proxy) == 4 and fake.calls() == 1
    lines = await proxy.usage.wait(5)
    assert [line["cache"] for line in lines] == ["miss", "hit", "hit", "hit", "hit"]
