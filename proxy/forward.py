"""The innermost handler: the request sent to an upstream of the pool, the reply returned unsent.

``send_upstream`` picks the upstream (``proxy.pool``: weights, failover, breakers), forwards the
request (``proxy.upstream``: raw bytes both ways, streamed), and tells the upstream's breaker how
it went. ``Upstreams`` opens the client session and the pool for the app's lifetime.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web

from proxy.config import Settings, redact_url
from proxy.context import context_of
from proxy.errors import UpstreamTimeout, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.pool import Pool
from proxy.types import SETTINGS, Clock, Part
from proxy.upstream import Reply, Upstream

SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[Upstream] = web.AppKey("upstream", Upstream)
POOL: web.AppKey[Pool] = web.AppKey("pool", Pool)


class Upstreams(Part):
    """The upstream client session (its keep-alive pool) and the pool of upstreams."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock  # the breakers' cool-downs
        self.rng = rng  # the weighted choice of an upstream (None: a fresh random.Random)

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        settings = self.settings
        session = Upstream.open_session(settings.upstream)
        connections = Upstream.open_connections(settings.upstream)
        app[SESSION] = session
        app[UPSTREAM] = Upstream(settings.upstream, session, connections)
        app[POOL] = Pool(
            settings.targets(), settings.upstream, self.metrics, clock=self.clock, rng=self.rng
        )
        yield
        await connections.close()
        await session.close()


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
