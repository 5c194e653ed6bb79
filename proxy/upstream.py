"""Forwarding to the upstream, byte for byte, and the reply object that streams the answer back.

A ``Reply`` is an aiohttp response whose body is pumped from the upstream when aiohttp sends it,
so every stage of the chain can look at the status and headers, add its own headers and register
observers for the body before the first byte goes out, and a stream passes through chunk by chunk.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.client import Answer, CannotConnect, Connections
from proxy.config import UpstreamSettings
from proxy.errors import PayloadTooLarge, RequestTimeout, UpstreamTimeout, UpstreamUnavailable
from proxy.inbound import PREFIX
from proxy.pool import Target

log = structlog.get_logger("thriftgate.upstream")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# An answer of known length up to this size is read whole and sent in one write (not a stream).
SMALL_BODY = 256 * 1024
# Idle upstream connections are closed after this long (both clients' pools).
KEEPALIVE_S = 30.0
# Headers aiohttp's client would otherwise add on its own: a transparent proxy adds nothing.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def end_to_end(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], *also: str, prefix: str | None = None
) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop ones (the fixed set and those Connection names),
    without the names in ``also`` and without any name starting with ``prefix``."""
    if prefix is not None:
        out = CIMultiDict((k, v) for k, v in headers.items() if not k.lower().startswith(prefix))
    else:
        out = CIMultiDict(headers)
    named = [
        token.strip()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
        if token.strip()
    ]
    for name in (*HOP_BY_HOP, *named, *also):
        out.popall(name, None)
    return out


@dataclass(slots=True)
class Delivery:
    """How a reply's body ended: ``error`` is None when it was delivered whole."""

    error: str | None
    bytes_sent: int
    first_byte_at: float | None  # time.monotonic() when the first body byte went to the client


Observer = Callable[[bytes], None]
DoneCallback = Callable[[Delivery], None]


class Transform(Protocol):
    """Rewrites a streamed body on its way to the client (observers see the rewritten bytes)."""

    # usage the transform took out of the body (the client did not ask for it), else None
    usage: dict[str, Any] | None

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...


class Reply(web.StreamResponse):
    """A response whose body comes from the ``upstream`` response (or is the fixed ``body``),
    sent when aiohttp sends it."""

    def __init__(
        self,
        *,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        upstream: aiohttp.ClientResponse | Answer | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._upstream = upstream
        self._fixed = body
        self._request: web.BaseRequest | None = None
        self._done = False
        self.observers: list[Observer] = []
        self.on_done: list[DoneCallback] = []
        self.transform: Transform | None = None  # streamed bodies only
        if body is not None:
            self.content_length = len(body)
            self._read_whole = False
        else:
            # a small answer of known length, not an event stream, is read whole
            length = headers.get("Content-Length", "")
            self._read_whole = (
                length.isdigit()
                and int(length) <= SMALL_BODY
                and not headers.get("Content-Type", "").startswith("text/event-stream")
            )
        if body is not None or self._read_whole:
            # the headers go out with the body, in one write, as aiohttp's own Response does
            self._send_headers_immediately = False

    @property
    def whole(self) -> bool:
        """The body is taken whole before it is sent (a fixed body, or a small known length)."""
        return self._read_whole or (self._fixed is not None and self._upstream is None)

    @property
    def body_bytes(self) -> bytes | None:
        """The whole body, once taken (see ``whole``); None for a streamed body."""
        return self._fixed

    async def read(self) -> bytes:
        """Take the whole body from the upstream now (before anything is sent) and keep it."""
        if self._fixed is None:
            self._fixed = await self._upstream.read() if self._upstream is not None else b""
            self.release()
        return self._fixed

    def release(self) -> None:
        """Give the upstream connection back (or close it if the body was not read whole);
        safe to call more than once."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.release()

    async def prepare(self, request: web.BaseRequest) -> aiohttp.AbstractStreamWriter | None:
        self._request = request
        try:
            return await super().prepare(request)
        except BaseException:
            self._finish(Delivery("client_disconnected", 0, None))
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        if self._done:
            return
        sent = 0
        first: float | None = None
        try:
            if self._fixed is None and self._read_whole:
                await self.read()  # a small answer of known length goes out in one write
            if self._fixed is not None:
                if self._fixed:
                    first = time.monotonic()
                    for observe in self.observers:
                        observe(self._fixed)
                sent = len(self._fixed)
                await super().write_eof(self._fixed)
            else:
                assert self._upstream is not None
                transform = self.transform
                async for raw in self._upstream.content.iter_any():
                    chunk = transform.feed(raw) if transform is not None else raw
                    if not chunk:
                        continue
                    if first is None:
                        first = time.monotonic()
                    for observe in self.observers:
                        observe(chunk)
                    await self.write(chunk)
                    sent += len(chunk)
                rest = transform.end() if transform is not None else b""
                if rest:
                    for observe in self.observers:
                        observe(rest)
                    sent += len(rest)
                await super().write_eof(rest + data)
        except asyncio.CancelledError:
            self._finish(Delivery("client_disconnected", sent, first))
            raise
        except ConnectionError:
            self._finish(Delivery("client_disconnected", sent, first))
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The upstream failed mid-body: end the client's connection without a clean end of
            # message (no terminating chunk, no fake [DONE]) so the client sees an error at once.
            reason = (
                "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_disconnected"
            )
            log.warning("upstream_body_failed", reason=reason, bytes_sent=sent, error=repr(exc))
            self._finish(Delivery(reason, sent, first))
            if self._request is not None and self._request.transport is not None:
                self._request.transport.close()
            return
        self._finish(Delivery(None, sent, first))

    def _finish(self, delivery: Delivery) -> None:
        if self._done:
            return
        self._done = True
        self.release()
        callbacks, self.on_done, self.observers = self.on_done, [], []  # no cycles left behind
        for callback in callbacks:
            try:
                callback(delivery)
            except Exception:
                log.exception("reply_callback_failed")


def _expire(task: asyncio.Task[object], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def where(url: URL) -> str:
    """host:port of an upstream URL (never its credentials or path)."""
    return f"{url.host}:{url.port}" if url.port is not None else str(url.host)


def unreachable(exc: BaseException, settings: UpstreamSettings | None = None) -> str:
    """Why an upstream could not be reached, in words a person can act on."""
    settings = settings or UpstreamSettings()
    if isinstance(exc, CannotConnect):  # the lean client's: the OSError itself
        return _cannot_connect(exc.os_error)
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return _cannot_connect(exc.certificate_error)
    if isinstance(exc, aiohttp.ClientConnectorError):  # aiohttp's: DNS, TLS, refused...
        return _cannot_connect(exc.os_error, dns=isinstance(exc, aiohttp.ClientConnectorDNSError))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return (
            f"no connection within {settings.connect_timeout_s:g} s "
            "(upstream.connect_timeout_s; a firewall, or a wrong address?)"
        )
    if isinstance(exc, TimeoutError):
        return f"it stopped answering for {settings.idle_timeout_s:g} s (upstream.idle_timeout_s)"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection without answering"
    if isinstance(exc, aiohttp.ClientOSError):
        return f"the connection failed ({exc.strerror or type(exc).__name__})"
    return type(exc).__name__


def _cannot_connect(os_error: OSError, *, dns: bool = False) -> str:
    if dns or isinstance(os_error, socket.gaierror):
        return "its name does not resolve (DNS); check the host name in the upstream URL"
    if isinstance(os_error, ssl.SSLCertVerificationError):
        return "its TLS certificate was refused (is the host name right, and the CA trusted?)"
    if isinstance(os_error, ssl.SSLError):
        return "the TLS handshake failed (is it an https:// URL for a server that speaks TLS?)"
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused (nothing listens on that port: is the upstream running?)"
    reason = os_error.strerror if os_error.strerror else type(os_error).__name__
    return f"cannot connect ({reason})"


class _BodyCounter:
    """Streams a request body upstream, stopping it past the size limit or after a pause longer
    than ``idle_s`` (the client stopped sending)."""

    def __init__(
        self,
        source: aiohttp.StreamReader,
        limit: int,
        idle_s: float,
        observe: Callable[[bytes], None] | None = None,
    ) -> None:
        self.source = source
        self.observe = observe  # sees each chunk as it goes (a multipart upload's form fields)
        self.limit = limit
        self.idle_s = idle_s
        self.seen = 0
        self.exceeded = False
        self.stalled = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self.idle_s):
                    chunk = await self.source.readany()
            except TimeoutError:
                self.stalled = True
                raise RequestTimeout(
                    f"The request body paused for more than {self.idle_s:g} s"
                ) from None
            if not chunk:
                return
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.exceeded = True
                raise PayloadTooLarge(f"The request body is larger than {self.limit} bytes")
            if self.observe is not None:
                self.observe(chunk)
            yield chunk


class Upstream:
    """Sends requests to one of the configured OpenAI-compatible base URLs."""

    def __init__(
        self,
        settings: UpstreamSettings,
        session: aiohttp.ClientSession,
        connections: Connections | None = None,
    ) -> None:
        self.settings = settings
        self.session = session
        # requests with their body in hand go through the lean client (proxy.client), the rest
        # (a streamed body, no body) through aiohttp's session
        self.connections = connections
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it first ran in
        # connect and total are aiohttp's; time to first byte is a timer around the wait for the
        # status line (cheaper than sock_read, which re-arms a timer on every read); streams also
        # get sock_read, the longest silence between two chunks
        self.timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s, connect=settings.connect_timeout_s
        )
        self.stream_timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s,
            connect=settings.connect_timeout_s,
            sock_read=settings.idle_timeout_s,
        )

    @staticmethod
    def open_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            ttl_dns_cache=300,
            keepalive_timeout=KEEPALIVE_S,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            skip_auto_headers=SKIP_AUTO_HEADERS,
            raise_for_status=False,
        )

    @staticmethod
    def open_connections(settings: UpstreamSettings) -> Connections:
        return Connections(
            settings.max_connections,
            connect_timeout_s=settings.connect_timeout_s,
            total_timeout_s=settings.total_timeout_s,
            keepalive_s=KEEPALIVE_S,
        )

    @staticmethod
    def url(request: web.BaseRequest, base: str, base_query: str = "") -> URL:
        """``/v1/<rest>?<query>`` → ``<base>/<rest>?<base query>&<query>``, raw bytes
        preserved (the path was checked: it cannot leave ``base``)."""
        raw = request.raw_path
        rest = raw[3:] if raw.startswith("/v1") else raw
        if base_query:
            path, sep, query = rest.partition("?")
            rest = f"{path}?{base_query}&{query}" if sep and query else f"{path}?{base_query}"
        return URL(base + rest, encoded=True)

    @staticmethod
    def request_headers(
        request: web.BaseRequest,
        api_key: str | None,
        *,
        fixed_body: bool,
        rewritten: bool = False,
        control: tuple[str, ...] | None = None,
    ) -> CIMultiDict[str]:
        """The headers to send: the client's end-to-end ones, less ``Host`` and the proxy's own
        (``control``: the x-thriftgate-* names the request had, read once by the context stage;
        None: look for them here)."""
        # with the body in hand, aiohttp sets Content-Length from the bytes, to the same value;
        # a body a stage re-serialised is plain JSON, whatever encoding the client's had
        drop = (
            "Host",
            *(("Content-Length",) if fixed_body else ()),
            *(("Content-Encoding",) if rewritten else ()),
        )
        if control is None:
            headers = end_to_end(
                request.headers, *drop, prefix=PREFIX
            )  # x-thriftgate-*: never sent upstream
        else:
            headers = end_to_end(request.headers, *drop, *control)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    async def forward(
        self,
        request: web.BaseRequest,
        body: bytes | None,
        max_body: int,
        target: Target,
        *,
        stream: bool = False,
        rewritten: bool = False,
        body_idle_s: float = 60.0,
        control: tuple[str, ...] | None = None,
        observe: Callable[[bytes], None] | None = None,
    ) -> Reply:
        """Send the request upstream and return the reply once its status and headers arrived.

        ``body`` is the already-read request body (``rewritten``: re-serialised by a stage, so
        plain JSON), or None to stream the client's body through.
        """
        data: bytes | _BodyCounter | None = body
        if body is None and request.body_exists:
            length = request.content_length
            if length is not None and length > max_body:
                raise PayloadTooLarge(
                    f"The request body ({length} bytes) is larger than this proxy's limit of "
                    f"{max_body} bytes"
                )
            data = _BodyCounter(request.content, max_body, body_idle_s, observe)
        headers = self.request_headers(
            request,
            target.api_key,
            fixed_body=body is not None,
            rewritten=rewritten,
            control=control,
        )
        if target.basic_auth is not None and "Authorization" not in headers:
            headers["Authorization"] = target.basic_auth  # the URL's user-info, when nothing else
        url = self.url(request, target.base, target.base_query)
        # time to first byte: one timer that cancels this task (lighter than asyncio.timeout)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        expired: list[bool] = []
        timer = loop.call_later(self.settings.first_byte_timeout_s, _expire, task, expired)
        try:
            resp: aiohttp.ClientResponse | Answer
            if (
                self.connections is not None
                and isinstance(data, bytes)
                and request.method != "HEAD"
            ):
                resp = await self.connections.send(
                    request.method,
                    url,
                    headers,
                    data,
                    read_timeout_s=self.settings.idle_timeout_s if stream else None,
                )
            else:
                resp = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    timeout=self.stream_timeout if stream else self.timeout,
                    allow_redirects=False,
                )
        except asyncio.CancelledError:
            if not expired:
                raise
            task.uncancel()
            raise UpstreamTimeout(
                f"The upstream {where(url)} did not start answering within "
                f"{self.settings.first_byte_timeout_s:g} s (upstream.first_byte_timeout_s)"
            ) from None
        except (PayloadTooLarge, RequestTimeout):
            raise
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The upstream {where(url)} could not be reached: {unreachable(exc, self.settings)}"
            ) from None
        except aiohttp.ClientError as exc:
            if isinstance(data, _BodyCounter) and data.exceeded:
                raise PayloadTooLarge(f"The request body is larger than {max_body} bytes") from None
            if isinstance(data, _BodyCounter) and data.stalled:
                raise RequestTimeout(
                    f"The request body paused for more than {body_idle_s:g} s"
                ) from None
            raise UpstreamUnavailable(
                f"The upstream {where(url)} could not be reached: {unreachable(exc, self.settings)}"
            ) from None
        finally:
            timer.cancel()
        return Reply(
            status=resp.status,
            reason=resp.reason,
            headers=end_to_end(resp.headers),
            upstream=resp,
        )
