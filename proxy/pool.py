"""Several upstreams: requests spread by weight, failover, and a circuit breaker per upstream.

A breaker counts consecutive failures (no answer, a reset, a timeout, a 5xx status); at
``breaker_failures`` it opens and the upstream leaves the rotation for ``breaker_cooldown_s``; then
it is half-open and lets one probe request through: success closes it, failure opens it again.
The breakers never leave a request nowhere to go: when every upstream is out of the rotation,
the one that left it first is tried anyway.
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable, Collection

import structlog
from yarl import URL

from proxy.config import UpstreamSettings, UpstreamTarget, redact_url
from proxy.metrics import Metrics

log = structlog.get_logger("thriftgate.pool")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class Target:
    """An upstream and its breaker."""

    def __init__(
        self, target: UpstreamTarget, settings: UpstreamSettings, metrics: Metrics
    ) -> None:
        self.name = target.name
        self.url = target.url
        # the configured URL's parts: where requests go, the query it adds to each one
        # (Azure-style ?api-version=&api-key=), and HTTP Basic credentials from its user-info
        parsed = URL(target.url)
        self.base = str(parsed.with_user(None).with_query(None).with_fragment(None)).rstrip("/")
        self.base_query = parsed.raw_query_string
        self.basic_auth: str | None = None
        if parsed.user is not None or parsed.password is not None:
            pair = f"{parsed.user or ''}:{parsed.password or ''}".encode()
            self.basic_auth = "Basic " + base64.b64encode(pair).decode("ascii")
        self.api_key = target.api_key or settings.api_key
        self.weight = target.weight
        self.threshold = settings.breaker_failures
        self.cooldown_s = settings.breaker_cooldown_s
        self.metrics = metrics
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False
        # the base URL does not end in /v1: a 404 that is not OpenAI's is worth one warning
        self.hint_v1 = not URL(self.base).path.rstrip("/").endswith("/v1")

    def available(self, now: float) -> bool:
        if self.state == OPEN and now >= self.opened_at + self.cooldown_s:
            self._to(HALF_OPEN)
        if self.state == HALF_OPEN:
            return not self.probing
        return self.state == CLOSED

    def taken(self) -> None:
        if self.state == HALF_OPEN:
            self.probing = True

    def abandoned(self) -> None:
        """The request ended before the upstream could answer for itself: no verdict."""
        self.probing = False

    def succeeded(self) -> None:
        self.failures = 0
        self.probing = False
        if self.state != CLOSED:
            self._to(CLOSED)

    def failed(self, now: float) -> None:
        self.failures += 1
        self.probing = False
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            self.opened_at = now
            self._to(OPEN)

    def _to(self, state: str) -> None:
        if state == OPEN:
            log.warning("upstream_breaker", upstream=self.name, state=state, failures=self.failures)
        else:
            log.info("upstream_breaker", upstream=self.name, state=state)
        self.state = state
        key = (self.name, state)
        self.metrics.breaker_transitions[key] = self.metrics.breaker_transitions.get(key, 0) + 1

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": redact_url(self.url),
            "state": self.state,
            "consecutive_failures": self.failures,
        }


class Pool:
    def __init__(
        self,
        targets: Collection[UpstreamTarget],
        settings: UpstreamSettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.targets = [Target(t, settings, metrics) for t in targets]
        self.clock = clock
        self.rng = rng or random.Random()
        metrics.upstreams = self.targets

    def pick(self, tried: Collection[str] = ()) -> Target:
        """A target by weight among those in the rotation, preferring ones not tried yet."""
        if len(self.targets) == 1:
            only = self.targets[0]
            only.available(self.clock())  # let an open breaker move on to half-open
            only.taken()
            return only
        now = self.clock()
        up = [t for t in self.targets if t.available(now)]
        fresh = [t for t in up if t.name not in tried]
        candidates = fresh or up
        if not candidates:  # all out of the rotation: the one that left it first
            chosen = min(self.targets, key=lambda t: t.opened_at)
        elif len(candidates) == 1:
            chosen = candidates[0]
        else:
            chosen = self.rng.choices(candidates, weights=[t.weight for t in candidates])[0]
        chosen.taken()
        return chosen

    def status(self) -> list[dict[str, object]]:
        return [t.status() for t in self.targets]
