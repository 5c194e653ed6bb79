"""Prometheus metrics: one registry per application (no process-wide state), on /metrics."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

CACHE_EVENTS = ("hit", "miss", "bypass", "store", "eviction", "coalesced")


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        events = Counter(
            "thriftgate_cache_events",
            "Response cache events: hit, miss, bypass, store, eviction, coalesced (a request "
            "that waited for an identical one in flight); backend failures are "
            "thriftgate_redis_errors_total",
            ["event"],
            registry=self.registry,
        )
        # pre-bound children: a labelled lookup per request costs more than the increment
        self.cache = {event: events.labels(event=event) for event in CACHE_EVENTS}
        self.cache_bytes = Gauge(
            "thriftgate_cache_memory_bytes",
            "Bytes held by the in-process cache",
            registry=self.registry,
        )
        self.redis_up = Gauge(
            "thriftgate_redis_up",
            "1 while Redis answers, 0 while thriftgate runs degraded without it",
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "thriftgate_redis_errors",
            "Redis operations that failed or timed out (and were skipped)",
            ["operation"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
