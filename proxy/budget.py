"""Token budget: context guard and per-key token/USD budgets.

The stage holds its place in the chain with its final interface; until its own work lands it
passes every request through unchanged.
"""

from __future__ import annotations

from aiohttp import web

from proxy.config import Settings
from proxy.context import context_of
from proxy.types import Handler, Stage


class BudgetStage(Stage):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None or not ctx.optimised:
            return await handler(request)
        return await handler(request)
