"""Prometheus metrics: one registry per application (no process-wide state), on /metrics.

The request path only bumps plain integers (a dict increment, no lock); a collector turns them
into Prometheus samples when /metrics is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from proxy.pool import Target

# express: the hits the express lane answered (counted in hit as well; proxy.express)
CACHE_EVENTS = ("hit", "miss", "bypass", "store", "eviction", "coalesced", "express")
# seconds; the upper bounds of the latency and time-to-first-token histograms
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MAX_MODELS = 200  # distinct model labels kept; the rest are counted as "other"
# endpoint labels: these paths as they are, other paths under these families as "<family>/*",
# anything else "other" (clients choose paths: a label per path would grow without bound)
ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/models",
        "/v1/moderations",
        "/v1/files",
        "/v1/uploads",
        "/v1/batches",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/fine_tuning/jobs",
        "/v1/vector_stores",
        "/v1/assistants",
        "/v1/threads",
        "/v1/realtime/sessions",
        "/v1/conversations",
    }
)
FAMILIES = frozenset(p.split("/")[2] for p in ENDPOINTS)


def endpoint_label(path: str) -> str:
    """A bounded label for a request path: a known endpoint, ``/v1/<family>/*``, or ``other``."""
    if path in ENDPOINTS:
        return path
    parts = path.split("/", 3)
    if len(parts) > 2 and parts[1] == "v1" and parts[2] in FAMILIES:
        return f"/v1/{parts[2]}/*"
    return "other"


TOKEN_KINDS = ("prompt", "cached", "completion", "reasoning")
_TOKEN_FIELDS = tuple((kind, f"{kind}_tokens") for kind in TOKEN_KINDS)
_NUMBER = (float, int)


class Histogram:
    """Counts per bucket and a sum: cheap to observe, rendered cumulatively."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds

    def buckets(self) -> list[tuple[str, float]]:
        out, total = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == float("inf") else str(bound), total))
        return out


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
        # per request, from the usage log's record
        self.requests: dict[tuple[str, str, str, str], int] = {}  # endpoint, model, status, cache
        self.tokens: dict[tuple[str, str], int] = {}  # model, kind
        self.cost_usd: dict[str, float] = {}  # by model
        self.saved_usd: dict[str, float] = {}
        self.latency: dict[str, Histogram] = {}  # by endpoint
        self.ttft: dict[str, Histogram] = {}
        self._models: set[str] = set()
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_Collector(self))

    def model_label(self, model: str | None) -> str:
        """Bounded label values: clients choose model names."""
        if model is None:
            return ""
        if model in self._models:
            return model
        if len(self._models) < MAX_MODELS:
            self._models.add(model)
            return model
        return "other"

    def observe_request(self, record: dict[str, Any]) -> None:
        """Count one usage-log record (endpoint, model, status, cache, tokens, cost, timings)."""
        model = self.model_label(record.get("model"))
        endpoint = str(record.get("endpoint"))
        if endpoint not in ENDPOINTS:
            endpoint = endpoint_label(endpoint)
        key = (endpoint, model, str(record.get("status")), record.get("cache") or "")
        self.requests[key] = self.requests.get(key, 0) + 1
        for kind, field in _TOKEN_FIELDS:
            n = record.get(field)
            if n and isinstance(n, int):
                self.tokens[(model, kind)] = self.tokens.get((model, kind), 0) + n
        for name, into in (("cost_usd", self.cost_usd), ("saved_usd", self.saved_usd)):
            usd = record.get(name)
            if usd and isinstance(usd, _NUMBER):
                into[model] = into.get(model, 0.0) + usd
        for name, into in (("latency_ms", self.latency), ("ttft_ms", self.ttft)):
            ms = record.get(name)
            if ms is not None and isinstance(ms, _NUMBER):
                hist = into.get(endpoint)
                if hist is None:
                    hist = into[endpoint] = Histogram()
                hist.observe(ms / 1000)

    def render(self, others: list[dict[str, Any]] | None = None) -> bytes:
        """The text format; with ``others`` (other workers' snapshots) the sum of them all."""
        if not others:
            return generate_latest(self.registry)
        total = Metrics()
        total.upstreams = self.upstreams  # breaker states: this worker's view
        for snap in [self.snapshot(), *others]:
            total.absorb(snap)
        return generate_latest(total.registry)

    # -- workers: each one's counters, shared through files, summed on scrape --------------------

    _COUNTS = (
        "cache",
        "redis_errors",
        "retries",
        "breaker_transitions",
        "budget_rejections",
        "rate_limited",
        "requests",
        "tokens",
        "cost_usd",
        "saved_usd",
    )

    def snapshot(self) -> dict[str, Any]:
        """Everything this worker counted, as JSON-able data (tuple keys become lists)."""
        snap: dict[str, Any] = {
            name: [
                [*(k if isinstance(k, tuple) else (k,)), v] for k, v in getattr(self, name).items()
            ]
            for name in self._COUNTS
        }
        snap["cache_bytes"] = self.cache_bytes
        snap["redis_up"] = self.redis_up
        for name in ("latency", "ttft"):
            snap[name] = [[k, h.counts, h.sum] for k, h in getattr(self, name).items()]
        return snap

    def absorb(self, snap: dict[str, Any]) -> None:
        """Add another worker's snapshot to these counts."""
        for name in self._COUNTS:
            into = getattr(self, name)
            for *labels, value in snap.get(name, ()):
                key = labels[0] if len(labels) == 1 else tuple(labels)
                into[key] = into.get(key, 0) + value
        self.cache_bytes += snap.get("cache_bytes") or 0
        if snap.get("redis_up") is not None:  # up only if every worker reaches Redis
            self.redis_up = min(self.redis_up if self.redis_up is not None else 1, snap["redis_up"])
        for name in ("latency", "ttft"):
            hists = getattr(self, name)
            for endpoint, counts, total in snap.get(name, ()):
                hist = hists.get(endpoint)
                if hist is None:
                    hist = hists[endpoint] = Histogram()
                hist.counts = [a + b for a, b in zip(hist.counts, counts, strict=True)]
                hist.sum += total


def _counter(
    name: str, documentation: str, labels: list[str], counts: dict[Any, int] | dict[Any, float]
) -> CounterMetricFamily:
    """A counter family from plain counts keyed by a label value (or a tuple of them)."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield _counter(
            "thriftgate_requests",
            "Requests to /v1, by endpoint, model, status sent and cache outcome",
            ["endpoint", "model", "status", "cache"],
            self.m.requests,
        )
        yield _counter(
            "thriftgate_tokens",
            "Tokens by model and kind (prompt, cached, completion, reasoning), as the usage log "
            "reports them (cache hits included: see thriftgate_requests' cache label)",
            ["model", "kind"],
            self.m.tokens,
        )
        yield _counter(
            "thriftgate_cost_usd", "USD spent upstream, by model", ["model"], self.m.cost_usd
        )
        yield _counter(
            "thriftgate_saved_usd",
            "USD the cache saved (what its answers cost originally), by model",
            ["model"],
            self.m.saved_usd,
        )
        for name, doc, hists in (
            ("thriftgate_request_duration_seconds", "Request to answer delivered", self.m.latency),
            ("thriftgate_ttft_seconds", "Streams: request to first byte sent", self.m.ttft),
        ):
            family = HistogramMetricFamily(name, doc, labels=["endpoint"])
            for endpoint, hist in hists.items():
                family.add_metric([endpoint], hist.buckets(), hist.sum)
            yield family
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
