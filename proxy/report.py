"""``thriftgate usage``: totals from usage logs, per group, in constant memory.

Reads JSON lines (plain or gzipped files, or stdin), keeps per group only counters and a
log-scale latency histogram (so p50/p95 come out within 1% whatever the log's size), skips
malformed lines with a count, and prints a table, JSON or CSV.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson

GROUPS = ("key", "model", "day", "endpoint", "user")
BIN = math.log(1.02)  # histogram bins 2% wide: a percentile is within ±1% of the true value


@dataclass(slots=True)
class Totals:
    requests: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    cache_hits: int = 0
    cacheable: int = 0  # requests with a cache outcome (hit, miss, bypass)
    errors: int = 0  # status >= 400
    images: int = 0  # images made (images endpoints)
    audio_seconds: float = 0.0  # audio transcribed or translated
    unpriced: int = 0  # answered calls whose cost is unknown (a model without a price, ...)
    latency_bins: dict[int, int] = field(default_factory=dict)
    latency_count: int = 0

    def add(self, r: dict[str, Any]) -> None:
        self.requests += 1
        self.tokens += _int(r.get("total_tokens"))
        self.prompt_tokens += _int(r.get("prompt_tokens"))
        self.completion_tokens += _int(r.get("completion_tokens"))
        self.cost_usd += _float(r.get("cost_usd"))
        self.saved_usd += _float(r.get("saved_usd"))
        cache = r.get("cache")
        if cache is not None:
            self.cacheable += 1
            self.cache_hits += cache == "hit"
        status = r.get("status")
        if isinstance(status, int) and status >= 400:
            self.errors += 1
        elif isinstance(status, int) and r.get("cost_usd") is None and r.get("cache") != "hit":
            self.unpriced += 1
        self.images += _int(r.get("images"))
        self.audio_seconds += _float(r.get("audio_seconds"))
        latency = r.get("latency_ms")
        if isinstance(latency, int | float) and latency >= 0:
            b = math.floor(math.log(max(latency, 0.001)) / BIN)
            self.latency_bins[b] = self.latency_bins.get(b, 0) + 1
            self.latency_count += 1

    def percentile(self, q: float) -> float | None:
        if not self.latency_count:
            return None
        rank = q * self.latency_count
        seen = 0
        for b in sorted(self.latency_bins):
            seen += self.latency_bins[b]
            if seen >= rank:
                return round(math.exp((b + 0.5) * BIN), 3)  # the bin's middle
        return None  # pragma: no cover - rank <= count always ends the loop

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 9),
            "saved_usd": round(self.saved_usd, 9),
            "cache_hit_rate": round(self.cache_hits / self.cacheable, 4)
            if self.cacheable
            else None,
            "error_rate": round(self.errors / self.requests, 4) if self.requests else None,
            "images": self.images,
            "audio_minutes": round(self.audio_seconds / 60, 3),
            "unpriced": self.unpriced,
            "p50_ms": self.percentile(0.50),
            "p95_ms": self.percentile(0.95),
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
            if self.by:
                key = tuple(_group(record, name) for name in self.by)
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


def _group(record: dict[str, Any], name: str) -> str:
    if name == "day":
        ts = record.get("ts")
        return ts[:10] if isinstance(ts, str) else "-"
    field_ = ("key_alias", "key") if name == "key" else (name,)
    value = next((record[f] for f in field_ if record.get(f) is not None), None)
    return str(value) if value is not None else "-"


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


def render(report: Report, fmt: str, out: IO[str]) -> None:
    rows = list(report.rows())
    if fmt == "json":
        out.write(
            orjson.dumps(
                {
                    "by": list(report.by),
                    "groups": rows[:-1],
                    "total": rows[-1],
                    "skipped_lines": report.skipped,
                    "outside_window": report.outside,
                },
                option=orjson.OPT_INDENT_2,
            ).decode()
            + "\n"
        )
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


def time_window(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    """``--since``/``--until`` as timestamps (None where not given), both against one now."""
    now = time.time()
    return (
        parse_time(since, now) if since else None,
        parse_time(until, now) if until else None,
    )
