"""Redis, optional and never in the way: a guard that runs each operation with a short timeout and
turns any failure into "skipped", so a missing, slow or restarting Redis never fails a request.

One warning is logged per outage (and one line when Redis is back); while Redis is down it is left
alone for ``retry_after_s`` between attempts, so requests do not each wait for a timeout. The
state shows in ``/readyz`` and in the ``thriftgate_redis_up`` gauge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.config import RedisSettings
from proxy.metrics import Metrics
from proxy.types import METRICS, SETTINGS

log = structlog.get_logger("thriftgate.redis")

T = TypeVar("T")


def open_client(settings: RedisSettings) -> aioredis.Redis:
    """A Redis client that fails fast: short timeouts, no retries of its own."""
    assert settings.url is not None
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class RedisGuard:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: RedisSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.timeout_s = settings.timeout_s
        self.retry_after_s = settings.retry_after_s
        self.metrics = metrics
        self.clock = clock
        self.down_since: float | None = None  # wall-clock time of the outage's first failure
        self._retry_at = 0.0
        self._last_error: str | None = None
        metrics.redis_up = 1

    @property
    def up(self) -> bool:
        return self.down_since is None

    def status(self) -> dict[str, object]:
        if self.up:
            return {"configured": True, "status": "ok"}
        return {
            "configured": True,
            "status": "degraded",
            "down_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.down_since)),
            "error": self._last_error,
        }

    async def call(
        self, operation: str, fn: Callable[[aioredis.Redis], Awaitable[T]], default: T
    ) -> T:
        """``await fn(client)``, or ``default`` if Redis is down, slow or fails."""
        if self.down_since is not None and self.clock() < self._retry_at:
            return default
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await fn(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc)
            return default
        if self.down_since is not None:
            log.info("redis_recovered", down_s=round(time.time() - self.down_since, 3))
            self.down_since = None
            self._last_error = None
            self.metrics.redis_up = 1
        return result

    def _failed(self, operation: str, exc: BaseException) -> None:
        errors = self.metrics.redis_errors
        errors[operation] = errors.get(operation, 0) + 1
        self._retry_at = self.clock() + self.retry_after_s
        self._last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self.down_since is None:
            self.down_since = time.time()
            self.metrics.redis_up = 0
            log.warning(
                "redis_unavailable",
                operation=operation,
                error=self._last_error,
                note="serving without Redis until it answers again",
            )


REDIS: web.AppKey[RedisGuard | None] = web.AppKey("redis")


async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
    """Open the Redis client when a URL is configured (without connecting: a Redis that is down
    at start-up is a degraded state, not a failure), close it on shutdown."""
    settings = app[SETTINGS].redis
    if settings.url is None:
        app[REDIS] = None
        yield
        return
    client = open_client(settings)
    app[REDIS] = RedisGuard(client, settings, app[METRICS])
    yield
    await client.aclose()
