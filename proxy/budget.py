"""Token budget: context guard and per-key token/USD budgets.

The stage holds its place in the chain with its final interface (``Stage``'s
``__call__(request, handler)``); until its own work lands it passes every request through.
"""

from __future__ import annotations

from proxy.config import Settings
from proxy.types import Stage


class BudgetStage(Stage):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
