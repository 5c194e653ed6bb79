"""Redis, optional and never in the way: a guard that runs each operation with a short timeout and
turns any failure into "skipped", so a missing, slow or restarting Redis never fails a request.

Failures are classified. Only a connection failure or a timeout (or a Redis that says it cannot
serve: read-only replica, loading, cluster down) is an **outage**: one warning is logged per outage
(and one line when Redis is back), Redis is left alone for ``retry_after_s`` between attempts, and
the state shows in ``/readyz`` and the ``thriftgate_redis_up`` gauge. Any other error (Redis
refusing one command, say a value out of range) fails **that operation only**: it is counted and
logged (at most once a minute per operation), and Redis stays up for everything else.

Redis is probed at start-up, so a Redis that is down then is ``degraded`` from the first moment.
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
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from proxy.config import RedisSettings
from proxy.metrics import Metrics
from proxy.types import METRICS, SETTINGS

log = structlog.get_logger("thriftgate.redis")

T = TypeVar("T")

OPERATION_LOG_EVERY_S = 60.0
# answers of a Redis that cannot serve now: outages, not the fault of one command
_UNAVAILABLE = ("LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY", "NOREPLICAS")


def is_outage(exc: BaseException) -> bool:
    """A connection failure or timeout, or a Redis that says it cannot serve now."""
    if isinstance(exc, ReadOnlyError | BusyLoadingError | ClusterDownError):
        return True
    if isinstance(exc, ResponseError):
        return str(exc).startswith(_UNAVAILABLE)
    return isinstance(exc, RedisError | OSError | TimeoutError)


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
        self._op_logged: dict[str, float] = {}  # operation -> when its last error was logged
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
        except Exception as exc:
            if is_outage(exc):
                self._failed(operation, exc)
            else:
                self._operation_failed(operation, exc)
            return default
        if self.down_since is not None:
            log.info("redis_recovered", down_s=round(time.time() - self.down_since, 3))
            self.down_since = None
            self._last_error = None
            self.metrics.redis_up = 1
        return result

    async def probe(self) -> bool:
        """PING now (start-up): a Redis that does not answer is an outage from this moment."""
        return await self.call("ping", lambda r: r.ping(), False) is True

    def _operation_failed(self, operation: str, exc: BaseException) -> None:
        """One command refused: that operation fails, Redis stays up."""
        errors = self.metrics.redis_errors
        errors[operation] = errors.get(operation, 0) + 1
        now = self.clock()
        if now - self._op_logged.get(operation, -OPERATION_LOG_EVERY_S) >= OPERATION_LOG_EVERY_S:
            self._op_logged[operation] = now
            log.warning(
                "redis_operation_failed",
                operation=operation,
                error=f"{type(exc).__name__}: {exc}"[:200],
                note="this operation was skipped; Redis is still used for everything else",
            )

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
    """Open the Redis client when a URL is configured and probe it (a Redis that is down at
    start-up is a degraded state, not a failure), close it on shutdown."""
    settings = app[SETTINGS].redis
    if settings.url is None:
        app[REDIS] = None
        yield
        return
    client = open_client(settings)
    guard = RedisGuard(client, settings, app[METRICS])
    app[REDIS] = guard
    await guard.probe()  # down now: degraded (and said so) before the port is bound
    yield
    await client.aclose()
