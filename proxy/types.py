"""Typed keys and aliases shared by the modules (no state lives here)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.config import Settings
    from proxy.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")


class Stage:
    """Base of the configurable middlewares: config in ``__init__``, work in ``__call__``.

    The base passes every request through unchanged."""

    __middleware_version__ = 1  # aiohttp's marker for new-style middlewares

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await handler(request)
