"""Forwarding to the upstream, byte for byte, and the reply object that streams the answer back.

A ``Reply`` is an aiohttp response whose body is pumped from the upstream when aiohttp sends it,
so every stage of the chain can look at the status and headers, add its own headers and register
observers for the body before the first byte goes out, and a stream passes through chunk by chunk.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.errors import PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable

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
# Headers aiohttp's client would otherwise add on its own: a transparent proxy adds nothing.
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The hop-by-hop header names of a message: the fixed set plus those named in Connection."""
    names = set(HOP_BY_HOP)
    for value in headers.getall("Connection", ()):
        names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


@dataclass(slots=True)
class Outcome:
    """How a reply's body ended: ``error`` is None when it was delivered whole."""

    error: str | None
    bytes_sent: int
    first_byte_at: float | None  # time.monotonic() when the first body byte went to the client


Observer = Callable[[bytes], None]
DoneCallback = Callable[[Outcome], None]


class Reply(web.StreamResponse):
    """A response whose body comes from ``source`` (or fixed ``body``) when aiohttp sends it."""

    def __init__(
        self,
        *,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        source: AsyncIterator[bytes] | None = None,
        body: bytes | None = None,
        release: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(status=status, reason=reason, headers=headers)
        self._source = source
        self._fixed = body
        self._release = release
        self._request: web.BaseRequest | None = None
        self._done = False
        self.observers: list[Observer] = []
        self.on_done: list[DoneCallback] = []
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            self.content_length = int(length)
        elif body is not None:
            self.content_length = len(body)

    async def read(self) -> bytes:
        """Take the whole body from the upstream now (before anything is sent) and keep it."""
        if self._fixed is None:
            chunks: list[bytes] = []
            if self._source is not None:
                async for chunk in self._source:
                    chunks.append(chunk)
            self._fixed = b"".join(chunks)
            self._source = None
            self.release()
        return self._fixed

    def release(self) -> None:
        """Close the upstream response; safe to call more than once."""
        release, self._release = self._release, None
        if release is not None:
            release()

    async def prepare(self, request: web.BaseRequest) -> aiohttp.AbstractStreamWriter | None:
        self._request = request
        try:
            return await super().prepare(request)
        except BaseException:
            self._finish(Outcome("client_disconnected", 0, None))
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        if self._done:
            return
        sent = 0
        first: float | None = None
        try:
            chunks = _once(self._fixed) if self._fixed is not None else self._source
            if chunks is not None:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if first is None:
                        first = time.monotonic()
                    for observe in self.observers:
                        observe(chunk)
                    await self.write(chunk)
                    sent += len(chunk)
            await super().write_eof(data)
        except asyncio.CancelledError:
            self._finish(Outcome("client_disconnected", sent, first))
            raise
        except ConnectionError:
            self._finish(Outcome("client_disconnected", sent, first))
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The upstream failed mid-body: end the client's connection without a clean end of
            # message (no terminating chunk, no fake [DONE]) so the client sees an error at once.
            reason = (
                "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_disconnected"
            )
            log.warning("upstream_body_failed", reason=reason, bytes_sent=sent, error=repr(exc))
            self._finish(Outcome(reason, sent, first))
            if self._request is not None and self._request.transport is not None:
                self._request.transport.close()
            return
        self._finish(Outcome(None, sent, first))

    def _finish(self, outcome: Outcome) -> None:
        if self._done:
            return
        self._done = True
        self.release()
        for callback in self.on_done:
            try:
                callback(outcome)
            except Exception:
                log.exception("reply_callback_failed")


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


class _BodyCounter:
    """Streams a request body of unknown length upstream, stopping it past the size limit."""

    def __init__(self, source: aiohttp.StreamReader, limit: int) -> None:
        self.source = source
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.source.iter_any():
            self.seen += len(chunk)
            if self.seen > self.limit:
                self.exceeded = True
                raise PayloadTooLarge(f"The request body is larger than {self.limit} bytes")
            yield chunk


class Upstream:
    """Sends requests to the configured OpenAI-compatible base URL."""

    def __init__(self, settings: UpstreamSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.base = settings.url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s,
            connect=settings.connect_timeout_s,
            sock_read=settings.first_byte_timeout_s,
        )

    @staticmethod
    def open_session(settings: UpstreamSettings) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            ttl_dns_cache=300,
            keepalive_timeout=30,
        )
        return aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # never carry one client's cookies to another
            skip_auto_headers=SKIP_AUTO_HEADERS,
            raise_for_status=False,
        )

    def target(self, request: web.BaseRequest) -> URL:
        """``/v1/<rest>?<query>`` → ``<base>/<rest>?<query>``, raw bytes preserved."""
        raw = request.raw_path
        rest = raw[3:] if raw.startswith("/v1") else raw
        return URL(self.base + rest, encoded=True)

    def request_headers(self, request: web.BaseRequest, *, fixed_body: bool) -> CIMultiDict[str]:
        drop = hop_by_hop(request.headers) | {"host"}
        if fixed_body:
            drop.add("content-length")  # aiohttp sets it from the bytes, to the same value
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
        if self.settings.api_key:
            headers["Authorization"] = f"Bearer {self.settings.api_key}"
        return headers

    async def forward(self, request: web.BaseRequest, body: bytes | None, max_body: int) -> Reply:
        """Send the request upstream and return the reply once its status and headers arrived.

        ``body`` is the already-read request body, or None to stream the client's body through.
        """
        data: bytes | _BodyCounter | None = body
        if body is None and request.body_exists:
            length = request.content_length
            if length is not None and length > max_body:
                raise PayloadTooLarge(
                    f"The request body ({length} bytes) is larger than this proxy's limit of "
                    f"{max_body} bytes"
                )
            data = _BodyCounter(request.content, max_body)
        headers = self.request_headers(request, fixed_body=body is not None)
        url = self.target(request)
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout_s):
                resp = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
        except PayloadTooLarge:
            raise
        except TimeoutError:
            raise UpstreamTimeout(
                f"The upstream did not answer within the proxy's time limit ({url.host})"
            ) from None
        except aiohttp.ClientError as exc:
            if isinstance(data, _BodyCounter) and data.exceeded:
                raise PayloadTooLarge(f"The request body is larger than {max_body} bytes") from None
            raise UpstreamUnavailable(
                f"The upstream {url.host} could not be reached: {type(exc).__name__}"
            ) from None
        drop = hop_by_hop(resp.headers)
        out = CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in drop)
        return Reply(
            status=resp.status,
            reason=resp.reason,
            headers=out,
            source=resp.content.iter_any(),
            release=resp.release,
        )
