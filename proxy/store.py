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
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from proxy.background import Background
from proxy.config import RedisSettings, sentinel_parts
from proxy.metrics import Metrics
from proxy.types import Part

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


def _options(settings: RedisSettings) -> dict[str, Any]:
    """Fail fast (short timeouts, no retries of the client's own), the configured credentials and
    TLS files."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.timeout_s,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password
    if settings.ca_file is not None:
        options["ssl_ca_certs"] = settings.ca_file
    if settings.cert_file is not None:
        options["ssl_certfile"] = settings.cert_file
    if settings.key_file is not None:
        options["ssl_keyfile"] = settings.key_file
    return options


def open_client(settings: RedisSettings, *, cluster: bool = False) -> Any:
    """The client for the configured Redis: one server, a Redis Cluster (keys spread by slot), or
    the primary named by the sentinels (found again after a failover)."""
    assert settings.url is not None
    options = _options(settings)
    if "+sentinel://" in settings.url:
        found = sentinel_parts(settings.url)
        tls = {k: v for k, v in options.items() if k.startswith("ssl_")}
        if found.tls:
            tls["ssl"] = True
        sentinel_options = {
            "socket_timeout": settings.timeout_s,
            "socket_connect_timeout": settings.timeout_s,
            **tls,
        }
        if settings.sentinel_password is not None:
            sentinel_options["password"] = settings.sentinel_password
        sentinel = Sentinel(list(found.sentinels), sentinel_kwargs=sentinel_options, **tls)
        options.setdefault("username", found.username)
        options.setdefault("password", found.password)
        if options["username"] is None:
            del options["username"]
        if found.tls:
            options["ssl"] = True
        return sentinel.master_for(found.service, db=found.db, **options)
    if cluster or settings.mode == "cluster":
        options.pop("health_check_interval")
        return RedisCluster.from_url(settings.url, **options)
    return aioredis.Redis.from_url(settings.url, **options)


async def close_client(client: Any) -> None:
    """Close a client, and for one found through Sentinel its connections to the sentinels."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


def hash_tag(name: str) -> str:
    """The part of a Redis key that picks its cluster slot: what is inside the first {...}."""
    start = name.find("{")
    end = name.find("}", start + 1)
    return name[start + 1 : end] if start >= 0 and end > start + 1 else name


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


async def connect(settings: RedisSettings) -> Any:
    """``open_client``, recognising a Redis Cluster node when ``redis.mode`` is ``auto``."""
    client = open_client(settings)
    auto = settings.mode == "auto" and "+sentinel://" not in (settings.url or "")
    if auto and await detect_cluster(client, settings.timeout_s):
        await client.aclose()
        client = open_client(settings, cluster=True)
    return client


async def detect_cluster(client: aioredis.Redis, timeout_s: float) -> bool:
    """Whether a plain client's server is a Redis Cluster node (``redis.mode = auto``)."""
    try:
        async with asyncio.timeout(timeout_s):
            info = await client.info("cluster")
    except Exception:  # down, or no INFO for us: the probe says so later
        return False
    return str(info.get("cluster_enabled", "0")) == "1"


class RedisGuard:
    def __init__(
        self,
        client: aioredis.Redis,
        settings: RedisSettings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.cluster = is_cluster(client)  # scripts run once per hash slot of their keys
        self.kind = "cluster" if self.cluster else "sentinel" if _sentinel(client) else "standalone"
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
            return {"configured": True, "status": "ok", "kind": self.kind}
        return {
            "configured": True,
            "kind": self.kind,
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


def _sentinel(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)
    return type(pool).__name__ == "SentinelConnectionPool"


REDIS: web.AppKey[RedisGuard | None] = web.AppKey("redis")


L = TypeVar("L")


class Shared(Generic[L]):
    """Base of the stores kept in Redis and shared by every replica (cache entries, budget
    counters, rate-limit buckets), each with an in-process store of its own kind beside it
    (``local``): used while Redis is unavailable, and by the cache as its hot tier. Every call
    goes through the guard (an outage is said once, in the logs and ``/readyz``, and the call
    returns its default); a read-modify-write is one Lua script, registered once; work sent in
    the background (stores, settlements) is finished by ``drain`` before Redis closes."""

    operation = "redis"  # how the guard names this store's calls in logs and metrics

    def __init__(self, guard: RedisGuard, local: L, script: str | None = None) -> None:
        self.guard = guard
        self.local = local
        self.cluster = guard.cluster  # scripts run once per hash slot of their keys
        self.script = guard.client.register_script(script) if script else None  # EVALSHA
        self.tasks = Background()

    async def call(
        self, fn: Callable[[aioredis.Redis], Awaitable[T]], default: T, operation: str = ""
    ) -> T:
        return await self.guard.call(operation or self.operation, fn, default)

    async def drain(self) -> None:
        await self.tasks.drain()


class RedisConnection(Part):
    """Opens the Redis client when a URL is configured and probes it (a Redis that is down at
    start-up is a degraded state, not a failure), closes it at the end. ``app[REDIS]`` is the
    guard every shared store calls through, or None without Redis."""

    def __init__(
        self, settings: RedisSettings, metrics: Metrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock  # when to try Redis again after an outage

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        if self.settings.url is None:
            app[REDIS] = None
            yield
            return
        client = await connect(self.settings)
        guard = RedisGuard(client, self.settings, self.metrics, self.clock)
        app[REDIS] = guard
        await guard.probe()  # down now: degraded (and said so) before the port is bound
        yield
        await close_client(client)
