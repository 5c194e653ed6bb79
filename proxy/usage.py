"""The usage log: one JSON line per /v1 request, with the token usage the upstream reported.

``UsageRecorder`` watches a reply's body as it passes (never delaying it) and finds the ``usage``
object: in a JSON answer (in the tail of one too large to parse), or in the last events of an SSE
stream (the ``include_usage`` chunk, Responses' ``response.completed``). ``charged`` prices a
finished call: text by its tokens, images and audio by their own units (``proxy.media``).
Compressed answers are decoded from a copy; what the client receives is never touched.
"""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import Callable
from typing import IO, Any

import orjson
import structlog

from proxy import tokens
from proxy.alerts import Alerts
from proxy.context import RequestContext
from proxy.metrics import Metrics
from proxy.pricing import PriceTable
from proxy.store import RedisGuard
from proxy.upstream import DoneCallback, Outcome, Reply

log = structlog.get_logger("thriftgate.usage")

JSON_LIMIT = 8 * 1024 * 1024  # a JSON answer larger than this is not inspected for usage
TEXT_LIMIT = 4 * 1024 * 1024  # characters of a stream's text kept to estimate its tokens
SSE_TAIL = 64 * 1024  # the usage chunk is among the last events of a stream


class Decoder:
    """Incremental decoder of the Content-Encodings OpenAI uses (gzip, deflate)."""

    __slots__ = ("_obj", "_raw_deflate", "failed")

    def __init__(self, encoding: str) -> None:
        enc = encoding.strip().lower()
        self.failed = False
        self._raw_deflate = False
        self._obj: Any = None
        if enc == "gzip" or enc == "x-gzip":
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._obj = zlib.decompressobj()
            self._raw_deflate = True  # retry as raw deflate if the zlib header is missing
        elif enc != "identity":
            self.failed = True

    def feed(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        if self._obj is None:
            return chunk
        try:
            return self._obj.decompress(chunk)
        except zlib.error:
            if self._raw_deflate:
                self._raw_deflate = False
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.feed(chunk)
            self.failed = True
            return b""


class UsageRecorder:
    """Observer of a reply's body that extracts the upstream's ``usage`` object, and for a stream
    the client asked for without usage (``collect_text``), the text it streamed."""

    __slots__ = (
        "_buf",
        "_decoder",
        "_line",
        "_too_big",
        "answer",
        "json",
        "model",
        "sse",
        "text",
        "text_chars",
    )

    def __init__(
        self, content_type: str | None, content_encoding: str | None, collect_text: bool = False
    ) -> None:
        ctype = (content_type or "").lower()
        self.sse = ctype.startswith("text/event-stream")
        self.json = not self.sse and "json" in ctype
        self._decoder = Decoder(content_encoding) if content_encoding else None
        self._buf = bytearray()
        self._too_big = False
        self.text: list[str] | None = [] if collect_text and self.sse else None
        self.text_chars = 0
        self._line = b""
        self.model: str | None = None  # the answer's own "model", once usage() has read it
        self.answer: dict[str, Any] | None = None  # a JSON answer, once usage() has read it

    def feed(self, chunk: bytes) -> None:
        data = self._decoder.feed(chunk) if self._decoder is not None else chunk
        if not data:
            return
        if self.text is not None:
            self._collect(data)
        self._buf += data
        if self.sse:
            if len(self._buf) > 2 * SSE_TAIL:
                del self._buf[: len(self._buf) - SSE_TAIL]
        elif len(self._buf) > JSON_LIMIT:
            # a JSON answer this large (images as base64) is not parsed whole: its tail, where
            # the usage object is written, is kept
            self._too_big = True
            del self._buf[: len(self._buf) - SSE_TAIL]
        elif self._too_big and len(self._buf) > 2 * SSE_TAIL:
            del self._buf[: len(self._buf) - SSE_TAIL]

    def _collect(self, data: bytes) -> None:
        """The streamed text of complete ``data:`` events: content, refusals, tool arguments,
        legacy completions' text (at most TEXT_LIMIT characters)."""
        lines = (self._line + data).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            if not line.startswith(b"data:") or self.text_chars > TEXT_LIMIT:
                continue
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue  # [DONE], or not JSON
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("type"), str) and event["type"].endswith(".delta"):
                delta = event.get("delta")  # Responses API: output_text, refusal, arguments
                if isinstance(delta, str) and delta:
                    self.text.append(delta)  # type: ignore[union-attr]
                    self.text_chars += len(delta)
                continue
            choices = event.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                parts = [choice.get("text")]
                if isinstance(delta, dict):
                    parts += [delta.get("content"), delta.get("refusal")]
                    for call in delta.get("tool_calls") or ():
                        if isinstance(call, dict) and isinstance(call.get("function"), dict):
                            parts += [
                                call["function"].get("name"),
                                call["function"].get("arguments"),
                            ]
                for part in parts:
                    if isinstance(part, str) and part:
                        self.text.append(part)  # type: ignore[union-attr]
                        self.text_chars += len(part)

    def streamed_text(self) -> str | None:
        return "".join(self.text) if self.text else None

    def usage(self) -> dict[str, Any] | None:
        if (self._decoder is not None and self._decoder.failed) or not self._buf:
            return None
        if self._too_big:
            return _usage_from_tail(bytes(self._buf))
        if self.json:
            try:
                body = orjson.loads(self._buf)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(body, dict):
                return None
            if isinstance(body.get("response"), dict):  # Responses API envelope events
                body = body["response"]
            found = body.get("usage")
            if isinstance(body.get("model"), str):
                self.model = body["model"]
            self.answer = body
            return found if isinstance(found, dict) else None
        return _usage_from_sse(bytes(self._buf))


def decoded(body: bytes, content_encoding: str | None) -> bytes | None:
    """A whole body, decoded from its Content-Encoding; None if it cannot be."""
    if not content_encoding:
        return body
    decoder = Decoder(content_encoding)
    data = decoder.feed(body)
    return None if decoder.failed else data


def usage_of(content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """The ``usage`` object of a whole (decoded) answer body, JSON or SSE."""
    recorder = UsageRecorder(content_type, None)
    recorder.feed(body)
    return recorder.usage()


_USAGE_KEY = b'"usage":'


def _usage_from_tail(tail: bytes) -> dict[str, Any] | None:
    """The last ``"usage": {...}`` object in the tail of a JSON answer too large to parse whole."""
    at = tail.rfind(_USAGE_KEY)
    if at < 0:
        return None
    text = tail[at + len(_USAGE_KEY) :].decode("utf-8", "replace").lstrip()
    try:
        found, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _usage_from_sse(tail: bytes) -> dict[str, Any] | None:
    for line in reversed(tail.splitlines()):
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            event = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        found = event.get("usage")
        if found is None and isinstance(event.get("response"), dict):
            found = event["response"].get("usage")
        if isinstance(found, dict):
            return found
    return None


def token_fields(usage: dict[str, Any] | None) -> dict[str, int | None]:
    """Normalise chat/embeddings (prompt/completion) and Responses (input/output) usage."""
    if not usage:
        return {
            "prompt_tokens": None,
            "cached_tokens": None,
            "completion_tokens": None,
            "reasoning_tokens": None,
            "total_tokens": None,
        }
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    if total is None and isinstance(prompt, int):
        total = prompt + (completion if isinstance(completion, int) else 0)
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return {
        "prompt_tokens": prompt,
        "cached_tokens": prompt_details.get("cached_tokens")
        if isinstance(prompt_details, dict)
        else None,
        "completion_tokens": completion,
        "reasoning_tokens": out_details.get("reasoning_tokens")
        if isinstance(out_details, dict)
        else None,
        "total_tokens": total,
    }


def spent(ctx: RequestContext) -> dict[str, Any] | None:
    """What a finished call used, as ``token_fields``: the upstream's usage; zeros for a call that
    failed (not charged); None when it is not known (budgets and rate limits settle on it)."""
    fields = token_fields(ctx.usage)
    if fields["prompt_tokens"] is not None:
        return fields
    status = ctx.status or 0
    if status >= 400 and status != 499:
        return dict.fromkeys(fields, 0)
    return None


def charged(ctx: RequestContext, prices: PriceTable | None) -> float | None:
    """What a finished call cost in USD by the price table, or None when it cannot be known: text
    endpoints by their token usage, images and audio by their own units (``media_cost``)."""
    if prices is None:
        return None
    if ctx.media is not None and ctx.kind is not None:
        if ctx.usage is None and (ctx.status or 0) >= 300:
            return None
        return prices.media_cost(ctx.kind, ctx.usage, ctx.media)
    return prices.cost(ctx.model, token_fields(ctx.usage))


def estimated_usage(ctx: RequestContext, text: str | None) -> dict[str, Any] | None:
    """Usage for a stream that carried none (the client did not ask for it, or the stream ended
    before it came: client gone, upstream cut, shutdown): the prompt counted before the call and
    the text actually streamed, counted with the model's encoding (``tokens_source:
    estimated``)."""
    if (text is None and ctx.prompt_estimate is None) or ctx.kind != "text":
        return None
    name, _ = tokens.encoding_name_for(ctx.model)
    completion = len(tokens.encoding(name).encode_ordinary(text)) if text else 0
    prompt = ctx.prompt_estimate or 0
    # a prompt counted in part (a Responses request on earlier state) makes a partial estimate
    ctx.tokens_source = "estimated_partial" if ctx.prompt_source == "partial" else "estimated"
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def media_seen(ctx: RequestContext, answer: dict[str, Any] | None) -> None:
    """An images or audio answer: its facts noted, and shown in the usage line."""
    media = ctx.media
    assert media is not None
    if answer is not None:
        media.read_answer(answer)
    if ctx.model is None:
        ctx.model = media.model
    if media.images is not None:
        ctx.extra["images"] = media.images
    if media.size is not None and ctx.kind == "image":
        ctx.extra["image_size"] = media.size
    if media.quality is not None and ctx.kind == "image":
        ctx.extra["image_quality"] = media.quality
    seconds = media.audio_seconds(ctx.usage)
    if seconds is not None:
        ctx.extra["audio_seconds"] = seconds
    if media.characters is not None:
        ctx.extra["characters"] = media.characters


class UsageStripper:
    """For ``usage.force_stream_usage``: the upstream was asked for the usage chunk the client did
    not ask for; take it out of the stream (keeping the usage) and take out the ``"usage":null``
    each other chunk then carries, so the client gets the bytes it would have got."""

    __slots__ = ("_buf", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buf = data
            return b""
        self._buf = data[cut + 2 :]
        return b"".join(self._event(e) for e in data[: cut + 2].split(b"\n\n") if e)

    def end(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._event(rest) if rest else b""

    def _event(self, event: bytes) -> bytes:
        if b'"usage":' not in event:
            return event + b"\n\n"
        if b'"choices":[]' in event and event.startswith(b"data:"):
            try:
                found = orjson.loads(event[5:]).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                found = None
            if isinstance(found, dict):
                self.usage = found
                return b""  # the usage chunk: the client did not ask for it
        for null in (b',"usage":null', b'"usage":null,'):
            if null in event:
                return event.replace(null, b"", 1) + b"\n\n"
        return event + b"\n\n"


STREAM_BACKLOG = 10_000  # usage records queued for the Redis stream at most

PIPE_BUF = 4096  # POSIX: a write of at most this many bytes to a pipe is never interleaved


def _atomic_chunks(lines: list[bytes]) -> list[bytes]:
    """Whole lines joined into writes of at most PIPE_BUF bytes, so that workers sharing one
    stdout pipe never interleave inside a line (a longer line goes alone)."""
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in lines:
        if current and size + len(line) > PIPE_BUF:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


def open_for_append(path: str) -> IO[bytes]:
    """A usage log file, unbuffered: each write is one system call, of whole lines."""
    return open(path, "ab", buffering=0)


class UsageLog:
    """Writes one JSON object per request. Writing never fails, and never blocks, a request.

    Lines produced during one turn of the event loop are joined and written together on the
    next turn (one write call under load instead of one per request).
    """

    def __init__(
        self,
        stream: IO[bytes] | None,
        *,
        enabled: bool = True,
        owns_stream: bool = False,
        prices: PriceTable | None = None,
        path: str | None = None,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        access: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.enabled = enabled and stream is not None
        self.access = access  # console mode: one short line per request for a person
        self.prices = prices
        self.metrics = metrics  # every record is counted there too (even with the log off)
        self.alerts = alerts  # ...and watched by the alert rules
        self.redis: RedisGuard | None = None  # with ``redis_stream``: XADD there too
        self.redis_stream = ""
        self.redis_maxlen = 0
        self._sender: asyncio.Task[None] | None = None  # sends the backlog, one batch at a time
        self._stream_backlog: list[bytes] = []
        self.stream_dropped = 0  # records not sent to the stream (Redis slow or unavailable)
        self.path = path  # the file the stream appends to, reopened by ``reopen`` (SIGHUP)
        self._stream = stream
        self._owns_stream = owns_stream
        self._pending: list[bytes] = []
        self._scheduled = False
        self._second = -1
        self._second_text = ""
        self._failed = False

    def _ts(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def record(self, ctx: RequestContext) -> dict[str, Any]:
        tokens = token_fields(ctx.usage)
        cost = charged(ctx, self.prices)
        saved = None
        if ctx.cache == "hit" and cost is not None:
            cost, saved = 0.0, cost  # a hit costs nothing; it saved what the original answer cost
        return {
            "ts": self._ts(),
            "request_id": ctx.request_id,
            "upstream_request_id": ctx.upstream_request_id,
            "upstream": ctx.upstream,
            "key": ctx.key,
            "key_alias": ctx.key_alias,
            "user": ctx.user,
            "tags": ctx.tags,
            "method": ctx.method,
            "endpoint": ctx.endpoint,
            "model": ctx.model,
            "stream": ctx.stream,
            "status": ctx.status,
            "cache": ctx.cache,
            **tokens,
            "tokens_source": ctx.tokens_source if ctx.usage else None,
            "prompt_tokens_estimate": ctx.prompt_estimate,
            "prompt_tokens_estimate_source": ctx.prompt_source,
            "cost_usd": cost,
            "saved_usd": saved,
            "latency_ms": ctx.latency_ms,
            "ttft_ms": ctx.ttft_ms,
            "upstream_ms": ctx.upstream_ms,
            "attempts": ctx.attempts,
            "retry_wait_ms": ctx.retry_wait_ms,
            "rate_limited_ms": ctx.rate_limited_ms,
            "error": ctx.error,
            **ctx.extra,
        }

    def watch(self, ctx: RequestContext, reply: Reply, delivered: DoneCallback) -> None:
        """Read the usage from ``reply``'s body as it passes; call ``delivered`` when it ended."""
        # a stream's text is kept (as text, bounded) whether or not a usage chunk is expected:
        # a stream that ends before its usage chunk is charged what it delivered
        recorder = UsageRecorder(
            reply.headers.get("Content-Type"),
            reply.headers.get("Content-Encoding"),
            collect_text=reply.status < 300,
        )
        if (recorder.sse or recorder.json) and not reply.whole:
            reply.observers.append(recorder.feed)  # a streamed body is read as it passes

        def done(outcome: Outcome) -> None:
            if ctx.usage is None and reply.status < 300:
                if reply.whole and reply.body_bytes and (recorder.sse or recorder.json):
                    recorder.feed(reply.body_bytes)
                ctx.usage = recorder.usage()
                if ctx.model is None and ctx.usage is not None:
                    ctx.model = recorder.model  # endpoints the proxy does not parse
                if ctx.usage is None and recorder.sse:
                    ctx.usage = estimated_usage(ctx, recorder.streamed_text())
            if ctx.media is not None:
                media_seen(ctx, recorder.answer if reply.status < 300 else None)
            delivered(outcome)

        reply.on_done.append(done)

    def write(self, ctx: RequestContext) -> None:
        if not self.enabled and self.metrics is None and self.alerts is None and not self.access:
            return
        try:
            record = self.record(ctx)
            if self.access is not None:
                self.access(record)
            if self.metrics is not None:
                self.metrics.observe_request(record)
            if self.alerts is not None:
                self.alerts.observe(record)
            if not self.enabled:
                return
            self._pending.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        except Exception:
            log.exception("usage_record_failed", request_id=ctx.request_id)
            return
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: write now
                self.flush()

    def to_redis_stream(self, guard: RedisGuard, name: str, maxlen: int) -> None:
        self.redis, self.redis_stream, self.redis_maxlen = guard, name, maxlen

    def _to_stream(self, lines: list[bytes]) -> None:
        """Queue the records for the stream; one sender at a time, in order, in the background,
        one pipelined XADD per batch. Never waits, never fails a request: past STREAM_BACKLOG
        queued records (Redis slow or down) new ones are dropped and counted."""
        room = STREAM_BACKLOG - len(self._stream_backlog)
        if room < len(lines):
            self.stream_dropped += len(lines) - max(room, 0)
            lines = lines[: max(room, 0)]
        self._stream_backlog += lines
        # a task is done as soon as its coroutine returns: a sender that has emptied the backlog
        # and returned is never counted on to send lines queued after it
        if self._stream_backlog and (self._sender is None or self._sender.done()):
            self._sender = asyncio.get_running_loop().create_task(self._send_backlog())

    async def _send_backlog(self) -> None:
        assert self.redis is not None
        while self._stream_backlog:
            batch, self._stream_backlog = self._stream_backlog, []

            async def send(client: Any, batch: list[bytes] = batch) -> bool:
                async with client.pipeline(transaction=False) as pipe:
                    for line in batch:
                        pipe.xadd(
                            self.redis_stream,
                            {"r": line.rstrip(b"\n")},
                            maxlen=self.redis_maxlen,
                            approximate=True,
                        )
                    await pipe.execute()
                return True

            if not await self.redis.call("usage_stream", send, False):
                self.stream_dropped += len(batch)  # Redis unavailable: the guard said so

    async def drain(self) -> None:
        """Wait for the stream sends under way."""
        while self._sender is not None and not self._sender.done():
            await asyncio.gather(self._sender, return_exceptions=True)

    def reopen(self) -> None:
        """Write what is pending, then append to a fresh open of ``path`` (after logrotate moved
        the old file away). A file that cannot be opened keeps the old stream, with a warning."""
        if self.path is None or not self._owns_stream:
            return
        self.flush()
        try:
            fresh = open_for_append(self.path)
        except OSError as exc:
            log.warning("usage_log_reopen_failed", path=self.path, error=repr(exc))
            return
        old, self._stream = self._stream, fresh
        if old is not None:
            old.close()
        log.info("usage_log_reopened", path=self.path)

    def close(self) -> None:
        """Write what is pending; close the stream if this log opened it."""
        self.flush()
        if self._owns_stream and self._stream is not None:
            self._stream.close()
            self._stream = None

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._stream is None:
            return
        lines, self._pending = self._pending, []
        if self.redis is not None:
            self._to_stream(lines)
        try:
            for chunk in _atomic_chunks(lines):
                self._stream.write(chunk)
            self._stream.flush()
        except Exception as exc:
            if not self._failed:  # one warning per failure run, not one per request
                log.warning("usage_log_write_failed", error=repr(exc))
            self._failed = True
        else:
            self._failed = False
