"""The request context: what every stage knows about a /v1 request, built once per request.

``RequestContextStage`` sits right inside error mapping: it gives the request an id (bound in
structlog's contextvars), fingerprints the API key, parses the body of the optimised endpoints once
(orjson), and when the answer has been delivered hands the outcome to the usage log.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from aiohttp import web
from aiohttp.streams import StreamReader
from multidict import CIMultiDictProxy

from proxy.answers import UsageRecorder
from proxy.endpoints import ENDPOINTS, Endpoint
from proxy.errors import InvalidRequest, PayloadTooLarge, ProxyError, RequestTimeout
from proxy.inbound import NO_CONTROL, Control, check_path, decode_body, read_headers, safe_text
from proxy.keys import NOBODY, Identity
from proxy.media import FormFields, MediaFacts
from proxy.outcome import Outcome, conclude
from proxy.tokens import Count, Uncountable, count_request_async, unreadable_field
from proxy.types import Handler, Stage
from proxy.upstream import Delivery, Reply

if TYPE_CHECKING:
    from proxy.config import ServerSettings
    from proxy.keys import Keys
    from proxy.pricing import PriceTable
    from proxy.usage import UsageLog


BAD_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
    "valid JSON.)"
)


@dataclass(slots=True)
class RequestContext:
    request_id: str
    started: float
    method: str
    endpoint: str
    key: str | None  # the key's fingerprint (display only)
    query: str = ""  # the query string (part of a cache key)
    who: Identity = NOBODY  # the key's hashes: cache, budgets and limits use ``who.scope``
    control: Control = NO_CONTROL  # the x-thriftgate-* headers, checked
    key_alias: str | None = None
    organization: str | None = None
    project: str | None = None
    # the kind of paid endpoint (``proxy.endpoints``): "text", "image", "speech",
    # "transcription"; None for the rest of /v1 (forwarded untouched)
    kind: str | None = None
    optimised: bool = False  # a text endpoint whose body the proxy read (``raw``, ``body``)
    media: MediaFacts | None = None  # images and audio: what the request and answer say
    form: FormFields | None = None  # a multipart upload's small fields, noted as it streams
    raw: bytes | None = None  # the body to send upstream (the client's bytes unless rewritten)
    rewritten: bool = False  # ``raw`` was re-serialised by a stage: plain JSON, no encoding
    body: dict[str, Any] | None = None
    # the field of the body the stages cannot read ("body" for the whole of it), or None: such
    # a request goes upstream unchanged (cache BYPASS, no count), or is refused when a stage
    # needs what it cannot read (a key with a budget or a rate limit)
    unreadable: str | None = None
    count: Count | None = None  # the prompt, counted before the cache by the optimise stage
    model: str | None = None
    stream: bool = False
    user: str | None = None  # the body's ``user`` field
    tags: list[str] | None = None  # from the x-thriftgate-tags header
    # filled in by the stages as the request goes (the outcome is ``proxy.outcome``'s)
    cache: str | None = None
    request_hash: str | None = None  # the cache key's hash (``cache.Keyer``), for --what-if
    cache_key: str | None = None  # ``cache.Keyer``'s key: never logged (it names the entry)
    # a cache hit's memo of its accounting, shared by the hits of one entry: model ->
    # (token fields, price) (``outcome.conclude``)
    hit_memo: dict[str | None, tuple[dict[str, int | None], float | None]] | None = None
    hit_usage: dict[str, Any] | None = None  # a cache hit: the stored answer's usage
    attempts: int = 1
    retry_wait_ms: float = 0.0
    rate_limited_ms: float = 0.0  # time spent waiting in the rate limiter's queue
    upstream: str | None = None  # the name of the upstream that answered (the last one tried)
    prompt_estimate: int | None = None  # tokens counted before the call
    prompt_source: str | None = None  # how: "exact", "approximate" or "partial" (a lower bound)
    output_limit: int | None = None  # the output tokens the request asks for at most (0: no limit)
    tried: tuple[str, ...] = ()
    upstream_request_id: str | None = None
    upstream_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # a stage's own fields for the usage line
    # called once with the request's ``Outcome``: budgets, rate limits and the cache settle here
    settlers: list[Callable[[Outcome], None]] = field(default_factory=list)

    def elapsed_ms(self, at: float | None = None) -> float:
        return round(((at if at is not None else time.monotonic()) - self.started) * 1000, 3)


CTX: web.RequestKey[RequestContext] = web.RequestKey("thriftgate_ctx", RequestContext)


def unreadable_error(ctx: RequestContext, needs: str) -> InvalidRequest:
    """400 for a body the proxy cannot count, from a key whose ``needs`` (a budget, a rate limit)
    need the count; ``param`` names the field."""
    param = ctx.unreadable or "body"
    return InvalidRequest(
        f"thriftgate cannot count the tokens of this request: its '{param}' is not of the type "
        f"the API defines, and this API key has {needs}, which needs the count. Fix the "
        "request's shape.",
        param=param,
        code="invalid_request_shape",
    )


async def counted(ctx: RequestContext) -> Count | None:
    """The prompt's tokens, counted once per request (kept in ``ctx.count``), or None when the
    body cannot be read: ``ctx.unreadable`` then names the field ("body" for the whole)."""
    if ctx.unreadable is not None:
        return None
    if ctx.count is None:
        if ctx.body is None:
            ctx.unreadable = "body"
            return None
        try:
            ctx.count = await count_request_async(ctx.endpoint, ctx.body, len(ctx.raw or b""))
        except Uncountable as exc:
            ctx.unreadable = exc.param
            return None
    return ctx.count


@dataclass(slots=True)
class Prepared:
    """What the express lane (``proxy.express``) made of a request it did not answer, for the
    chain to go on with: the context (checked, its body read and parsed), or the error found."""

    content: StreamReader  # the request's body stream: which request this is
    ctx: RequestContext
    error: Exception | None = None


def adopt(request: web.Request) -> Prepared | None:
    """The express lane's work on this request, taken (once), if it did any."""
    protocol = request.protocol
    prepared: Prepared | None = getattr(protocol, "prepared", None)
    if prepared is None or prepared.content is not request.content:
        return None
    protocol.prepared = None  # type: ignore[attr-defined]
    return prepared


def context_of(request: web.Request) -> RequestContext | None:
    try:
        return request[CTX]
    except KeyError:
        return None


class RequestContextStage(Stage):
    """Builds the request context, binds the log context, and when the request has ended builds
    its one ``Outcome`` (``proxy.outcome``) and hands it to the settlers and the usage log."""

    def __init__(
        self,
        usage_log: UsageLog,
        keys: Keys,
        server: ServerSettings,
        prices: PriceTable,
        hasher: Callable[[RequestContext, bool], object] | None = None,
    ) -> None:
        self.usage_log = usage_log
        # the usage line's request_hash, made when a request is concluded (of the key the cache
        # looked up, or for an answered request it did not key, as if it had): ``Keyer``'s
        self.hasher = hasher
        self.prices = prices
        self.keys = keys
        self.server = server  # body size limit and deadline
        # request ids: a random per-process prefix and a counter (unique, and cheap to make)
        self._id_prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self.stopping = False  # set when shutdown ends what is still running
        # requests that ended during this turn of the loop, concluded together on the next
        self._ended: list[Callable[[], Outcome]] = []

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        yield
        self._conclude()  # the requests that ended in the last turn (before the usage log closes)

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if not path.startswith("/v1/"):
            return await handler(request)
        headers = request.headers
        # a request the express lane (``proxy.express``) read and could not answer: its context,
        # made there (the checks, the body read and parsed), or the error it found
        prepared = adopt(request)
        ctx = (
            prepared.ctx
            if prepared is not None
            else self.begin(request.method, path, request.query_string, headers)
        )
        request[CTX] = ctx
        # aiohttp runs each request in a task of its own (a copy of the connection's context),
        # so what is bound here never leaks into the next request: no need to clear first.
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        try:
            if prepared is None:
                await self._front(request, ctx)
            elif prepared.error is not None:
                raise prepared.error
            resp = await handler(request)
        except ProxyError as exc:
            self._close(ctx, exc.status, exc.code)
            raise
        except web.HTTPException as exc:
            self._close(ctx, exc.status, f"http_{exc.status}")
            raise
        except asyncio.CancelledError:
            self._close(ctx, 499, "shutdown" if self.stopping else "client_disconnected")
            raise
        except Exception:
            self._close(ctx, 500, "internal_error")
            raise
        if isinstance(resp, Reply):
            ctx.upstream_request_id = resp.headers.get("x-request-id")
            recorder = watch(resp)
            resp.on_done.append(lambda d: self._delivered(ctx, resp, recorder, d))
        else:
            self.answered(ctx, resp.status)
        return resp

    async def _front(self, request: web.Request, ctx: RequestContext) -> None:
        """The checks; a paid endpoint's body read and parsed (or, for a multipart upload, its
        small form fields noted as it streams upstream)."""
        headers = request.headers
        endpoint = self.admit(ctx, request.raw_path, headers)
        if endpoint is None:
            return
        if endpoint.text:
            self.take_body(ctx, await self._read(request), headers)
            return
        ctx.media = MediaFacts()
        if endpoint.json:  # read, but no text stage acts on it
            self.take_body(ctx, await self._read(request), headers)
            if ctx.body is not None:
                ctx.media.read_request(ctx.body)
        else:
            ctx.form = FormFields(ctx.media)

    def answered(self, ctx: RequestContext, status: int) -> None:
        """A request the proxy answered itself (a cache hit): its outcome (settlements, usage
        line, metrics) is concluded once the answer has been written, not before (the client
        waits less), with the others that end in this turn."""
        self._end(self._closing(ctx, status, None))

    def begin(
        self, method: str, path: str, query: str, headers: CIMultiDictProxy[str]
    ) -> RequestContext:
        """A /v1 request's context: its id, its start, its key (nothing here refuses)."""
        who = self.keys.identify(headers.get("Authorization"))
        return RequestContext(
            request_id=f"{self._id_prefix}{next(self._ids):016x}",
            started=time.monotonic(),
            method=method,
            endpoint=path if path.isascii() else safe_text(path),
            key=who.fingerprint,
            who=who,
            query=query,
        )

    def admit(
        self, ctx: RequestContext, raw_path: str, headers: CIMultiDictProxy[str]
    ) -> Endpoint | None:
        """The checks of the path and of every header (``ProxyError`` for what is refused), the
        control headers read; the paid endpoint this is a POST to, if any."""
        check_path(raw_path)
        ctx.control = read_headers(headers)  # every header's bytes checked here
        ctx.tags = ctx.control.tags
        ctx.key_alias = self.keys.alias(ctx.who)
        ctx.organization = headers.get("OpenAI-Organization")
        ctx.project = headers.get("OpenAI-Project")
        endpoint = ENDPOINTS.get(ctx.endpoint) if ctx.method == "POST" else None
        if endpoint is not None:
            ctx.kind = endpoint.kind
            ctx.optimised = endpoint.text  # the text stages act on it
        return endpoint

    def whole_body(self, content: StreamReader) -> bytes:
        """A body that has arrived whole, taken at once (413 past the limit)."""
        raw = content.read_nowait()
        if len(raw) > self.server.max_body_bytes:
            raise self._too_large()
        return raw

    async def _read(self, request: web.Request) -> bytes:
        server = self.server
        content = request.content
        if content.is_eof():  # the whole body has arrived (the common case)
            return self.whole_body(content)
        try:  # the body is still arriving: it has body_timeout_s to finish
            async with asyncio.timeout(server.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {server.body_timeout_s:g} s"
            ) from None

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"The request body is larger than this proxy's limit of {self.server.max_body_bytes} "
            "bytes"
        )

    def take_body(self, ctx: RequestContext, raw: bytes, headers: CIMultiDictProxy[str]) -> None:
        """The body, decoded and parsed (``InvalidRequest`` for what is not a JSON object; a body
        the proxy cannot read leaves ``ctx.unreadable`` set and goes on unread)."""
        limit = self.server.max_body_bytes
        ctx.raw = raw
        text = decode_body(raw, headers.get("Content-Encoding"), limit)
        if text is None:  # an encoding this process cannot undo: the upstream decides
            ctx.unreadable = "body"
            return
        try:
            body = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc) or "recursion" in str(exc).lower():  # nested past our reach
                ctx.unreadable = "body"
                return
            raise InvalidRequest(BAD_JSON, code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest(
                "The request body must be a JSON object, not "
                f"{'an array' if isinstance(body, list) else type(body).__name__}.",
                code="invalid_json",
            )
        ctx.body = body
        model = body.get("model")
        ctx.model = model if isinstance(model, str) else None
        ctx.stream = body.get("stream") is True
        user = body.get("user")
        ctx.user = user[:200] if isinstance(user, str) else None
        ctx.unreadable = unreadable_field(ctx.endpoint, body)

    def _delivered(
        self, ctx: RequestContext, reply: Reply, recorder: UsageRecorder, delivery: Delivery
    ) -> None:
        error = delivery.error
        if self.stopping and error == "client_disconnected":
            error = "shutdown"
        first = delivery.first_byte_at
        latency_ms = ctx.elapsed_ms()

        def outcome() -> Outcome:
            if reply.whole and reply.body_bytes and (recorder.sse or recorder.json):
                recorder.feed(reply.body_bytes)
            return conclude(
                ctx,
                self.prices,
                status=reply.status,
                error=error,
                latency_ms=latency_ms,
                ttft_ms=ctx.elapsed_ms(first) if ctx.stream and first is not None else None,
                recorder=recorder,
                taken_usage=reply.transform.usage if reply.transform is not None else None,
            )

        self._end(outcome)

    def _close(self, ctx: RequestContext, status: int, error: str | None) -> None:
        """A request that ended without an answer from upstream to deliver (refused, failed,
        cancelled, or answered by the proxy itself)."""
        self._finish(self._closing(ctx, status, error)())

    def _closing(
        self, ctx: RequestContext, status: int, error: str | None
    ) -> Callable[[], Outcome]:
        latency_ms = ctx.elapsed_ms()
        return lambda: conclude(ctx, self.prices, status=status, error=error, latency_ms=latency_ms)

    def _end(self, outcome: Callable[[], Outcome]) -> None:
        """Conclude a request on the next turn of the loop, with the others that end in this one
        (each part's code then runs for all of them in a row)."""
        if not self._ended:
            try:
                asyncio.get_running_loop().call_soon(self._conclude)
            except RuntimeError:  # no loop running: now
                self._finish(outcome())
                return
        self._ended.append(outcome)

    def _conclude(self) -> None:
        ended, self._ended = self._ended, []
        for outcome in ended:
            try:
                made = outcome()
            except Exception:  # a broken outcome never stops the others'
                structlog.get_logger("thriftgate").exception("conclude_failed")
                continue
            self._finish(made)

    def _finish(self, outcome: Outcome) -> None:
        ctx = outcome.ctx
        settlers, ctx.settlers = ctx.settlers, []
        for settle in settlers:
            try:
                settle(outcome)
            except Exception:  # a settlement never breaks the response or the usage log
                structlog.get_logger("thriftgate").exception("settle_failed")
        if self.hasher is not None:
            self.hasher(ctx, outcome.status < 300)
        self.usage_log.write(outcome)


def watch(reply: Reply) -> UsageRecorder:
    """A recorder of ``reply``'s usage, fed as its body passes (a whole body is read once it is
    delivered). A stream's text is kept, bounded, whether or not a usage chunk is expected: a
    stream that ends before its usage chunk is charged what it delivered."""
    recorder = UsageRecorder(
        reply.headers.get("Content-Type"),
        reply.headers.get("Content-Encoding"),
        collect_text=reply.status < 300,
    )
    if (recorder.sse or recorder.json) and not reply.whole:
        reply.observers.append(recorder.feed)
    return recorder
