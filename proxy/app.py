"""The application factory: the parts the app starts and stops, and the whole middleware chain,
each listed once, in order (and the express lane, which answers hits in front of it).

Parts start in the order listed (each ``lifespan`` is an ``app.cleanup_ctx``) and stop in reverse,
after the requests in flight have ended: the stages drain into Redis and the usage log before
Redis closes. A stage whose configuration leaves it nothing to do (``active`` False) is not in
the chain and is never started. Adding a stage is one class (``proxy.types.Stage``) and one line
in ``stages`` below.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from typing import IO, TypeVar

from aiohttp import web

from proxy import dashboard
from proxy.admin import STATE, AppState, MetricsShare, routes
from proxy.admission import AdmissionStage
from proxy.alerts import Alerts
from proxy.budget import BudgetStage
from proxy.cache import CACHE, CacheStage, Keyer
from proxy.config import Settings
from proxy.console import access_writer
from proxy.context import RequestContextStage
from proxy.dashboard import SUMMARY
from proxy.endpoints import ENDPOINTS
from proxy.errors import ErrorStage
from proxy.express import ExpressLane
from proxy.forward import Upstreams, forward, send_upstream
from proxy.keys import Keys
from proxy.metrics import Metrics
from proxy.microbatch import EmbeddingsBatcher
from proxy.optimize import OptimizeStage
from proxy.pricing import PriceTable
from proxy.ratelimit import RateLimitStage
from proxy.retry import RetryStage
from proxy.store import RedisConnection
from proxy.summary import Summary
from proxy.tokens import Catalogue, Encodings
from proxy.types import METRICS, SETTINGS, Clock, Part, Sleep, Stage
from proxy.usage import UsageLog, open_for_append

CONTEXT: web.AppKey[RequestContextStage] = web.AppKey("context", RequestContextStage)
PARTS: web.AppKey[tuple[Part, ...]] = web.AppKey("parts", tuple)  # and the chain's stages
# the express lane (``proxy.express``): the connections answer hits found in memory themselves
EXPRESS: web.AppKey[ExpressLane] = web.AppKey("express", ExpressLane)


def create_app(
    settings: Settings,
    *,
    usage_stream: IO[bytes] | None = None,
    retry_sleep: Sleep = asyncio.sleep,
    ratelimit_sleep: Sleep = asyncio.sleep,
    wall_clock: Clock = time.time,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
) -> web.Application:
    """Build the proxy. ``usage_stream`` receives the usage log (default: the configured sink).
    ``retry_sleep`` waits between retries, ``ratelimit_sleep`` in the rate limiter's queue;
    ``wall_clock`` dates budgets, cache entries and usage lines, ``clock`` times buckets, holds
    and retries, ``rng`` picks upstreams by weight (tests pass their own)."""
    metrics = Metrics()
    prices = PriceTable(settings.prices)
    alerts = Alerts(settings.alerts, clock=wall_clock)
    keys = Keys(settings)
    catalogue = Catalogue(settings.models)
    owned = usage_stream is None  # the configured sink: this app opens (and reopens) it
    summary = Summary() if settings.server.dashboard else None  # /dashboard's numbers
    usage_log = UsageLog(
        _usage_sink(settings) if usage_stream is None else usage_stream,
        access=access_writer(sys.stderr) if settings.log.format == "console" else None,
        enabled=settings.usage.enabled,
        owns_stream=owned,
        path=settings.usage.log_path if owned else None,
        metrics=metrics,
        alerts=alerts,
        redis_stream=settings.usage.redis_stream,
        redis_maxlen=settings.usage.redis_stream_maxlen,
        summary=summary,
        clock=wall_clock,
    )
    context = RequestContextStage(
        usage_log, keys, settings.server, prices, hasher=Keyer(settings.cache).request_hash
    )
    cache = CacheStage(
        settings.cache,
        metrics,
        follower_wait_s=settings.upstream.total_timeout_s,
        clock=wall_clock,
    )
    optimize = OptimizeStage(settings.optimize, catalogue)
    parts: list[Part] = [
        Upstreams(settings, metrics, clock, rng),  # the client session and the pool of upstreams
        RedisConnection(settings.redis, metrics, clock),  # app[REDIS]: None without Redis
        Encodings(),  # tiktoken's, loaded before the port is bound
        usage_log,
        MetricsShare(metrics, settings.server.metrics_dir, summary),  # with --workers
        alerts,
    ]
    stages: list[Stage] = [
        ErrorStage(),  # outermost: any exception becomes OpenAI's error envelope
        context,  # request id, key, path/header/control checks, parsed body, the outcome
        optimize,  # opt-in trimming, output limits
        cache,  # exact-match answers, single-flight
        AdmissionStage(catalogue, force_stream_usage=settings.usage.force_stream_usage),
        BudgetStage(
            keys,
            prices,
            settings.budget,
            metrics,
            clock=wall_clock,
            alerts=alerts,
            on_failure=settings.redis.on_failure,
        ),
        RateLimitStage(
            settings.ratelimit,
            keys,
            settings.model_limits,
            metrics,
            shared_upstream_key=bool(settings.upstream.api_key)
            or any(t.api_key for t in settings.upstreams),
            clock=clock,
            sleep=ratelimit_sleep,
        ),
        RetryStage(settings.retry, metrics, sleep=retry_sleep, clock=clock),
        EmbeddingsBatcher(settings.microbatch, metrics, send_upstream),  # opt-in
    ]
    chain = tuple(s for s in stages if s.active)
    app = web.Application(
        client_max_size=settings.server.max_body_bytes,
        # request bodies reach the stages as sent: a Content-Encoding body is forwarded as it is
        # and decoded for the stages by the context stage (bounded; see proxy.inbound)
        handler_args={"auto_decompress": False},
        middlewares=chain,
    )
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[STATE] = AppState(started=time.monotonic())
    app[CONTEXT] = context
    app[CACHE] = cache
    if settings.server.express and cache.active:
        # answers a hit as it arrives; everything else goes down the chain above (with the
        # context stage's front work done: see proxy.express)
        app[EXPRESS] = ExpressLane(context, optimize, cache)
    if summary is not None:
        app[SUMMARY] = summary
        dashboard.routes(app)
    app[PARTS] = (*parts, *chain)
    for p in app[PARTS]:
        app.cleanup_ctx.append(p.lifespan)
    app.on_shutdown.append(_mark_shutting_down)
    routes(app)
    # the paid endpoints by their exact paths (found in one dict lookup, no pattern to match),
    # then the rest of /v1: the same handler either way
    for path in ENDPOINTS:
        app.router.add_route("*", path, forward)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


P = TypeVar("P", bound=Part)


def part(app: web.Application, kind: type[P]) -> P:
    """``app``'s part of that class: a stage in the chain, the usage log, the alerts...
    (LookupError when there is none: a stage left out of the chain by its configuration)."""
    for p in app[PARTS]:
        if isinstance(p, kind):
            return p
    raise LookupError(f"{kind.__name__} is not part of this app")


def _usage_sink(settings: Settings) -> IO[bytes]:
    """Unbuffered, so each write is one system call (whole lines; see ``usage.PIPE_BUF``)."""
    if settings.usage.log_path:
        return open_for_append(settings.usage.log_path)
    return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)


async def _mark_shutting_down(app: web.Application) -> None:
    """``/readyz`` says 503 from the moment shutdown begins."""
    app[STATE].shutting_down = True
