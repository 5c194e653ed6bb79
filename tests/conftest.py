"""Fixtures: the fake OpenAI upstream, the proxy in front of it, and a real redis-server."""

from __future__ import annotations

import asyncio
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from fake_openai import FakeOpenAI
from hypothesis import HealthCheck, settings
from multidict import CIMultiDict
from redis_fleet import free_port, server_args
from yarl import URL

from proxy.app import create_app
from proxy.config import Settings, load_settings
from proxy.context import RequestContextStage
from proxy.errors import ErrorStage
from proxy.keys import Keys
from proxy.logs import configure_logging
from proxy.pricing import PriceTable
from proxy.server import ProxyRunner, runner_for
from proxy.store import REDIS
from proxy.types import SETTINGS
from proxy.upstream import Reply
from proxy.usage import UsageLog

# the property tests' settings: seeded (derandomised) and bounded, so CI runs the same examples
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
API_KEY = "sk-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NO_STORE = {"Cache-Control": "no-store"}  # past the cache, to the stage under test
AUTH_NO_STORE = {**AUTH, "Cache-Control": "no-store"}  # past the cache: every call goes upstream
AUTH_JSON = {**AUTH, "Content-Type": "application/json"}


def scope_of(api_key: str, settings: Settings | None = None) -> str:
    """The keyed hash the proxy files a key's cache entries, budgets and limits under."""
    return Keys(settings or Settings()).identify(f"Bearer {api_key}").scope


class UsageSink(io.BytesIO):
    """Collects the usage log the proxy writes; ``wait(n)`` returns once n lines were written."""

    def __init__(self) -> None:
        super().__init__()
        self._written = asyncio.Event()

    def write(self, data: Any) -> int:
        n = super().write(data)
        self._written.set()
        return n

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines() if line.strip()]

    async def wait(self, n: int, within: float = 5) -> list[dict[str, Any]]:
        async with asyncio.timeout(within):
            while len(records := self.records()) < n:
                self._written.clear()
                await self._written.wait()
        return records


@dataclass
class Proxy:
    server: TestServer
    app: web.Application
    settings: Settings
    usage: UsageSink
    waits: list[float]  # the retry stage's sleeps: recorded, never slept
    client: aiohttp.ClientSession  # the tests' client (closed with the proxy)

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Answer:
    """What the proxy answered. Unpacks as ``status, headers, data``: ``data`` is the parsed
    body of a JSON answer, else its bytes (``raw``)."""

    status: int
    headers: Any
    raw: bytes

    @property
    def data(self) -> Any:
        if "json" in self.headers.get("Content-Type", "") and not self.headers.get(
            "Content-Encoding"
        ):
            return orjson.loads(self.raw)
        return self.raw

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.headers, self.data))

    def __getitem__(self, index: int) -> Any:
        return tuple(self)[index]


async def post(
    proxy: Proxy,
    body: Any,
    path: str = CHAT_PATH,
    headers: dict[str, str] | None = None,
    *,
    key: str = API_KEY,
) -> Answer:
    """The tests' one way to POST to the proxy: ``body`` as JSON (bytes: as they are), with
    ``key`` as the bearer token; ``headers`` added (or replacing those)."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    sent = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with proxy.client.post(
        proxy.url + path, data=data, headers={**sent, **(headers or {})}
    ) as r:
        return Answer(r.status, r.headers, await r.read())


class LogSink(io.BytesIO):
    def lines(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.getvalue().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def app_logs() -> LogSink:
    """The proxy's operational log (structlog JSON), captured for the whole session."""
    sink = LogSink()
    configure_logging(sink)
    return sink


@pytest.fixture(autouse=True)
def _logging(app_logs: LogSink) -> None:
    """Every test runs with the production log configuration."""


@pytest.fixture
def fake() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def upstream(fake: FakeOpenAI, aiohttp_server: Any) -> TestServer:
    return await aiohttp_server(fake.app())


MakeProxy = Callable[..., Awaitable[Proxy]]


class ProxyTestServer(TestServer):
    """A test server running the app as ``thriftgate serve`` does (``proxy.server``'s runner:
    OpenAI-envelope refusals, the header deadline, handler cancellation)."""

    def __init__(self, app: web.Application, settings: Settings) -> None:
        super().__init__(app)
        self.settings = settings

    async def _make_runner(self, **kwargs: Any) -> ProxyRunner:
        kwargs.pop("handler_cancellation", None)
        return runner_for(self.app, self.settings, **kwargs)


@pytest.fixture
async def proxy_server() -> AsyncIterator[
    Callable[[web.Application, Settings], Awaitable[TestServer]]
]:
    servers: list[TestServer] = []

    async def start(app: web.Application, settings: Settings) -> TestServer:
        server = ProxyTestServer(app, settings)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    while servers:
        await servers.pop().close()


@pytest.fixture
async def make_proxy(upstream: TestServer, proxy_server: Any) -> AsyncIterator[MakeProxy]:
    clients: list[aiohttp.ClientSession] = []

    async def make(
        env: dict[str, str] | None = None,
        retry_sleep: Callable[[float], Awaitable[None]] | None = None,
        ratelimit_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        **flags: Any,
    ) -> Proxy:
        environ = {"THRIFTGATE_UPSTREAM_URL": str(upstream.make_url("/v1")), **(env or {})}
        settings = load_settings(flags, env=environ)
        sink = UsageSink()
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            if retry_sleep is not None:
                await retry_sleep(seconds)

        app = create_app(
            settings,
            usage_stream=sink,
            retry_sleep=sleep,
            ratelimit_sleep=ratelimit_sleep,
            wall_clock=wall_clock,
            clock=clock,
            rng=rng,
        )
        server = await proxy_server(app, settings)
        # a connection per request, as an SDK client of its own would open
        client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            auto_decompress=False,  # the bytes the proxy sent
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Accept"),
        )
        clients.append(client)
        return Proxy(server, app, settings, sink, waits, client)

    yield make
    for client in clients:
        await client.close()


async def stub_handler(request: web.Request) -> web.StreamResponse:
    """Where the upstream would be: a fixed chat answer with usage, counted in the app."""
    request.app[STUB_CALLS].append(request.path)
    body = orjson.dumps(
        {
            "id": "chatcmpl-stub",
            "object": "chat.completion",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
        }
    )
    headers = CIMultiDict({"Content-Type": "application/json"})
    return Reply(status=200, reason="OK", headers=headers, body=body)


STUB_CALLS: web.AppKey[list[str]] = web.AppKey("stub_calls", list)


@dataclass
class StageApp:
    """One stage (with the request context before it) around ``stub_handler``."""

    client: Any  # aiohttp's TestClient
    usage: UsageSink

    @property
    def calls(self) -> list[str]:
        return self.client.app[STUB_CALLS]

    async def post(self, body: Any, headers: dict[str, str] | None = None) -> Answer:
        sent = {**AUTH, "Content-Type": "application/json", **(headers or {})}
        async with self.client.post(CHAT_PATH, data=orjson.dumps(body), headers=sent) as r:
            return Answer(r.status, r.headers, await r.read())


@pytest.fixture
async def stage_app(aiohttp_client: Any) -> Callable[..., Awaitable[StageApp]]:
    """``await stage_app(settings, *stages)``: the stages alone (their lifespans run as in the
    proxy), behind the error and request-context stages, in front of ``stub_handler``."""

    async def make(settings: Settings, *stages: Any) -> StageApp:
        sink = UsageSink()
        usage_log = UsageLog(sink)
        context = RequestContextStage(
            usage_log, Keys(settings), settings.server, PriceTable(settings.prices)
        )
        app = web.Application(middlewares=[ErrorStage(), context, *stages])
        app[SETTINGS] = settings
        app[REDIS] = None
        app[STUB_CALLS] = []
        for stage in stages:
            app.cleanup_ctx.append(stage.lifespan)
        app.router.add_post(CHAT_PATH, stub_handler)
        return StageApp(await aiohttp_client(app), sink)

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy()


class RedisServer:
    """A real redis-server on a free port, owned by the test session; tests may kill it."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f"default:{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        self.proc = subprocess.Popen(
            server_args(self.port, *(["--requirepass", self.password] if self.password else [])),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A running redis-server, flushed before the test."""
    if redis_server.proc is None:
        redis_server.start()
    with socket.create_connection(("127.0.0.1", redis_server.port), timeout=1) as s:
        s.sendall(b"FLUSHALL\r\n")
        s.recv(16)
    yield redis_server.url


async def collect(stream: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in stream])


async def raw_http(url: str, raw: bytes, within: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` bytes as they are (bytes no HTTP client would send) to ``url``'s host and
    port; the answer's status, headers (lower-case names) and body, read until the proxy closes
    or the body is complete."""
    parsed = URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(within):
            status, headers, _, body = await read_answer(reader)
    finally:
        writer.close()
    return status, headers, body


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bytes]:
    """One HTTP answer: its status, headers (lower-case names), every byte of it as sent, and its
    body (de-chunked; without a length or chunks, read until the connection closes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in lines[1:] if line)
    }
    sent = [head]
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
        sent.append(body)
    elif headers.get("transfer-encoding") == "chunked":
        parts = []
        while size := int((line := await reader.readline()).strip(), 16):
            chunk = await reader.readexactly(size + 2)  # and its CRLF
            sent += (line, chunk)
            parts.append(chunk[:-2])
        sent += (line, await reader.readline())  # the last chunk and the empty trailer
        body = b"".join(parts)
    else:
        body = await reader.read()
        sent.append(body)
    return int(lines[0].split(" ")[1]), headers, b"".join(sent), body


# -- the real program, as a process of its own --------------------------------------------------
class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    async def ready(self, within: float = 15) -> None:
        """Wait until the process answers /healthz (it has no other way to say it is up)."""
        async with asyncio.timeout(within), aiohttp.ClientSession() as s:
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"exited early: {self.log.read_text()}")
                try:
                    async with s.get(self.url + "/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)

    async def wait(self, within: float = 30) -> int:
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), within)


def start(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Served:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as err, log.with_suffix(".usage").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "serve", "--port", str(port), *args],
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    return Served(proc, port, log)
