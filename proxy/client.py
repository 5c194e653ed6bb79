"""A lean HTTP/1.1 client for upstream calls whose body is already in hand.

aiohttp's ``ClientSession.request`` builds a request object, a response object, a timer context,
trace hooks, cookie and header merging on every call: about three quarters of its CPU per request
(``bench/client.py``). For a request with its body as bytes — every chat, embeddings and Responses
call — this client writes the request line, the headers and the body in one transport write on a
kept-alive connection and reads the answer with aiohttp's own lower layers: its protocol
(``ResponseHandler``: the C parser, the body's ``StreamReader``, the read timeout) and its header
serialiser (which refuses CR/LF in a name or value). The bytes are aiohttp's: the same request
line, ``Host`` first and ``Content-Length`` last, the answer's body never decoded.

What it keeps: a keep-alive pool per host (``limit`` connections in all, 0 for no limit,
idle ones closed after ``keepalive_s``), TLS with the default trust store and SNI, the connect
timeout, a read timeout (the longest silence), a total timeout for the whole exchange, interim 1xx
answers skipped, a connection closed (never reused) when its answer was not read to the end or
the task was cancelled. Streamed request bodies and bodiless requests still go through aiohttp's
session.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import NamedTuple

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# HTTP/1.1 answers are read in blocks of this size (aiohttp's own default is 64 KiB too)
READ_BUFSIZE = 2**16
# a request body shorter than this goes out in one buffer with the headers (one copy, one write)
JOIN_BELOW = 16 * 1024


class CannotConnect(aiohttp.ClientConnectionError):
    """No connection to the upstream: ``os_error`` says why (DNS, refused, TLS...)."""

    def __init__(self, os_error: OSError) -> None:
        super().__init__(str(os_error))
        self.os_error = os_error


class Host(NamedTuple):
    host: str
    port: int
    tls: bool


class Answer:
    """The status line and headers of an upstream answer; its body is ``content``, read (or
    streamed) before ``release`` gives the connection back."""

    __slots__ = ("_conn", "_host", "_pool", "_timer", "content", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        pool: Connections,
        host: Host,
        conn: ResponseHandler,
        timer: asyncio.TimerHandle | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._pool = pool
        self._host = host
        self._conn: ResponseHandler | None = conn
        self._timer = timer

    async def read(self) -> bytes:
        """The whole body (the connection goes back to the pool once it is read)."""
        try:
            return await self.content.read()
        finally:
            self.release()

    def release(self) -> None:
        """Give the connection back when the answer was read to its end, else close it; safe to
        call more than once."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pool.put(self._host, conn, reusable=self.content.is_eof())


def _total_expired(conn: ResponseHandler, box: list[StreamReader]) -> None:
    """The whole exchange took longer than the total timeout: fail whatever waits on it."""
    exc = aiohttp.ServerTimeoutError("Timeout: the upstream's answer took longer than allowed")
    for payload in box:
        payload.set_exception(exc)
    conn.set_exception(exc)
    conn.close()


class Connections:
    """Kept-alive connections to the upstream hosts, and requests sent over them."""

    def __init__(
        self,
        limit: int,
        *,
        connect_timeout_s: float,
        total_timeout_s: float,
        keepalive_s: float = 30.0,
    ) -> None:
        self.limit = limit
        self.connect_timeout_s = connect_timeout_s
        self.total_timeout_s = total_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[Host, list[tuple[ResponseHandler, float]]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it first ran in

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        read_timeout_s: float | None = None,
    ) -> Answer:
        """Send ``method url`` with ``headers`` and ``body``; return once the answer's status and
        headers arrived (its body follows in ``Answer.content``)."""
        host = Host(url.raw_host or "", url.port or 0, url.scheme == "https")
        conn = await self._connection(host)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        box: list[StreamReader] = []
        timer = loop.call_later(self.total_timeout_s, _total_expired, conn, box)
        try:
            conn.set_response_params(
                auto_decompress=False,
                read_timeout=read_timeout_s,
                read_bufsize=READ_BUFSIZE,
                read_until_eof=True,  # no length, not chunked: the body ends with the connection
            )
            out = CIMultiDict(Host=url.host_port_subcomponent or "")
            out.extend(headers)
            out["Content-Length"] = str(len(body))
            head = _serialize_headers(f"{method} {url.raw_path_qs} HTTP/1.1", out)
            transport = conn.transport
            if transport is None:
                raise aiohttp.ServerDisconnectedError()
            if len(body) < JOIN_BELOW:
                transport.write(head + body)
            else:  # a large body is not copied to be joined to the headers
                transport.writelines((head, body))
            conn.start_timeout()
            while True:
                message, payload = await conn.read()
                if message.code >= 200 or message.code == 101:
                    break  # 1xx (100 Continue, 103 Early Hints) precede the answer
            box.append(payload)
        except BaseException:
            timer.cancel()
            self.put(host, conn, reusable=False)
            raise
        return Answer(
            message.code, message.reason, message.headers, payload, self, host, conn, timer
        )

    def _reuse(self, host: Host) -> ResponseHandler | None:
        """The most recently returned idle connection to ``host`` still fit to use (open, not
        to be closed, idle for less than ``keepalive_s``); the unfit ones met on the way close."""
        idle = self._idle.get(host)
        now = time.monotonic()
        while idle:
            conn, since = idle.pop()
            if conn.is_connected() and not conn.should_close and now - since < self.keepalive_s:
                return conn
            self._drop(conn)
        return None

    async def _connection(self, host: Host) -> ResponseHandler:
        conn = self._reuse(host)
        if conn is not None:
            return conn
        while self.limit and self._open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif not waiter.cancelled():
                    self._wake()  # this task was woken for a slot it will not take
                raise
            conn = self._reuse(host)
            if conn is not None:
                return conn
        self._open += 1
        try:
            return await self._connect(host)
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _connect(self, host: Host) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        if host.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    host.host,
                    host.port or (443 if host.tls else 80),
                    ssl=self._tls if host.tls else None,
                    server_hostname=host.host if host.tls else None,
                )
        except TimeoutError:
            raise aiohttp.ConnectionTimeoutError(
                f"Connection timeout to host {host.host}:{host.port}"
            ) from None
        except OSError as exc:
            raise CannotConnect(exc) from None
        return conn

    def put(self, host: Host, conn: ResponseHandler, *, reusable: bool) -> None:
        """A connection back from a request: kept for the next one to ``host`` when its answer
        was read whole and it may stay open, else closed."""
        if reusable and not self._closed and conn.is_connected() and not conn.should_close:
            self._idle.setdefault(host, []).append((conn, time.monotonic()))
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().call_later(self.keepalive_s, self._sweep)
        else:
            self._drop(conn)
        self._wake()

    def _drop(self, conn: ResponseHandler) -> None:
        conn.close()
        self._open -= 1

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        """Close the connections idle for longer than ``keepalive_s``."""
        self._sweeper = None
        deadline = time.monotonic() - self.keepalive_s
        for host, idle in list(self._idle.items()):
            keep = []
            for conn, since in idle:
                if since > deadline and conn.is_connected():
                    keep.append((conn, since))
                else:
                    self._drop(conn)
            if keep:
                self._idle[host] = keep
            else:
                del self._idle[host]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive_s, self._sweep)
        self._wake()

    async def close(self) -> None:
        """Close every idle connection (those in use close when their answers are released)."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn, _ in idle:
                self._drop(conn)
        self._idle.clear()
