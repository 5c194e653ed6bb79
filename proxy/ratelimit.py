"""Rate limiting: token buckets for requests and tokens per minute.

The stage holds its place in the chain with its final interface (``Stage``'s
``__call__(request, handler)``); until its own work lands it passes every request through.
"""

from __future__ import annotations

from proxy.config import Settings
from proxy.types import Stage


class RateLimitStage(Stage):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
