"""Exact-match response cache for the text endpoints (chat, completions, embeddings, Responses),
with single-flight.

Key: SHA-256 over the endpoint path and query string, the canonical JSON of the body as it will be
sent upstream (after any trimming or output limit; keys sorted, no whitespace) and the scope (the
API key's keyed hash plus organization and project, or "shared"). A body the proxy cannot read, or
cannot write back canonically, is never cached (``BYPASS``).
Only complete 2xx answers are stored: a stream once its ``[DONE]`` went by (a Responses stream:
once its last event is ``response.completed``), never a cut one; never a Responses request that
is ``background`` or on a ``conversation`` (``replayable``). A hit
returns the stored body bytes (decoded, so any client can read them) with the original answer's
``content-type``, ``openai-*`` and ``x-request-id`` headers, ``x-thriftgate-cache: HIT`` and
``age``. While a non-streaming request is in flight, identical ones wait for its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import orjson
import structlog
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict

from proxy.config import CacheSettings
from proxy.context import RequestContext, context_of
from proxy.decoding import Decoder, decoded
from proxy.endpoints import EMBEDDINGS, RESPONSES
from proxy.metrics import Metrics
from proxy.outcome import Outcome
from proxy.store import REDIS, RedisGuard, Shared
from proxy.types import Clock, Handler, Stage
from proxy.upstream import Reply

log = structlog.get_logger("thriftgate.cache")

CACHE_HEADER = "x-thriftgate-cache"
_MAGIC = b"TGC1"
MAX_TTL_S = 10 * 365 * 86400  # what reaches Redis as an expiry, at most


@dataclass(slots=True)
class Entry:
    """A stored answer (never changed once made: not ``frozen`` only because a frozen dataclass
    costs every miss that stores one a slower constructor)."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # time.time()
    usage: dict[str, Any] | None = None  # the original answer's usage, for the usage log
    expires_at: float = float("inf")  # time.time() past which it is not served
    # made at its first hit, for every later one (``prepare``): the answer's headers as a hit
    # sends them (but ``age``), its x-request-id, the key's request_hash, the accounting memo
    replay: tuple[tuple[str, str], ...] | None = field(default=None, init=False, compare=False)
    request_id: str | None = field(default=None, init=False, compare=False)
    request_hash: str | None = field(default=None, init=False, compare=False)
    memo: dict[Any, Any] | None = field(default=None, init=False, compare=False)
    # made at its first express-lane hit (``wired``): the answer's bytes as the chain's hit would
    # write them, around the two that change (``age``, ``Date``); b"" when the lane leaves it
    wire: tuple[bytes, bytes] | None = field(default=None, init=False, compare=False)

    def prepare(self, key: str) -> tuple[tuple[str, str], ...]:
        """What every hit on this entry shares, made once (``replay``)."""
        for name, value in self.headers:
            if name == "x-request-id":
                self.request_id = value
        self.request_hash = request_hash(key)
        self.memo = {}
        self.replay = (*self.headers, (CACHE_HEADER, "HIT"))
        return self.replay

    def wired(self, key: str) -> tuple[bytes, bytes]:
        """``wire``, made once: the status line and the replayed headers up to ``age: ``, then
        from the end of ``age`` to ``Date: ``, as aiohttp writes a hit (``web.Response`` adds
        ``Content-Length``, ``Date`` and ``Server`` after the headers given to it). Empty (the
        chain answers) for an answer aiohttp would add more to: no ``Content-Type``, no body, a
        header this proxy does not replay (an entry written to Redis by something else)."""
        replay = self.replay if self.replay is not None else self.prepare(key)
        names = {name for name, _ in self.headers}
        self.wire = (b"", b"")
        if self.body and "Content-Type" in names and names <= _REPLAYED_NAMES:
            try:
                reason = HTTPStatus(self.status).phrase
            except ValueError:
                reason = ""
            with contextlib.suppress(ValueError):  # a header aiohttp would refuse to write
                head = _serialize_headers(f"HTTP/1.1 {self.status} {reason}", CIMultiDict(replay))
                self.wire = (
                    head[:-2] + b"age: ",
                    b"\r\nContent-Length: %d\r\nDate: " % len(self.body),
                )
        return self.wire

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 64

    def encode(self, compress_min: int) -> bytes:
        meta = orjson.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "t": self.stored_at,
                "u": self.usage,
                "x": self.expires_at if self.expires_at != float("inf") else None,
            }
        )
        payload = struct.pack(">I", len(meta)) + meta + self.body
        if len(payload) >= compress_min:
            return _MAGIC + b"z" + zlib.compress(payload, 6)
        return _MAGIC + b"-" + payload

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        if data[:4] != _MAGIC or data[4:5] not in (b"z", b"-"):
            raise ValueError("not a thriftgate cache entry")
        payload = zlib.decompress(data[5:]) if data[4:5] == b"z" else data[5:]
        (n,) = struct.unpack(">I", payload[:4])
        meta = orjson.loads(payload[4 : 4 + n])
        headers = tuple((str(k), str(v)) for k, v in meta["h"])
        usage = meta.get("u")
        expires = meta.get("x")
        return cls(
            int(meta["s"]),
            headers,
            payload[4 + n :],
            float(meta["t"]),
            usage if isinstance(usage, dict) else None,
            float(expires) if expires is not None else float("inf"),
        )


def cache_key(endpoint: str, body: dict[str, Any], scope: str, query: str = "") -> str:
    """Raises ``TypeError`` for a body orjson cannot write (nested too deep)."""
    digest = hashlib.sha256(endpoint.encode("utf-8", "surrogateescape"))
    if query:
        digest.update(b"?" + query.encode("utf-8", "surrogateescape"))
    digest.update(b"\n")
    digest.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    digest.update(b"\n")
    digest.update(scope.encode())
    return digest.hexdigest()


class Backend(Protocol):
    name: str

    remote: bool  # ``get`` may find what ``peek`` did not (it asks Redis)

    def peek(self, key: str) -> Entry | None:
        """The entry if it is in this process, at once (no I/O)."""

    async def get(self, key: str) -> Entry | None: ...

    def store(self, key: str, entry: Entry, ttl_s: float) -> None:
        """Keep ``entry``: at once, or in the background (never holding up the answer)."""

    async def drain(self) -> None:
        """Wait for stores still under way."""


# A stored answer in the memory cache until its first hit: one bytes object (its expiry and size,
# then ``Entry.encode``). Every object a miss keeps alive costs the process far more than making
# it (measured in bench/: ~3-6 us per object kept per miss, the allocator's memory no longer
# reused while hot), so an answer nobody asks for again costs two objects (this and its key); the
# first hit turns it into the ``Entry`` the later ones share.
_COMPACT = struct.Struct("<dq")  # expiry (clock), size (``Entry.size``)
_NEVER_COMPRESSED = 1 << 62


class MemoryBackend:
    """In-process LRU bounded by the total size of its entries, each with its own expiry."""

    name = "memory"

    def __init__(self, max_bytes: int, metrics: Metrics, clock: Clock = time.time) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.clock = clock
        self.bytes = 0
        # compact (bytes, see ``_COMPACT``) until hit, then (entry, expiry, size)
        self._entries: OrderedDict[str, bytes | tuple[Entry, float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[str]:
        """The keys held, least recently used first."""
        return list(self._entries)

    remote = False  # ``peek`` is all there is: no ``get`` to await after it

    def peek(self, key: str) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        if type(found) is bytes:
            expires, size = _COMPACT.unpack_from(found)
            if expires <= self.clock():
                self._drop(key)
                return None
            entry = Entry.decode(found[_COMPACT.size :])
            self._entries[key] = (entry, expires, size)
        else:
            entry, expires, _ = found  # type: ignore[misc,assignment]  # the unpacked form
            if expires <= self.clock():
                self._drop(key)
                return None
        self._entries.move_to_end(key)
        return entry

    async def get(self, key: str) -> Entry | None:
        return self.peek(key)

    async def drain(self) -> None:
        return None

    def store(self, key: str, entry: Entry, ttl_s: float, *, hit: bool = False) -> None:
        """Keep ``entry`` (compact; as it is when it was just ``hit``, fetched from Redis)."""
        size = entry.size
        if size > self.max_bytes or ttl_s <= 0:
            return
        if key in self._entries:
            self._drop(key)
        expires = self.clock() + ttl_s
        if hit:
            self._entries[key] = (entry, expires, size)
        else:
            self._entries[key] = _COMPACT.pack(expires, size) + entry.encode(_NEVER_COMPRESSED)
        self.bytes += size
        while self.bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self.metrics.cache["eviction"] += 1
        self.metrics.cache_bytes = self.bytes

    def _drop(self, key: str) -> None:
        found = self._entries.pop(key)
        self.bytes -= _COMPACT.unpack_from(found)[1] if type(found) is bytes else found[2]


class RedisBackend(Shared[MemoryBackend | None]):
    """Entries under ``<prefix><sha256 hex>`` with a Redis expiry; one key per entry, so it fits
    Redis Cluster. Entries of ``compress_min`` bytes or more are stored zlib-compressed.

    With ``local`` (an in-process LRU), the hottest answers are also kept in memory until their
    own expiry: a hit on them needs no Redis round trip, and they keep being served while Redis
    is down."""

    name = "redis"

    def __init__(
        self,
        guard: RedisGuard,
        prefix: str,
        compress_min: int,
        local: MemoryBackend | None = None,
    ) -> None:
        super().__init__(guard, local)
        self.prefix = prefix
        self.compress_min = compress_min

    remote = True

    def peek(self, key: str) -> Entry | None:
        return self.local.peek(key) if self.local is not None else None

    async def get(self, key: str) -> Entry | None:
        if self.local is not None and (entry := self.local.peek(key)) is not None:
            return entry
        data = await self.call(lambda r: r.get(self.prefix + key), None, "cache_get")
        if data is None:
            return None
        try:
            entry = Entry.decode(data)  # type: ignore[arg-type]  # bytes: responses not decoded
        except (ValueError, KeyError, TypeError, zlib.error, struct.error):
            log.warning("cache_entry_unreadable", key=key[:16])
            return None
        if self.local is not None:
            self.local.store(key, entry, entry.expires_at - self.local.clock(), hit=True)
        return entry

    def store(self, key: str, entry: Entry, ttl_s: float) -> None:
        if self.local is not None:
            self.local.store(key, entry, ttl_s)
        self.tasks.spawn(self._set(key, entry, ttl_s))

    async def _set(self, key: str, entry: Entry, ttl_s: float) -> None:
        data = entry.encode(self.compress_min)
        ttl_ms = max(1, int(min(ttl_s, MAX_TTL_S) * 1000))
        name = self.prefix + key
        await self.call(lambda r: r.set(name, data, px=ttl_ms), None, "cache_set")


# Headers of the original answer that a hit replays (stale x-ratelimit-* and cookies are not).
REPLAYED_HEADERS = (
    "Content-Type",
    "x-request-id",
    "openai-organization",
    "openai-project",
    "openai-version",
    "openai-processing-ms",
    "openai-model",
)


_REPLAYED_NAMES = frozenset(REPLAYED_HEADERS)
_SERVER = f"\r\nServer: {SERVER_SOFTWARE}\r\n\r\n".encode()


def _replayed(headers: CIMultiDict[str]) -> tuple[tuple[str, str], ...]:
    return tuple((name, v) for name in REPLAYED_HEADERS if (v := headers.get(name)) is not None)


class _BodyRecorder:
    """Keeps a decoded copy of an answer's body, up to a size limit."""

    __slots__ = ("_chunks", "_decoder", "_limit", "_size", "too_big")

    def __init__(self, content_encoding: str | None, limit: int) -> None:
        self._decoder = Decoder(content_encoding) if content_encoding else None
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.too_big = False

    def feed(self, chunk: bytes) -> None:
        if self.too_big:
            return
        data = self._decoder.feed(chunk) if self._decoder is not None else chunk
        self._size += len(data)
        if self._size > self._limit:
            self.too_big = True
            self._chunks.clear()
        else:
            self._chunks.append(data)

    def body(self, *, stream: bool, responses: bool = False) -> bytes | None:
        """The whole decoded body, or None if it cannot be stored (too big, undecodable, a
        stream that did not end with ``[DONE]``, or for the Responses API with its
        ``response.completed`` event)."""
        if self.too_big or (self._decoder is not None and self._decoder.failed):
            return None
        body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        if stream and not (completed(body) if responses else done_stream(body)):
            return None
        return body


def done_stream(body: bytes) -> bool:
    return body[-64:].rstrip().endswith(b"data: [DONE]")


def completed(body: bytes) -> bool:
    """A Responses event stream whose last event is ``response.completed`` (not ``failed``,
    ``incomplete`` or cut short)."""
    last = body.rstrip().rfind(b"\n\n")
    event = body[last + 2 :] if last >= 0 else body
    return event.startswith(b"event: response.completed\n") and event.rstrip().endswith(b"}")


def replayable(body: dict[str, Any] | None) -> bool:
    """A Responses request whose answer may be served again. Not a ``background`` one (its answer
    is a job that changes state), not one on a ``conversation`` (the answer is appended to it
    upstream, and a replay would not append it)."""
    if body is None:
        return False
    return body.get("background") is not True and body.get("conversation") in (None, "")


class Keyer:
    """Which requests the cache would keep, and under what key (the stage's, and with the cache
    off or bypassed, the usage line's ``request_hash``: what ``thriftgate usage --what-if``
    replays to tell what the cache would have saved)."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    def eligible(self, ctx: RequestContext) -> bool:
        excluded = self.settings.exclude_models
        if excluded and any(fnmatch.fnmatchcase(ctx.model or "", p) for p in excluded):
            return False
        if ctx.endpoint == RESPONSES and not replayable(ctx.body):
            return False
        if self.settings.only_temperature_zero and ctx.endpoint != EMBEDDINGS:
            assert ctx.body is not None
            return ctx.body.get("temperature") == 0
        return True

    def scope(self, ctx: RequestContext) -> str:
        if self.settings.scope == "shared":
            return "shared"
        return f"{ctx.who.scope}|{ctx.organization or ''}|{ctx.project or ''}"

    def key(self, ctx: RequestContext) -> str | None:
        """The cache key of a readable request the cache would keep, else None."""
        if ctx.unreadable is not None or ctx.body is None or not self.eligible(ctx):
            return None
        try:
            key = cache_key(ctx.endpoint, ctx.body, self.scope(ctx), ctx.query)
        except TypeError:  # nested deeper than orjson writes
            ctx.unreadable = "body"
            return None
        ctx.cache_key = key
        return key

    def request_hash(self, ctx: RequestContext, answered: bool) -> str | None:
        """The usage line's ``request_hash``: of the key the cache looked up, and for an
        ``answered`` request the cache did not key (off, bypassed by ``Cache-Control:
        no-store``) of its key as if the cache were on. Made when the request is concluded (a
        hit takes its entry's, made once)."""
        if ctx.request_hash is None:
            if ctx.cache_key is None and answered and ctx.optimised:
                self.key(ctx)
            if ctx.cache_key is not None:
                ctx.request_hash = request_hash(ctx.cache_key)
        return ctx.request_hash


def request_hash(key: str) -> str:
    """What the usage line shows of a cache key: a hash of it (equal requests, equal hashes;
    the key itself, which names the stored answer in Redis, is not written)."""
    return hashlib.blake2b(key.encode(), digest_size=12).hexdigest()


class CacheStage(Stage):
    def __init__(
        self,
        settings: CacheSettings,
        metrics: Metrics,
        *,
        follower_wait_s: float,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.keyer = Keyer(settings)
        self.active = settings.enabled
        self.clock = clock  # entries' ages and expiries
        self.metrics = metrics
        self.follower_wait_s = follower_wait_s
        self.backend: Backend | None = None
        self.flights: dict[str, asyncio.Future[Entry | None]] = {}

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """The backend, picked once Redis (if configured) is open; the stores under way are
        finished before it closes."""
        guard = app[REDIS]
        if guard is not None and self.settings.backend in {"auto", "redis"}:
            local_bytes = self.settings.local_max_bytes
            self.backend = RedisBackend(
                guard,
                self.settings.redis_prefix,
                self.settings.compress_min_bytes,
                MemoryBackend(local_bytes, self.metrics, self.clock) if local_bytes else None,
            )
        else:
            self.backend = MemoryBackend(self.settings.max_bytes, self.metrics, self.clock)
        yield
        await self.drain()

    async def drain(self) -> None:
        """Wait for the stores under way (short: one Redis call each)."""
        if self.backend is not None:
            await self.backend.drain()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None or not ctx.optimised or self.backend is None:
            return await handler(request)
        ttl = self.settings.ttl_s if ctx.control.cache_ttl_s is None else ctx.control.cache_ttl_s
        control = request.headers.get("Cache-Control", "").lower()
        # (the key, made by the express lane when it looked first)
        key = None if "no-store" in control else (ctx.cache_key or self.keyer.key(ctx))
        if key is None:
            ctx.cache = "bypass"
            self.metrics.cache["bypass"] += 1
            resp = await handler(request)
            resp.headers[CACHE_HEADER] = "BYPASS"
            return resp

        leader: asyncio.Future[Entry | None] | None = None
        if "no-cache" not in control:
            backend = self.backend
            entry = backend.peek(key)
            if entry is None and backend.remote:
                entry = await backend.get(key)
            if entry is None and not ctx.stream:
                flight = self.flights.get(key)
                if flight is not None:
                    entry = await self._follow(flight)
                else:
                    leader = asyncio.get_running_loop().create_future()
                    self.flights[key] = leader
            if entry is not None:
                return self._hit(ctx, entry, key)

        ctx.cache = "miss"
        self.metrics.cache["miss"] += 1
        try:
            resp = await handler(request)
        except BaseException:
            self._land(key, leader, None)
            raise
        resp.headers[CACHE_HEADER] = "MISS"
        if isinstance(resp, Reply) and 200 <= resp.status < 300 and ttl > 0:
            self._record(resp, ctx, key, ttl, leader)
        else:
            self._land(key, leader, None)
        return resp

    # -- hits, misses, single-flight ---------------------------------------------------------
    async def _follow(self, flight: asyncio.Future[Entry | None]) -> Entry | None:
        """Wait for the leader's answer; None if it failed (then this request goes on its own)."""
        self.metrics.cache["coalesced"] += 1
        try:
            return await asyncio.wait_for(asyncio.shield(flight), self.follower_wait_s)
        except TimeoutError:
            return None

    def _hit(self, ctx: RequestContext, entry: Entry, key: str) -> web.Response:
        # content-type, openai-*, x-request-id, then x-thriftgate-cache: HIT (never these two)
        replay = entry.replay if entry.replay is not None else entry.prepare(key)
        age = self._served(ctx, entry)
        # one header multidict, built by the response (not a copy built here and copied there)
        return web.Response(
            status=entry.status, body=entry.body, headers=(*replay, ("age", str(age)))
        )

    def _served(self, ctx: RequestContext, entry: Entry) -> int:
        """A hit on a prepared ``entry``, noted; its ``age``."""
        ctx.cache = "hit"
        ctx.hit_usage = entry.usage
        self.metrics.cache["hit"] += 1
        ctx.upstream_request_id = entry.request_id
        ctx.request_hash = entry.request_hash
        ctx.hit_memo = entry.memo
        return max(0, int(self.clock() - entry.stored_at))

    def express_hit(
        self, ctx: RequestContext, cache_control: str | None
    ) -> tuple[int, bytes] | None:
        """For the express lane (``proxy.express``): the status and the whole answer to a
        request found in this process's memory, the very bytes the chain's hit writes, the hit
        noted; or None, the request left to the chain (which uses the key made here). A request
        with a ``Cache-Control`` header is the chain's."""
        if self.backend is None or not ctx.optimised or cache_control is not None:
            return None
        key = self.keyer.key(ctx)
        if key is None:
            return None
        entry = self.backend.peek(key)
        if entry is None:
            return None
        head, length = entry.wire if entry.wire is not None else entry.wired(key)
        if not head:
            return None
        age = self._served(ctx, entry)
        self.metrics.cache["express"] += 1
        date = rfc822_formatted_time().encode()
        return entry.status, b"".join((head, b"%d" % age, length, date, _SERVER, entry.body))

    def _record(
        self,
        resp: Reply,
        ctx: RequestContext,
        key: str,
        ttl: float,
        leader: asyncio.Future[Entry | None] | None,
    ) -> None:
        encoding = resp.headers.get("Content-Encoding")
        recorder: _BodyRecorder | None = None
        if not resp.whole:  # a streamed body is recorded as it passes
            recorder = _BodyRecorder(encoding, self.settings.max_entry_bytes)
            resp.observers.append(recorder.feed)

        def store(outcome: Outcome) -> None:
            body = None
            if outcome.error is None:
                if recorder is not None:
                    body = recorder.body(stream=ctx.stream, responses=ctx.endpoint == RESPONSES)
                else:
                    whole = resp.body_bytes
                    body = decoded(whole, encoding) if whole is not None else None
                    if body is not None and len(body) > self.settings.max_entry_bytes:
                        body = None
            entry = None
            if body is not None:
                # the answer's usage (not an estimate), replayed into the usage line of each hit
                usage = outcome.usage if outcome.tokens_source == "upstream" else None
                now = self.clock()
                entry = Entry(resp.status, _replayed(resp.headers), body, now, usage, now + ttl)
            self._land(key, leader, entry)
            if entry is not None and self.backend is not None:
                self.metrics.cache["store"] += 1
                self.backend.store(key, entry, ttl)

        ctx.settlers.append(store)  # once the answer is delivered (or the request has ended)

    def _land(
        self, key: str, leader: asyncio.Future[Entry | None] | None, entry: Entry | None
    ) -> None:
        if leader is None:
            return
        if self.flights.get(key) is leader:
            del self.flights[key]
        if not leader.done():
            leader.set_result(entry)


CACHE: web.AppKey[CacheStage] = web.AppKey("cache", CacheStage)
