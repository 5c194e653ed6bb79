"""The usage log: one JSON line per /v1 request, written from its ``Outcome`` (``proxy.outcome``
decides every number in it).

Writing never fails, and never blocks, a request: lines are batched per event-loop turn into
writes of whole lines (workers sharing one pipe never interleave inside a line), optionally also
sent to a Redis stream in the background, and the file is reopened on SIGHUP (logrotate). Each
outcome is also shown to the metrics, the alert rules and, in console mode, the access line.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any

import orjson
import structlog
from aiohttp import web

from proxy.alerts import Alerts
from proxy.metrics import Metrics
from proxy.outcome import Outcome
from proxy.store import REDIS, RedisGuard
from proxy.summary import Summary
from proxy.types import Clock, Part

log = structlog.get_logger("thriftgate.usage")

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


class UsageLog(Part):
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
        path: str | None = None,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        access: Callable[[dict[str, Any]], None] | None = None,
        redis_stream: str | None = None,
        redis_maxlen: int = 0,
        summary: Summary | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.enabled = enabled and stream is not None
        self.access = access  # console mode: one short line per request for a person
        self.metrics = metrics  # every record is counted there too (even with the log off)
        self.alerts = alerts  # ...and watched by the alert rules
        self.summary = summary  # /dashboard's numbers
        self.clock = clock  # the lines' ``ts``
        self.redis: RedisGuard | None = None  # with ``redis_stream``: XADD there too
        self.redis_stream = redis_stream  # with Redis configured: every record XADDed there too
        self.redis_maxlen = redis_maxlen
        self._sender: asyncio.Task[None] | None = None  # sends the backlog, one batch at a time
        self._stream_backlog: list[bytes] = []
        self.stream_dropped = 0  # records not sent to the stream (Redis slow or unavailable)
        self.path = path  # the file the stream appends to, reopened by ``reopen`` (SIGHUP)
        self._stream = stream
        self._owns_stream = owns_stream
        self._pending: list[bytes] = []
        self._outcomes: list[tuple[Outcome, float]] = []  # taken this turn, with their time
        self._scheduled = False
        self._second = -1
        self._second_text = ""
        self._failed = False

    def _ts(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def write(self, outcome: Outcome) -> None:
        """Take a request's outcome; its line is made, counted and written with the others of
        this turn of the event loop, on the next (each part's code then runs for all of them in
        a row: measured, less CPU per request than a line at a time)."""
        if (
            not self.enabled
            and self.metrics is None
            and self.alerts is None
            and self.summary is None
            and not self.access
        ):
            return
        self._outcomes.append((outcome, self.clock()))
        if not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop running: write now
                self.flush()

    def _records(self) -> None:
        """The pending outcomes as usage records: counted (metrics, alerts, the dashboard),
        shown (console mode) and serialised into ``_pending``."""
        outcomes, self._outcomes = self._outcomes, []
        records: list[tuple[dict[str, Any], float]] = []
        for outcome, now in outcomes:
            try:
                records.append((outcome.line(self._ts(now)), now))
            except Exception:
                log.exception("usage_record_failed", request_id=outcome.ctx.request_id)
        sinks: list[Callable[[dict[str, Any], float], None]] = []
        if self.access is not None:
            access = self.access
            sinks.append(lambda record, _: access(record))
        if self.metrics is not None:
            metrics = self.metrics
            sinks.append(lambda record, _: metrics.observe_request(record))
        if self.alerts is not None:
            alerts = self.alerts
            sinks.append(lambda record, _: alerts.observe(record))
        if self.summary is not None:
            sinks.append(self.summary.add)
        if self.enabled:
            pending = self._pending
            sinks.append(
                lambda record, _: pending.append(
                    orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
                )
            )
        for sink in sinks:  # one part at a time over every record
            for record, now in records:
                try:
                    sink(record, now)
                except Exception:
                    log.exception("usage_record_failed", request_id=record.get("request_id"))

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """The Redis stream (when one is named and Redis is configured) and SIGHUP (reopen the
        file, for logrotate); on the way out every pending line is written, the stream sends
        are finished, and a file this log opened is closed."""
        guard = app[REDIS]
        if self.redis_stream and guard is not None:
            self.redis = guard
        hup = False
        if self.path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reopen)
                hup = True
        yield
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.flush()
        await self.drain()
        self.close()

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
        if self._outcomes:
            self._records()
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
