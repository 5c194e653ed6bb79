"""Running the app: aiohttp's runner with thriftgate's own connection handler, an honest start and
a shutdown that keeps to ``shutdown_grace_s``.

- **Connection handler** (``ProxyRequestHandler``): aiohttp's own refusals of what it cannot parse
  (bad framing, a header too long, an unknown method) answer in OpenAI's error envelope, never as
  plain text or a traceback; a request whose headers have not arrived whole within
  ``header_timeout_s`` is answered 408 and its connection closed (slow-header clients cannot hold
  connections open for ever); a request that arrives whole on an idle kept-alive connection is
  shown to the express lane first (``proxy.express``: a hit in memory answered there and then),
  and the connection's task is woken only for what the lane leaves it.
- **Start** (``serve``): the open-file soft limit raised to the hard limit; the tiktoken encodings
  loaded and Redis probed (``on_startup``) before the port is bound; ``listening`` logged after the
  bind, with every upstream's redacted URL; a port in use is one line and exit status 2; a SIGTERM
  at any moment is a clean stop.
- **Stop**: on SIGTERM/SIGINT new connections are refused and idle ones closed at once; requests
  in flight (streams included) run until the grace ends, then are ended and settled with what they
  delivered; usage lines and settlements are flushed; the process exits 0 within the grace plus
  ``STOP_MARGIN_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http import RawRequestMessage
from aiohttp.web_protocol import RequestHandler

from proxy.config import Settings, redact_url
from proxy.console import banner, summary
from proxy.context import Prepared
from proxy.errors import envelope, error_response
from proxy.express import ExpressLane
from proxy.inbound import safe_text

log = structlog.get_logger("thriftgate")

STOP_MARGIN_S = 1.0  # past the grace: ending the requests still running and flushing what they left


def _error_bytes(status: int, reason: str, message: str, code: str) -> tuple[bytes, bytes]:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    body = orjson.dumps(envelope(message, type_, code))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nx-thriftgate-error: {code}\r\nConnection: close\r\n\r\n"
    )
    return head.encode(), body


class ProxyRequestHandler(RequestHandler):
    """aiohttp's connection handler with OpenAI-envelope refusals, a header deadline and the
    express lane (``proxy.express``)."""

    header_timeout_s = 10.0

    def __init__(
        self,
        *args: Any,
        header_timeout_s: float = 10.0,
        express: ExpressLane | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self.express = express
        # what the express lane made of the request it handed to the chain (``context.adopt``)
        self.prepared: Prepared | None = None
        # the requests this connection has finished (the chain's and the lane's), and whether
        # the last one the chain answered left the connection open (see ``data_received``)
        self._finished = 0
        self._open_after = True

    def data_received(self, data: bytes) -> None:
        idle = not self._request_in_progress and not self._messages
        before = self._request_count
        # an idle connection (every request read so far answered, the last leaving it open): the
        # express lane looks at what arrives first, and the connection's task is woken only for
        # what the lane leaves to it. The task may not be back to wait yet (it runs again on a
        # later turn after a request the chain answered, and on Python < 3.12 before its first):
        # a fast client's next request often arrives then, and the task finds nothing queued
        waiter, lane = self._waiter, self.express
        looks = (
            idle
            and self._finished == before
            and self._open_after
            and (waiter is None or not waiter.done())
        )
        if lane is None or not looks or self._paused:
            super().data_received(data)
        else:
            self._waiter = None
            try:
                super().data_received(data)
            finally:
                self._waiter = waiter
                transport = self.transport
                if (
                    len(self._messages) == 1
                    and transport is not None
                    and not transport.is_closing()
                ):
                    try:
                        self._express(lane)
                    except Exception:  # never a request left waiting: the chain has it
                        log.exception("express_lane_failed")
                if waiter is not None and self._messages and not waiter.done():
                    waiter.set_result(None)
        if self._request_count != before:  # a request's headers arrived whole
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif idle and self._header_timer is None and not self._force_close:
            # part of a request's headers (the common case, whole headers in one read, arms no
            # timer): the rest has header_timeout_s to arrive
            self._header_timer = self._loop.call_later(self.header_timeout_s, self._headers_late)

    def _express(self, lane: ExpressLane) -> None:
        message, payload = self._messages[0]
        if type(message) is not RawRequestMessage:  # a request aiohttp could not parse
            return
        taken = lane.take(message, payload, self.transport.write)  # type: ignore[union-attr]
        if taken is True:  # answered: as aiohttp's own loop ends a keep-alive request
            self._messages.popleft()
            self._finished += 1
            consumed = getattr(self._parser, "message_consumed", None)  # aiohttp >= 3.14.3
            if consumed is not None:
                consumed()
            if self._manager is not None:
                self._manager.requests_count += 1
            self._keepalive = True
            close_time = self._loop.time() + self.keepalive_timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)
        elif taken is not False:
            self.prepared = taken

    async def _handle_request(self, *args: Any, **kwargs: Any) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, noting that the request has finished and whether the connection stays
        open after it (what the connection's task decides when it runs next)."""
        try:
            resp, reset = await super()._handle_request(*args, **kwargs)
        except BaseException:
            self._open_after = False
            raise
        finally:
            self._finished += 1
        self._open_after = bool(resp.keep_alive) and not reset
        return resp, reset

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The connection's task, while it runs (it ends once the connection is closed; after
        ``close()`` that is when the request being answered, stream included, is done)."""
        task = self._task_handler
        return task if task is not None and not task.done() else None

    @property
    def busy(self) -> bool:
        return self._request_in_progress

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._request_in_progress or self._messages or self.transport is None:
            return
        head, body = _error_bytes(
            408,
            "Request Timeout",
            f"The request headers did not arrive within {self.header_timeout_s:g} s",
            "request_timeout",
        )
        with contextlib.suppress(Exception):
            self.transport.write(head + body)
        self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own refusals, in OpenAI's envelope (no traceback, no HTML)."""
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send another response")
        if status >= 500:
            text = "thriftgate could not handle this request; see its logs"
            code = "internal_error" if status == 500 else f"http_{status}"
            log.error("connection_error", status=status, error=type(exc).__name__ if exc else None)
        else:
            reason = safe_text(message or (getattr(exc, "message", None) or "") or "")
            reason = " ".join(str(reason).split())[:200]
            text = "thriftgate could not read this HTTP request" + (f": {reason}" if reason else "")
            code = "bad_http_request" if status == 400 else f"http_{status}"
            log.info("bad_http_request", status=status, error=type(exc).__name__ if exc else None)
        type_ = "invalid_request_error" if status < 500 else "server_error"
        resp = error_response(status, text, type_, code)
        resp.force_close()
        return resp


class ProxyServer(web.Server):
    """aiohttp's server making ``ProxyRequestHandler`` connections."""

    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """aiohttp's app runner whose server makes ``ProxyRequestHandler`` connections."""

    __slots__ = ()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = ProxyServer  # the same object, making thriftgate's handlers
        return server


def runner_for(app: web.Application, settings: Settings, **kwargs: Any) -> ProxyRunner:
    from proxy.app import EXPRESS

    return ProxyRunner(
        app,
        handler_cancellation=True,  # a client that goes away cancels its request
        access_log=None,
        header_timeout_s=settings.server.header_timeout_s,
        express=app.get(EXPRESS),
        shutdown_timeout=STOP_MARGIN_S,
        **kwargs,
    )


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the open-file soft limit to the hard limit (each connection needs a descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft, hard


def catch_stop_signals() -> list[int]:
    """From now until ``serve`` takes over: SIGTERM/SIGINT are noted, not fatal (a stop asked for
    during start-up is a clean stop, exit status 0)."""
    noted: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: noted.append(signum))
    return noted


async def serve(
    app: web.Application,
    settings: Settings,
    *,
    reuse_port: bool = False,
    stop_noted: list[int] | None = None,
) -> int:
    """Run ``app`` until SIGTERM/SIGINT; the exit status (0, or 2 when the port is taken).
    ``stop_noted``: signals ``catch_stop_signals`` noted before this started."""
    from proxy.admin import STATE
    from proxy.app import CONTEXT
    from proxy.cache import CACHE
    from proxy.store import REDIS

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if stop_noted:
        stop.set()
    open_files, _ = raise_open_file_limit()
    runner = runner_for(app, settings)
    await runner.setup()  # on_startup: encodings loaded, Redis probed
    server = settings.server
    site = web.TCPSite(runner, server.host, server.port, reuse_port=reuse_port or None)
    if stop.is_set():  # stopped while starting: nothing was bound
        await runner.cleanup()
        return 0
    try:
        await site.start()
    except OSError as exc:
        why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        print(f"thriftgate: cannot listen on {server.host}:{server.port}: {why}", file=sys.stderr)
        await runner.cleanup()
        return 2
    guard = app[REDIS]
    backend = app[CACHE].backend
    addresses = runner.addresses
    port = addresses[0][1] if addresses else server.port
    console = settings.log.format == "console"
    redis = "off"
    if guard is not None:
        state = guard.status()
        redis = f"{state['status']} ({redact_url(settings.redis.url or '')})"
        if state.get("error"):
            redis += f": {state['error']}"
    cache_bytes = None
    if backend is not None:
        cache_bytes = settings.cache.max_bytes if backend.name == "memory" else None
    host = f"[{server.host}]" if ":" in server.host else server.host
    facts = summary(
        settings,
        url=f"http://{host}:{port}",
        redis=redis,
        cache=backend.name if backend is not None else "off",
        cache_bytes=cache_bytes,
    )

    def say(text: str, event: str | None = None, **values: Any) -> None:
        """To a person (console mode) the sentence; to a log shipper the event."""
        if console:
            print(text, file=sys.stderr, flush=True)
        elif event is not None:
            log.info(event, **values)

    say(
        banner(facts),
        "listening",
        host=server.host,
        port=port,
        open_files=open_files,
        shutdown_grace_s=server.shutdown_grace_s,
        **facts,
    )
    await stop.wait()

    grace = server.shutdown_grace_s
    app[STATE].shutting_down = True
    await site.stop()  # no new connections
    handlers = [
        c
        for c in (runner.server.connections if runner.server is not None else ())
        if isinstance(c, ProxyRequestHandler)
    ]
    busy = sum(c.busy for c in handlers)
    say(
        f"thriftgate: stopping: draining {busy} request{'s' if busy != 1 else ''} in flight, "
        f"up to {grace:g} s (server.shutdown_grace_s)",
        "stopping",
        requests_in_flight=busy,
        grace_s=grace,
    )
    if runner.server is not None:
        # idle keep-alive connections close now; busy ones once their answer is done
        runner.server.pre_shutdown()
    tasks = {t for c in handlers if (t := c.task)}
    if tasks:
        _, running = await asyncio.wait(tasks, timeout=grace)
        if running:  # the grace is over: end them (each is settled with what it delivered)
            say(
                f"thriftgate: the grace is over: ending {len(running)} request(s) still running "
                "(each is charged what it delivered)"
            )
            app[CONTEXT].stopping = True
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=STOP_MARGIN_S / 2)
    await runner.cleanup()  # drains (Redis settlements), then the usage log is flushed
    say("thriftgate: stopped", "stopped")
    return 0
