"""Prometheus metrics: one registry per application (no process-wide state), on /metrics.

The request path only bumps plain integers (a dict increment, no lock); a collector turns them
into Prometheus samples when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.pool import Target

CACHE_EVENTS = ("hit", "miss", "bypass", "store", "eviction", "coalesced")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.cache: dict[str, int] = dict.fromkeys(CACHE_EVENTS, 0)
        self.cache_bytes = 0  # held by the in-process cache
        self.redis_up: int | None = None  # None: no Redis configured
        self.redis_errors: dict[str, int] = {}  # by operation
        self.retries: dict[str, int] = {}  # by reason: status_503, connection, timeout
        self.breaker_transitions: dict[tuple[str, str], int] = {}  # (upstream, to state)
        self.upstreams: list[Target] = []
        self.budget_rejections: dict[tuple[str, str], int] = {}  # (tokens|usd, day|month)
        self.rate_limited: dict[str, int] = {}  # rejected, queued, too_large, upstream_hold
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _counter(
    name: str, documentation: str, labels: list[str], counts: dict[Any, int]
) -> CounterMetricFamily:
    """A counter family from plain counts keyed by a label value (or a tuple of them)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        yield _counter(
            "thriftgate_cache_events",
            "Response cache events: hit, miss, bypass, store, eviction, coalesced (a request "
            "that waited for an identical one in flight); backend failures are "
            "thriftgate_redis_errors_total",
            ["event"],
            self.m.cache,
        )
        yield GaugeMetricFamily(
            "thriftgate_cache_memory_bytes",
            "Bytes held by the in-process cache",
            value=self.m.cache_bytes,
        )
        if self.m.redis_up is not None:
            yield GaugeMetricFamily(
                "thriftgate_redis_up",
                "1 while Redis answers, 0 while thriftgate runs degraded without it",
                value=self.m.redis_up,
            )
        yield _counter(
            "thriftgate_redis_errors",
            "Redis operations that failed or timed out (and were skipped)",
            ["operation"],
            self.m.redis_errors,
        )
        yield _counter(
            "thriftgate_retries",
            "Upstream attempts retried, by reason (status_NNN, connection, timeout)",
            ["reason"],
            self.m.retries,
        )
        states = GaugeMetricFamily(
            "thriftgate_upstream_state",
            "1 for each upstream's current breaker state (closed, open, half_open)",
            labels=["upstream", "state"],
        )
        for target in self.m.upstreams:
            for state in ("closed", "open", "half_open"):
                states.add_metric([target.name, state], 1 if target.state == state else 0)
        yield states
        yield _counter(
            "thriftgate_upstream_breaker_transitions",
            "Circuit breaker transitions, by upstream and the state entered",
            ["upstream", "to"],
            self.m.breaker_transitions,
        )
        yield _counter(
            "thriftgate_budget_rejections",
            "Requests refused because a key's budget was spent, by unit and period",
            ["unit", "period"],
            self.m.budget_rejections,
        )
        yield _counter(
            "thriftgate_rate_limited",
            "Rate limiter events: rejected, queued (waited for room), too_large (over a bucket's "
            "capacity), upstream_hold (the upstream said its limits were nearly spent)",
            ["outcome"],
            self.m.rate_limited,
        )
