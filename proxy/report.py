"""``thriftgate usage``: totals from usage logs, per group, in constant memory.

Reads JSON lines (plain or gzipped files, or stdin), keeps per group only counters and a
log-scale latency histogram (so p50/p95 come out within 1% whatever the log's size), skips
malformed lines with a count, and prints a table, JSON or CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson

GROUPS = ("key", "model", "day", "hour", "minute", "endpoint", "user", "tag")
BIN = math.log(1.02)  # histogram bins 2% wide: a percentile is within ±1% of the true value
BUDGET_REFUSAL = "insufficient_quota"  # the budget stage's refusal (no upstream was asked)
RATE_REFUSAL = "rate_limit_exceeded"  # the rate limiter's


def _bin_of(ms: Any) -> int | None:
    """The histogram bin of a time in ms (None: not a time)."""
    if (type(ms) is float or type(ms) is int) and ms >= 0:
        return math.floor(math.log(ms if ms > 0.001 else 0.001) / BIN)
    return None


def _percentile(bins: dict[int, int], count: int, q: float) -> float | None:
    if not count:
        return None
    rank = q * count
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return round(math.exp((b + 0.5) * BIN), 3)  # the bin's middle
    return None  # pragma: no cover - rank <= count always ends the loop


def error_code(r: dict[str, Any]) -> str | None:
    """What went wrong with a request, as one code: the proxy's own (``error``), else the
    upstream's error answer's, else ``http_<status>``; None for a request that went well."""
    error = r.get("error")
    if isinstance(error, str):
        return error
    status = r.get("status")
    if isinstance(status, int) and status >= 400:
        upstream = r.get("upstream_error")
        return upstream if isinstance(upstream, str) else f"http_{status}"
    return None


# What a record adds to a row, read once (``facts``): tokens, cost, saved, cacheable, hit, error
# (what a time slot counts: ``summary.Slot``), prompt, cached and completion tokens, a refusal
# or unpriced call (0-4), images and audio seconds (or None), the latency and TTFT bins (or None)
Facts = tuple[int, float, float, int, int, int, int, int, int, int, Any, Any, Any]


def facts(r: dict[str, Any]) -> Facts:
    """(Written for speed: ``/dashboard`` counts every request; ``type(v) is int`` leaves out
    booleans, as a reader of a log must.)"""
    get = r.get
    tokens = get("total_tokens")
    cost = get("cost_usd")
    saved = get("saved_usd")
    prompt = get("prompt_tokens")
    cached = get("cached_tokens")
    completion = get("completion_tokens")
    cache = get("cache")
    hit = cache == "hit"
    status = get("status")
    error = refusal = 0
    if type(status) is int:
        if status >= 400:
            error = 1
            if status == 429:
                code = get("error")
                if code == BUDGET_REFUSAL:
                    refusal = 1
                elif code == RATE_REFUSAL:
                    refusal = 2
                elif get("upstream") is not None:
                    refusal = 3
        elif cost is None and not hit:
            refusal = 4
    media = None
    if "images" in r or "audio_seconds" in r:
        media = (_int(get("images")), _float(get("audio_seconds")))
    latency = get("latency_ms")
    ttft = get("ttft_ms")
    return (
        tokens if type(tokens) is int else 0,
        cost if type(cost) is float or type(cost) is int else 0.0,
        saved if type(saved) is float or type(saved) is int else 0.0,
        cache is not None,
        hit,
        error,
        prompt if type(prompt) is int else 0,
        cached if type(cached) is int else 0,
        completion if type(completion) is int else 0,
        refusal,
        media,
        _bin_of(latency),
        _bin_of(ttft),
    )


@dataclass(slots=True)
class Totals:
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens OpenAI served from its own prompt cache
    completion_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    cache_hits: int = 0
    cacheable: int = 0  # requests with a cache outcome (hit, miss, bypass)
    errors: int = 0  # status >= 400
    budget_refusals: int = 0  # refused by a budget (429 insufficient_quota, never sent)
    rate_limit_refusals: int = 0  # refused by the proxy's rate limiter (429)
    upstream_429: int = 0  # the upstream's own 429s
    images: int = 0  # images made (images endpoints)
    audio_seconds: float = 0.0  # audio transcribed or translated
    unpriced: int = 0  # answered calls whose cost is unknown (a model without a price, ...)
    latency_bins: dict[int, int] = field(default_factory=dict)
    latency_count: int = 0
    ttft_bins: dict[int, int] = field(default_factory=dict)
    ttft_count: int = 0

    def add(self, r: dict[str, Any]) -> Facts:
        """Count one record; returns its ``facts``, to count it in other rows (``apply``)."""
        f = facts(r)
        self.apply(f)
        return f

    def apply(self, f: Facts) -> None:
        """Count a record by its ``facts``."""
        self.requests += 1
        self.tokens += f[0]
        self.cost_usd += f[1]
        self.saved_usd += f[2]
        self.cacheable += f[3]
        self.cache_hits += f[4]
        self.errors += f[5]
        self.prompt_tokens += f[6]
        self.cached_tokens += f[7]
        self.completion_tokens += f[8]
        if f[9]:  # a refusal: 1 budget, 2 rate limit, 3 upstream 429; 4 unpriced
            refusal = f[9]
            if refusal == 1:
                self.budget_refusals += 1
            elif refusal == 2:
                self.rate_limit_refusals += 1
            elif refusal == 3:
                self.upstream_429 += 1
            else:
                self.unpriced += 1
        if f[10] is not None:
            self.images += f[10][0]
            self.audio_seconds += f[10][1]
        b = f[11]
        if b is not None:
            self.latency_bins[b] = self.latency_bins.get(b, 0) + 1
            self.latency_count += 1
        b = f[12]
        if b is not None:
            self.ttft_bins[b] = self.ttft_bins.get(b, 0) + 1
            self.ttft_count += 1

    def merge(self, other: Totals) -> None:
        for name in self.__slots__:  # type: ignore[attr-defined]
            value = getattr(other, name)
            if isinstance(value, dict):
                mine = getattr(self, name)
                for b, n in value.items():
                    mine[b] = mine.get(b, 0) + n
            else:
                setattr(self, name, getattr(self, name) + value)

    def dump(self) -> dict[str, Any]:
        """For another process (``/dashboard`` across workers): ``Totals.load`` reads it."""
        out = {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]
        out["latency_bins"] = list(self.latency_bins.items())
        out["ttft_bins"] = list(self.ttft_bins.items())
        return out

    @classmethod
    def load(cls, data: dict[str, Any]) -> Totals:
        totals = cls(**{k: v for k, v in data.items() if not k.endswith("_bins")})
        totals.latency_bins = {int(b): int(n) for b, n in data.get("latency_bins", ())}
        totals.ttft_bins = {int(b): int(n) for b, n in data.get("ttft_bins", ())}
        return totals

    def percentile(self, q: float) -> float | None:
        return _percentile(self.latency_bins, self.latency_count, q)

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 9),
            "saved_usd": round(self.saved_usd, 9),
            "cache_hits": self.cache_hits,
            "cache_hit_rate": round(self.cache_hits / self.cacheable, 4)
            if self.cacheable
            else None,
            "prompt_cache_share": round(self.cached_tokens / self.prompt_tokens, 4)
            if self.prompt_tokens
            else None,
            "errors": self.errors,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "budget_refusals": self.budget_refusals,
            "rate_limit_refusals": self.rate_limit_refusals,
            "upstream_429": self.upstream_429,
            "images": self.images,
            "audio_minutes": round(self.audio_seconds / 60, 3),
            "unpriced": self.unpriced,
            "p50_ms": self.percentile(0.50),
            "p95_ms": self.percentile(0.95),
            "p99_ms": self.percentile(0.99),
            "ttft_p50_ms": _percentile(self.ttft_bins, self.ttft_count, 0.50),
            "ttft_p95_ms": _percentile(self.ttft_bins, self.ttft_count, 0.95),
            "ttft_p99_ms": _percentile(self.ttft_bins, self.ttft_count, 0.99),
        }


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def _float(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0.0


_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")


def parse_time(text: str, now: float | None = None) -> float:
    """``2026-11-22``, ``2026-11-22T10:00:00Z`` (any ISO-8601; UTC when no zone is given), or a
    time before now: ``30m``, ``24h``, ``7d``, ``2w``. Returns a POSIX timestamp."""
    m = _RELATIVE.match(text.strip())
    if m:
        unit = {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return (time.time() if now is None else now) - float(m.group(1)) * unit
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use 2026-11-22, 2026-11-22T10:00:00Z, or 24h / 7d ago"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _ts(record: dict[str, Any]) -> float | None:
    value = record.get("ts")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def not_a_record(record: Any) -> str | None:
    """Why a JSON value is not a usage-log record, or None if it is one."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if "event" in record and "level" in record:
        return (
            f"it is an operational log event ({str(record['event'])[:40]!r}), not a usage record: "
            "the usage log is what serve writes to stdout or to THRIFTGATE_USAGE_LOG"
        )
    missing = [f for f in ("request_id", "endpoint", "status") if f not in record]
    if missing:
        return f"no {', '.join(missing)} field: not a thriftgate usage record"
    return None


def open_log(path: str, stdin: IO[bytes] | None = None) -> IO[bytes]:
    """A file (gzipped or not: told by its first bytes) or ``-`` for stdin."""
    raw: IO[bytes] = (stdin or sys.stdin.buffer) if path == "-" else open(path, "rb")  # noqa: SIM115
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(raw)  # type: ignore[arg-type]
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    return buffered


@dataclass(slots=True)
class Report:
    by: tuple[str, ...]
    since: float | None = None
    until: float | None = None
    groups: dict[tuple[str, ...], Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    skipped: int = 0  # malformed lines
    outside: int = 0  # lines outside --since/--until
    foreign: int = 0  # JSON lines that are not usage records (an operational log, ...)
    first_foreign: str | None = None  # where the first one was, and why it is not a record
    error_codes: dict[str, int] = field(default_factory=dict)  # what went wrong, how often
    # also shown every record in the window (the HTML report's panels, the what-if estimates)
    consumers: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)

    def feed(self, lines: Iterable[bytes], source: str = "-") -> None:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.skipped += 1
                continue
            why = not_a_record(record)
            if why is not None:
                self.foreign += 1
                if self.first_foreign is None:
                    self.first_foreign = f"{source}, line {n}: {why}"
                continue
            if self.since is not None or self.until is not None:
                ts = _ts(record)
                if ts is None:
                    self.skipped += 1
                    continue
                if (self.since is not None and ts < self.since) or (
                    self.until is not None and ts >= self.until
                ):
                    self.outside += 1
                    continue
            self.total.add(record)
            code = error_code(record)
            if code is not None:
                self.error_codes[code] = self.error_codes.get(code, 0) + 1
            for consumer in self.consumers:
                consumer(record)
            if self.by:
                for key in itertools.product(*(_groups(record, name) for name in self.by)):
                    totals = self.groups.get(key)
                    if totals is None:
                        totals = self.groups[key] = Totals()
                    totals.add(record)

    def rows(self) -> Iterator[dict[str, Any]]:
        for key in sorted(self.groups, key=lambda k: (-self.groups[k].cost_usd, k)):
            yield {**dict(zip(self.by, key, strict=True)), **self.groups[key].row()}
        names = dict.fromkeys(self.by, "")
        if self.by:
            names[self.by[0]] = "TOTAL"
        yield {**names, **self.total.row()}


def _groups(record: dict[str, Any], name: str) -> tuple[str, ...]:
    """The group(s) of ``name`` a record is in: one, but for ``tag`` (each of its tags)."""
    if name == "tag":
        tags = record.get("tags")
        if isinstance(tags, list) and tags:
            return tuple(dict.fromkeys(str(t) for t in tags))
        return ("-",)
    return (group(record, name),)


def group(record: dict[str, Any], name: str) -> str:
    if name in TIME_GROUPS:
        ts = record.get("ts")
        return ts[: TIME_GROUPS[name]] if isinstance(ts, str) else "-"
    field_ = ("key_alias", "key") if name == "key" else (name,)
    value = next((record[f] for f in field_ if record.get(f) is not None), None)
    return str(value) if value is not None else "-"


TIME_GROUPS = {"day": 10, "hour": 13, "minute": 16}  # the ts's first characters: 2026-12-01T10:05


COLUMNS = (
    ("requests", "requests", "{:,}"),
    ("tokens", "tokens", "{:,}"),
    ("cost_usd", "cost $", "{:,.4f}"),
    ("saved_usd", "saved $", "{:,.4f}"),
    ("cache_hit_rate", "hit rate", "{:.1%}"),
    ("error_rate", "errors", "{:.1%}"),
    ("images", "images", "{:,}"),
    ("audio_minutes", "audio min", "{:,.1f}"),
    ("unpriced", "unpriced", "{:,}"),
    ("p50_ms", "p50 ms", "{:,.1f}"),
    ("p95_ms", "p95 ms", "{:,.1f}"),
)


OPTIONAL = frozenset({"images", "audio_minutes", "unpriced"})


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row[key]
    if value is None:
        return "-"
    if key == "cost_usd" and row["unpriced"]:  # some calls have no known cost: never shown as 0
        return "unknown" if not value else fmt.format(value) + "+?"
    return fmt.format(value)


def render(report: Report, fmt: str, out: IO[str], what_if: dict[str, Any] | None = None) -> None:
    rows = list(report.rows())
    if fmt == "json":
        data = {
            "by": list(report.by),
            "groups": rows[:-1],
            "total": rows[-1],
            "error_codes": top_errors(report.error_codes),
            "skipped_lines": report.skipped,
            "outside_window": report.outside,
        }
        if what_if is not None:
            data["what_if"] = what_if
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
        return
    # the images, audio and unpriced columns only when the log has any
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or rows[-1][c[0]]]
    headers = [*report.by, *(title for _, title, _ in columns)]
    table = [
        [
            *(str(row[name]) for name in report.by),
            *(_cell(row, k, f) for k, _, f in columns),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    n = len(report.by)

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < n else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out.write(line(headers) + "\n")
    for i, r in enumerate(table):
        if i == len(table) - 1 and n:
            out.write("  ".join("-" * w for w in widths) + "\n")
        out.write(line(r) + "\n")


def top_errors(codes: dict[str, int], n: int = 20) -> dict[str, int]:
    """The ``n`` most frequent error codes, most frequent first."""
    return dict(sorted(codes.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


def time_window(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    """``--since``/``--until`` as timestamps (None where not given), both against one now."""
    now = time.time()
    return (
        parse_time(since, now) if since else None,
        parse_time(until, now) if until else None,
    )
