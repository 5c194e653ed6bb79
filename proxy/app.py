"""The application factory: the whole middleware chain, listed once, in order."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from proxy import __version__
from proxy.alerts import Alerts
from proxy.budget import BudgetStage
from proxy.cache import CacheStage
from proxy.config import Settings, redact_url
from proxy.console import access_writer
from proxy.context import RequestContextStage, context_of
from proxy.errors import UpstreamTimeout, UpstreamUnavailable, error_middleware, error_response
from proxy.inbound import secret_bytes
from proxy.keys import Keys
from proxy.metrics import Metrics
from proxy.microbatch import EmbeddingsBatcher
from proxy.optimize import OptimizeStage
from proxy.pool import Pool
from proxy.pricing import PriceTable
from proxy.ratelimit import RateLimitStage
from proxy.retry import RetryStage
from proxy.store import REDIS, redis_ctx
from proxy.tokens import Catalogue, preload_encodings
from proxy.types import METRICS, SETTINGS, Sleep
from proxy.upstream import Reply, Upstream
from proxy.usage import UsageLog, open_for_append


@dataclass(slots=True)
class AppState:
    started: float
    shutting_down: bool = False


SHARE_EVERY_S = 1.0  # workers: how often each one writes its counters for the others

STATE: web.AppKey[AppState] = web.AppKey("state", AppState)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
POOL: web.AppKey[Pool] = web.AppKey("pool", Pool)
USAGE_LOG: web.AppKey[UsageLog] = web.AppKey("usage_log", UsageLog)
CACHE: web.AppKey[CacheStage] = web.AppKey("cache", CacheStage)
BUDGET: web.AppKey[BudgetStage] = web.AppKey("budget", BudgetStage)
RATELIMIT: web.AppKey[RateLimitStage] = web.AppKey("ratelimit", RateLimitStage)
ALERTS: web.AppKey[Alerts] = web.AppKey("alerts", Alerts)
CONTEXT: web.AppKey[RequestContextStage] = web.AppKey("context", RequestContextStage)
MICROBATCH: web.AppKey[EmbeddingsBatcher] = web.AppKey("microbatch", EmbeddingsBatcher)


async def forward(request: web.Request) -> web.StreamResponse:
    """The innermost handler: send the request to an upstream, return the reply unsent."""
    ctx = context_of(request)
    if ctx is None:
        return await send_upstream(request, None, stream=False)
    return await send_upstream(request, ctx.raw, stream=ctx.stream, rewritten=ctx.rewritten)


async def send_upstream(
    request: web.Request, body: bytes | None, *, stream: bool, rewritten: bool = False
) -> Reply:
    """``request`` with ``body`` (None: the client's body, streamed through; ``rewritten``: made
    by the proxy, plain JSON) to an upstream of the pool, its breaker told how it went."""
    settings = request.app[SETTINGS]
    pool = request.app[POOL]
    ctx = context_of(request)
    target = pool.pick(ctx.tried if ctx is not None else ())
    if ctx is not None:
        ctx.upstream = target.name
        ctx.tried = (*ctx.tried, target.name)
    t0 = time.monotonic()
    try:
        reply = await request.app[UPSTREAM].forward(
            request,
            body,
            settings.server.max_body_bytes,
            target,
            stream=stream,
            rewritten=rewritten,
            body_idle_s=settings.server.body_timeout_s,
            control=ctx.control.names if ctx is not None else None,
            observe=ctx.form.feed if ctx is not None and ctx.form is not None else None,
        )
    except (UpstreamUnavailable, UpstreamTimeout):
        target.failed(pool.clock())
        raise
    except BaseException:
        target.abandoned()  # not the upstream's doing (a cancelled or refused request)
        raise
    if reply.status >= 500:
        target.failed(pool.clock())
    else:
        target.succeeded()
    if (
        reply.status == 404
        and target.hint_v1
        and "json" not in reply.headers.get("Content-Type", "")
    ):
        target.hint_v1 = False  # once per upstream
        structlog.get_logger("thriftgate").warning(
            "upstream_not_found",
            upstream=target.name,
            path=request.path,
            hint=f"the upstream answered 404 (not in OpenAI's format) and its URL "
            f"({redact_url(target.url)}) does not end in /v1: is /v1 missing?",
        )
    if ctx is not None:
        ctx.upstream_ms = round((time.monotonic() - t0) * 1000, 3)
    return reply


def is_admin(request: web.Request) -> bool:
    """No admin token configured, or the request carries it (compared in constant time)."""
    token = request.app[SETTINGS].server.admin_token
    if token is None:
        return True
    given = secret_bytes(request.headers.get("Authorization", ""))
    return hmac.compare_digest(given, f"Bearer {token}".encode())


async def metrics_endpoint(request: web.Request) -> web.Response:
    if not is_admin(request):
        return error_response(
            401,
            "/metrics needs Authorization: Bearer <THRIFTGATE_ADMIN_TOKEN>",
            "invalid_request_error",
            "invalid_admin_token",
        )
    metrics = request.app[METRICS]
    others = _other_workers(request.app[SETTINGS].server.metrics_dir)
    return web.Response(body=metrics.render(others), headers={"Content-Type": metrics.content_type})


def _other_workers(metrics_dir: str | None) -> list[dict[str, Any]]:
    """The other workers' latest snapshots (each rewrites its own file every second)."""
    if metrics_dir is None:
        return []
    own = f"{os.getpid()}.json"
    out = []
    for path in Path(metrics_dir).glob("*.json"):
        if path.name == own:
            continue
        try:
            out.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            continue  # a worker that is gone, or a file being replaced
    return out


async def _share_metrics(app: web.Application) -> AsyncIterator[None]:
    """With workers: write this worker's counters to its file every second."""
    metrics_dir = app[SETTINGS].server.metrics_dir
    if metrics_dir is None:
        yield
        return
    path = Path(metrics_dir) / f"{os.getpid()}.json"
    metrics = app[METRICS]

    def write() -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(metrics.snapshot()))
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one

    async def loop() -> None:
        while True:
            try:
                write()
            except OSError as exc:
                structlog.get_logger("thriftgate").warning("metrics_share_failed", error=repr(exc))
            await asyncio.sleep(SHARE_EVERY_S)

    task = asyncio.get_running_loop().create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with contextlib.suppress(OSError):
        write()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``status`` for anyone; the details (upstreams, Redis, cache) only with the admin token
    when one is set. URLs are shown redacted."""
    state = request.app[STATE]
    status = "shutting_down" if state.shutting_down else "ready"
    code = 503 if state.shutting_down else 200
    if not is_admin(request):
        return web.json_response({"status": status}, status=code)
    settings = request.app[SETTINGS]
    guard = request.app[REDIS]
    backend = request.app[CACHE].backend
    report = {
        "status": status,
        "version": __version__,
        "config_file": settings.config_file,
        "upstreams": request.app[POOL].status(),
        "redis": guard.status() if guard is not None else {"configured": False, "status": "off"},
        "cache": backend.name if backend is not None else "off",
        "uptime_s": round(time.monotonic() - state.started, 3),
        "pid": os.getpid(),
    }
    return web.json_response(report, status=code)


def create_app(
    settings: Settings,
    *,
    usage_stream: IO[bytes] | None = None,
    retry_sleep: Sleep = asyncio.sleep,
    ratelimit_sleep: Sleep = asyncio.sleep,
) -> web.Application:
    """Build the proxy. ``usage_stream`` receives the usage log (default: the configured sink);
    ``retry_sleep`` waits between retries (tests pass one that only records)."""
    metrics = Metrics()
    prices = PriceTable(settings.prices)
    alerts = Alerts(settings.alerts)
    owned = usage_stream is None  # the configured sink: this app opens (and reopens) it
    usage_log = UsageLog(
        _usage_sink(settings) if usage_stream is None else usage_stream,
        access=access_writer(sys.stderr) if settings.log.format == "console" else None,
        enabled=settings.usage.enabled,
        owns_stream=owned,
        prices=prices,
        path=settings.usage.log_path if owned else None,
        metrics=metrics,
        alerts=alerts,
    )
    cache = CacheStage(settings.cache, metrics, follower_wait_s=settings.upstream.total_timeout_s)
    keys = Keys(settings)
    catalogue = Catalogue(settings.models)
    context = RequestContextStage(usage_log, keys, settings.server)
    budget = BudgetStage(
        catalogue,
        keys,
        prices,
        settings.budget,
        metrics,
        alerts=alerts,
        force_stream_usage=settings.usage.force_stream_usage,
        on_failure=settings.redis.on_failure,
    )
    ratelimit = RateLimitStage(
        settings.ratelimit,
        keys,
        settings.model_limits,
        metrics,
        shared_upstream_key=bool(settings.upstream.api_key)
        or any(t.api_key for t in settings.upstreams),
        sleep=ratelimit_sleep,
    )
    microbatch = EmbeddingsBatcher(settings.microbatch, metrics, send_upstream)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # request bodies reach the stages as sent: a Content-Encoding body is forwarded as it is
        # and decoded for the stages by the context stage (bounded; see proxy.inbound)
        handler_args={"auto_decompress": False},
        middlewares=[
            error_middleware,  # outermost: any exception becomes OpenAI's error envelope
            context,  # request id, key, path/header/control checks, parsed body, usage log
            OptimizeStage(settings.optimize, catalogue),  # opt-in trimming, output limits
            cache,  # exact-match answers, single-flight
            budget,  # tokens counted, context guard, per-key budgets
            ratelimit,  # token buckets per key and model: reject or queue
            RetryStage(settings.retry, metrics, sleep=retry_sleep),
            # opt-in: concurrent embeddings requests sent upstream as one (when off, not in the
            # chain at all: a layer costs every request a few microseconds)
            *([microbatch] if settings.microbatch.embeddings else []),
        ],
    )
    app[SETTINGS] = settings
    app[CONTEXT] = context
    app[METRICS] = metrics
    app[STATE] = AppState(started=time.monotonic())
    app[USAGE_LOG] = usage_log
    app[CACHE] = cache
    app[BUDGET] = budget
    app[RATELIMIT] = ratelimit
    app[ALERTS] = alerts
    app[MICROBATCH] = microbatch
    app.cleanup_ctx.append(_upstream_session)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(_share_metrics)
    # startup runs after the cleanup contexts' first halves: Redis is open
    app.on_startup.extend(
        [
            _load_encodings,
            cache.startup,
            budget.startup,
            ratelimit.startup,
            alerts.startup,
            _reopen_on_sighup,
            _usage_to_redis_stream,
        ]
    )
    app.on_shutdown.extend(
        [
            _mark_shutting_down,
            cache.shutdown,
            budget.shutdown,
            ratelimit.shutdown,
            alerts.shutdown,
            microbatch.shutdown,
            _drain_usage_stream,
        ]
    )
    app.on_cleanup.append(_flush_usage_log)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def _usage_sink(settings: Settings) -> IO[bytes]:
    """Unbuffered, so each write is one system call (whole lines; see ``usage.PIPE_BUF``)."""
    if settings.usage.log_path:
        return open_for_append(settings.usage.log_path)
    return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)


async def _upstream_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = Upstream.open_session(settings.upstream)
    app[SESSION] = session
    app[UPSTREAM] = Upstream(settings.upstream, session)
    app[POOL] = Pool(settings.targets(), settings.upstream, app[METRICS])
    yield
    await session.close()


async def _load_encodings(app: web.Application) -> None:
    """The tiktoken encodings, loaded (off the event loop) before the port is bound: the first
    request is not the one that waits for them."""
    await asyncio.to_thread(preload_encodings)


async def _usage_to_redis_stream(app: web.Application) -> None:
    usage = app[SETTINGS].usage
    guard = app[REDIS]
    if usage.redis_stream and guard is not None:
        app[USAGE_LOG].to_redis_stream(guard, usage.redis_stream, usage.redis_stream_maxlen)


async def _drain_usage_stream(app: web.Application) -> None:
    app[USAGE_LOG].flush()
    await app[USAGE_LOG].drain()


async def _reopen_on_sighup(app: web.Application) -> None:
    """SIGHUP reopens the usage log file, so logrotate can move it away."""
    usage_log = app[USAGE_LOG]
    if usage_log.path is None:
        return
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, usage_log.reopen)


async def _flush_usage_log(app: web.Application) -> None:
    app[USAGE_LOG].close()


async def _mark_shutting_down(app: web.Application) -> None:
    app[STATE].shutting_down = True
