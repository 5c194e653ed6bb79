"""Prometheus metrics: one registry per application (no process-wide state), on /metrics.

The request path only bumps plain integers (a dict increment, no lock); a collector turns them
into Prometheus samples when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

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
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        events = CounterMetricFamily(
            "thriftgate_cache_events",
            "Response cache events: hit, miss, bypass, store, eviction, coalesced (a request "
            "that waited for an identical one in flight); backend failures are "
            "thriftgate_redis_errors_total",
            labels=["event"],
        )
        for event, count in self.m.cache.items():
            events.add_metric([event], count)
        yield events
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
        errors = CounterMetricFamily(
            "thriftgate_redis_errors",
            "Redis operations that failed or timed out (and were skipped)",
            labels=["operation"],
        )
        for operation, count in self.m.redis_errors.items():
            errors.add_metric([operation], count)
        yield errors
        retries = CounterMetricFamily(
            "thriftgate_retries",
            "Upstream attempts retried, by reason (status_NNN, connection, timeout)",
            labels=["reason"],
        )
        for reason, count in self.m.retries.items():
            retries.add_metric([reason], count)
        yield retries
        states = GaugeMetricFamily(
            "thriftgate_upstream_state",
            "1 for each upstream's current breaker state (closed, open, half_open)",
            labels=["upstream", "state"],
        )
        for target in self.m.upstreams:
            for state in ("closed", "open", "half_open"):
                states.add_metric([target.name, state], 1 if target.state == state else 0)
        yield states
        transitions = CounterMetricFamily(
            "thriftgate_upstream_breaker_transitions",
            "Circuit breaker transitions, by upstream and the state entered",
            labels=["upstream", "to"],
        )
        for (name, state), count in self.m.breaker_transitions.items():
            transitions.add_metric([name, state], count)
        yield transitions
