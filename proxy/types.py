"""Typed keys and aliases shared by the modules (no state lives here)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Generic, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.metrics import Metrics

T = TypeVar("T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Sleep = Callable[[float], Awaitable[None]]  # asyncio.sleep, or a test's that only records
Clock = Callable[[], float]  # time.monotonic / time.time, or a test's

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")


class Part:
    """Something the app starts and stops: ``lifespan`` is registered in ``app.cleanup_ctx``, so
    its first half runs at start-up in the order the parts are listed in ``create_app`` and its
    second half at clean-up in reverse order (after the requests in flight have ended)."""

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        yield


class Stage(Part):
    """Base of the configurable middlewares: config in ``__init__``, work in ``__call__``, its
    tasks and connections in ``lifespan``. A stage whose configuration leaves it nothing to do sets
    ``active`` to False and is left out of the chain (a layer costs every request a little).

    The base passes every request through unchanged."""

    __middleware_version__ = 1  # aiohttp's marker for new-style middlewares
    active = True

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request)


class PrefixTable(Generic[T]):
    """Entries by model name: an exact match, else the longest listed prefix, so dated names
    find their family (``gpt-4o-2024-08-06`` → ``gpt-4o``). Lookups are remembered (bounded)."""

    def __init__(self, entries: dict[str, T]) -> None:
        self.entries = entries
        self._by_length = sorted(entries, key=len, reverse=True)
        self._seen: dict[str, T | None] = {}

    def lookup(self, name: str | None) -> T | None:
        if not name:
            return None
        try:
            return self._seen[name]
        except KeyError:
            pass
        found = self.entries.get(name)
        if found is None:
            found = next((self.entries[p] for p in self._by_length if name.startswith(p)), None)
        if len(self._seen) < 4096:
            self._seen[name] = found
        return found
