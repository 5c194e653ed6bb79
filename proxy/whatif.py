"""What-if estimates from a usage log (``thriftgate usage --what-if``, and a section of the HTML
report): what turning something on would have saved on the traffic the log records.

- **The exact cache**: every answered request's line carries ``request_hash``, a hash of the key
  the cache gives it (endpoint, canonical body, scope), whether the cache was on or not. Replaying
  the log in time order with a cache of ``ttl_s`` tells which requests would have been answered
  from it; each saves what it cost. Memory: the hashes seen within the last ``ttl_s``.
- **The Batch API**: requests tagged as non-interactive (``x-thriftgate-tags``, one of
  ``batch_tags``) on the endpoints the Batch API takes, at its discount.
- **History trimming**: a long conversation's line carries ``trim_tokens``, the prompt tokens
  trimming it to the last 5, 10 or 20 messages would have dropped (the rules of ``[optimize]``
  trimming); each is priced at the model's input price.

The estimates are independent (a request can count in more than one; they do not add up), and
say what they assume (``assumptions``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.optimize import TRIM_KEEPS
from proxy.pricing import PER, PriceTable
from proxy.report import _float, _ts

BATCH_TAGS = ("batch", "offline", "non-interactive")
BATCH_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/moderations",
    }
)


@dataclass(slots=True)
class WhatIf:
    prices: PriceTable
    ttl_s: float = 3600.0
    batch_tags: tuple[str, ...] = BATCH_TAGS
    trim_threshold_tokens: int = 0
    # the cache replay: request hash -> when it would have been stored
    stored: dict[str, float] = field(default_factory=dict)
    _prune_at: int = 10_000
    _latest: float = 0.0
    cache: dict[str, Any] = field(
        default_factory=lambda: {
            "requests": 0,  # answered requests with a request_hash (and a time)
            "would_hit": 0,
            "saved_usd": 0.0,
            "unpriced_hits": 0,  # would-be hits whose cost is unknown
            "already_hit": 0,  # served from the cache that was on
            "already_saved_usd": 0.0,
        }
    )
    batch: dict[str, Any] = field(
        default_factory=lambda: {"requests": 0, "cost_usd": 0.0, "saved_usd": 0.0}
    )
    trim: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            str(n): {"requests": 0, "tokens": 0, "saved_usd": 0.0, "unpriced": 0}
            for n in TRIM_KEEPS
        }
    )
    considered: int = 0  # answered requests (2xx)

    def add(self, r: dict[str, Any]) -> None:
        status = r.get("status")
        if not isinstance(status, int) or not 200 <= status < 300:
            return
        self.considered += 1
        self._cache(r)
        self._batch(r)
        self._trim(r)

    def _cache(self, r: dict[str, Any]) -> None:
        key = r.get("request_hash")
        when = _ts(r)
        if not isinstance(key, str) or when is None:
            return
        c = self.cache
        c["requests"] += 1
        self._latest = max(self._latest, when)
        if r.get("cache") == "hit":
            c["already_hit"] += 1
            c["already_saved_usd"] += _float(r.get("saved_usd"))
            self.stored.setdefault(key, when)
            return
        stored = self.stored.get(key)
        if stored is not None and 0 <= when - stored < self.ttl_s:
            c["would_hit"] += 1
            cost = r.get("cost_usd")
            if isinstance(cost, int | float):
                c["saved_usd"] += cost
            else:
                c["unpriced_hits"] += 1
            return
        if r.get("error") is None:  # a complete answer: the cache would have kept it
            self.stored[key] = when
            if len(self.stored) > self._prune_at:
                self._prune()

    def _prune(self) -> None:
        """Forget what the cache would have let expire (the log is read in time order)."""
        horizon = self._latest - self.ttl_s
        self.stored = {k: t for k, t in self.stored.items() if t > horizon}
        self._prune_at = max(10_000, 2 * len(self.stored))

    def _batch(self, r: dict[str, Any]) -> None:
        tags = r.get("tags")
        if (
            not isinstance(tags, list)
            or r.get("endpoint") not in BATCH_ENDPOINTS
            or r.get("cache") == "hit"
            or not any(t in self.batch_tags for t in tags)
        ):
            return
        cost = _float(r.get("cost_usd"))
        self.batch["requests"] += 1
        self.batch["cost_usd"] += cost
        self.batch["saved_usd"] += cost * self.prices.batch_discount

    def _trim(self, r: dict[str, Any]) -> None:
        dropped = r.get("trim_tokens")
        prompt = r.get("prompt_tokens")
        if (
            not isinstance(dropped, dict)
            or r.get("cache") == "hit"
            or not isinstance(prompt, int)
            or prompt <= self.trim_threshold_tokens
        ):
            return
        price = self.prices.lookup(r.get("model"))
        for keep, tokens in dropped.items():
            bucket = self.trim.get(keep)
            if bucket is None or not isinstance(tokens, int) or tokens <= 0:
                continue
            bucket["requests"] += 1
            bucket["tokens"] += tokens
            if price is None:
                bucket["unpriced"] += 1
            else:
                bucket["saved_usd"] += tokens * price.input / PER

    def result(self) -> dict[str, Any]:
        c = self.cache
        return {
            "answered_requests": self.considered,
            "cache": {
                **_rounded(c),
                "hit_rate": round((c["would_hit"] + c["already_hit"]) / c["requests"], 4)
                if c["requests"]
                else None,
                "ttl_s": self.ttl_s,
            },
            "batch": {
                **_rounded(self.batch),
                "tags": list(self.batch_tags),
                "discount": self.prices.batch_discount,
            },
            "trim": {keep: _rounded(b) for keep, b in self.trim.items()},
            "assumptions": self.assumptions(),
        }

    def assumptions(self) -> list[str]:
        return [
            f"Cache: answers kept {self.ttl_s:g} s; only requests whose line has a request_hash "
            "(answered ones, logged by this version or later) count; a repeat within that time "
            "saves its whole cost; the log is read in time order.",
            f"Batch API: requests tagged {', '.join(self.batch_tags)} on the endpoints the Batch "
            f"API takes would have waited up to 24 h at a {self.prices.batch_discount:.0%} "
            "discount.",
            "Trimming: the system and developer messages stay, tool calls stay with their "
            "results; dropped tokens are priced at the model's input price (prompt-cache "
            "discounts ignored); what the answers would have lost is not estimated"
            + (
                f"; only prompts above {self.trim_threshold_tokens} tokens."
                if self.trim_threshold_tokens
                else "."
            ),
            "The estimates overlap: a request can count in more than one, so they do not add up.",
        ]


def _rounded(counts: dict[str, Any]) -> dict[str, Any]:
    """Dollar sums rounded as ``thriftgate usage`` rounds them (9 places)."""
    return {k: round(v, 9) if isinstance(v, float) else v for k, v in counts.items()}


def render_text(result: dict[str, Any]) -> str:
    """The estimates as a few lines for a terminal."""
    c, b = result["cache"], result["batch"]
    lines = [
        "what if (estimates from this log):",
        f"  exact cache ({c['ttl_s']:g} s): {c['would_hit']:,} of {c['requests']:,} answered "
        f"requests would have been hits, saving ${c['saved_usd']:,.4f}"
        + (f" (+{c['unpriced_hits']} unpriced)" if c["unpriced_hits"] else "")
        + (
            f"; {c['already_hit']:,} already were (${c['already_saved_usd']:,.4f} saved)"
            if c["already_hit"]
            else ""
        ),
        f"  Batch API ({', '.join(b['tags'])}): {b['requests']:,} requests costing "
        f"${b['cost_usd']:,.4f}, saving ${b['saved_usd']:,.4f}",
    ]
    for keep, t in result["trim"].items():
        lines.append(
            f"  trim to last {keep} messages: {t['requests']:,} requests, {t['tokens']:,} prompt "
            f"tokens, saving ${t['saved_usd']:,.4f}"
        )
    lines.append("assumptions:")
    lines += [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines) + "\n"
