"""The numbers of the savings pages (``thriftgate usage --html`` and the live ``/dashboard``):
totals, the same totals per model, key, tag and endpoint, a time series, the error codes.

A record is counted once, in its *cell* (its model, key, endpoint and tags; ``report.Totals``:
counters and log-scale histograms) and its time slot; the per-dimension rows are the cells added
up when a page is drawn. That keeps the cost per request small (``/dashboard`` counts every one)
and the memory constant whatever the log's size: at most ``MAX_CELLS`` cells (past that, a new
combination is counted under the names already seen, ``(other)`` for a new one), and time slots
that start a minute wide and are merged into hours, then days, once there are more than
``MAX_SLOTS``. A worker's summary is ``dump``-ed for the others, which ``merge`` it
(``/dashboard`` with ``--workers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.report import Totals, _groups, _ts, error_code, top_errors

DIMENSIONS = ("model", "key", "tag", "endpoint")
MAX_CELLS = 2000  # distinct (model, key, endpoint, tags); the rest are counted as described above
OTHER = "(other)"
MAX_CODES = 200  # distinct error codes kept; the rest are counted under OTHER
RESOLUTIONS = (
    (60, "minute", "%Y-%m-%dT%H:%M"),
    (3600, "hour", "%Y-%m-%dT%H"),
    (86400, "day", "%Y-%m-%d"),
)
MAX_SLOTS = 1500  # time slots kept before they are merged into the next resolution
MAX_BARS = 200  # a chart shows at most this many slots (the resolution is chosen to fit)
ROWS = 12  # a table shows the groups that cost the most (then requests)


@dataclass(slots=True)
class Slot:
    """One time slot's counters."""

    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0
    cache_hits: int = 0
    cacheable: int = 0
    errors: int = 0

    def add(self, part: tuple[int, float, float, int, int, int]) -> None:
        """One record, as ``Totals.add`` counted it."""
        tokens, cost, saved, cacheable, hit, error = part
        self.requests += 1
        self.tokens += tokens
        self.cost_usd += cost
        self.saved_usd += saved
        self.cacheable += cacheable
        self.cache_hits += hit
        self.errors += error

    def merge(self, other: Slot) -> None:
        for name in self.__slots__:  # type: ignore[attr-defined]
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def row(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "cost_usd": round(self.cost_usd, 9),
            "saved_usd": round(self.saved_usd, 9),
            "cache_hit_rate": round(self.cache_hits / self.cacheable, 4)
            if self.cacheable
            else None,
            "errors": self.errors,
        }


@dataclass(slots=True)
class Cell:
    names: tuple[tuple[str, ...], ...]  # its group(s) in each of DIMENSIONS
    totals: Totals = field(default_factory=Totals)


@dataclass(slots=True)
class Summary:
    cells: dict[Any, Cell] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=lambda: {d: set() for d in DIMENSIONS})
    resolution: int = 60  # seconds per slot
    slots: dict[int, Slot] = field(default_factory=dict)  # slot start (POSIX seconds) -> counters
    error_codes: dict[str, int] = field(default_factory=dict)
    first: float | None = None  # the earliest and latest record's time
    last: float | None = None

    def add(self, record: dict[str, Any], at: float | None = None) -> None:
        """One usage record; ``at``: its time (else read from its ``ts``)."""
        get = record.get
        tags = get("tags")
        alias = get("key_alias")
        ident = (
            get("model"),
            alias if alias is not None else get("key"),
            get("endpoint"),
            tuple(tags) if type(tags) is list else tags,
        )
        try:
            cell = self.cells.get(ident)
        except TypeError:  # a value that is not hashable (a hand-edited log): by its names
            ident = tuple(_groups(record, d) for d in DIMENSIONS)
            cell = self.cells.get(ident)
        if cell is None:
            cell = self._cell(ident, record)
        part = cell.totals.add(record)
        if part[5] or get("error") is not None:
            code = error_code(record)
            if code is not None:
                self._count_error(code, 1)
        when = at if at is not None else _ts(record)
        if when is not None:
            self._slot(when).add(part)
            if self.first is None or when < self.first:
                self.first = when
            if self.last is None or when > self.last:
                self.last = when

    def _cell(self, ident: Any, record: dict[str, Any]) -> Cell:
        names = tuple(_groups(record, d) for d in DIMENSIONS)
        if len(self.cells) >= MAX_CELLS:  # full: names already seen, or (other)
            names = tuple(
                tuple(n if n in self.seen[d] else OTHER for n in group)
                for d, group in zip(DIMENSIONS, names, strict=True)
            )
            if len(self.cells) >= 2 * MAX_CELLS:  # and the combinations of those: one cell
                names = ((OTHER,),) * len(DIMENSIONS)
            ident = names
            found = self.cells.get(ident)
            if found is not None:
                return found
        else:
            for d, group in zip(DIMENSIONS, names, strict=True):
                self.seen[d].update(group)
        cell = self.cells[ident] = Cell(names)
        return cell

    def _count_error(self, code: str, n: int) -> None:
        if code not in self.error_codes and len(self.error_codes) >= MAX_CODES:
            code = OTHER
        self.error_codes[code] = self.error_codes.get(code, 0) + n

    def _slot(self, when: float) -> Slot:
        start = int(when // self.resolution) * self.resolution
        slot = self.slots.get(start)
        if slot is None:
            slot = self.slots[start] = Slot()
            if len(self.slots) > MAX_SLOTS and self.resolution < RESOLUTIONS[-1][0]:
                self._coarsen(next(r for r, _, _ in RESOLUTIONS if r > self.resolution))
                return self._slot(when)
        return slot

    def _coarsen(self, resolution: int) -> None:
        slots, self.slots, self.resolution = self.slots, {}, resolution
        for start, slot in slots.items():
            merged = self.slots.setdefault(int(start // resolution) * resolution, Slot())
            merged.merge(slot)

    # -- across workers ---------------------------------------------------------------------------
    def merge(self, other: Summary) -> None:
        for cell in other.cells.values():
            mine = self.cells.get(cell.names)
            if mine is None:
                mine = self.cells[cell.names] = Cell(cell.names)
            mine.totals.merge(cell.totals)
        for code, n in other.error_codes.items():
            self._count_error(code, n)
        if other.resolution > self.resolution:
            self._coarsen(other.resolution)
        for start, slot in other.slots.items():
            self.slots.setdefault(int(start // self.resolution) * self.resolution, Slot()).merge(
                slot
            )
        if other.first is not None:
            self.first = other.first if self.first is None else min(self.first, other.first)
        if other.last is not None:
            self.last = other.last if self.last is None else max(self.last, other.last)

    def dump(self) -> dict[str, Any]:
        return {
            "cells": [[c.names, c.totals.dump()] for c in self.cells.values()],
            "resolution": self.resolution,
            "slots": [
                [start, *(getattr(s, n) for n in Slot.__slots__)]  # type: ignore[attr-defined]
                for start, s in self.slots.items()
            ],
            "error_codes": self.error_codes,
            "first": self.first,
            "last": self.last,
        }

    @classmethod
    def load(cls, data: dict[str, Any]) -> Summary:
        names = Slot.__slots__  # type: ignore[attr-defined]
        cells = {}
        for groups, totals in data["cells"]:
            key = tuple(tuple(str(n) for n in group) for group in groups)
            cells[key] = Cell(key, Totals.load(totals))
        return cls(
            cells=cells,
            resolution=int(data["resolution"]),
            slots={int(s[0]): Slot(**dict(zip(names, s[1:], strict=True))) for s in data["slots"]},
            error_codes=dict(data["error_codes"]),
            first=data["first"],
            last=data["last"],
        )

    def groups(self) -> tuple[Totals, dict[str, dict[str, Totals]]]:
        """The total and the rows of each dimension, added up from the cells."""
        total = Totals()
        groups: dict[str, dict[str, Totals]] = {d: {} for d in DIMENSIONS}
        for cell in self.cells.values():
            total.merge(cell.totals)
            for d, names in zip(DIMENSIONS, cell.names, strict=True):
                rows = groups[d]
                for name in names:
                    row = rows.get(name)
                    if row is None:
                        row = rows[name] = Totals()
                    row.merge(cell.totals)
        return total, groups

    # -- what the pages show ----------------------------------------------------------------------
    def view(self, rows: int = ROWS) -> dict[str, Any]:
        """Everything a page shows, as plain data (the numbers ``thriftgate usage --format json``
        gives for the same records: totals, ``--by model``/``key``/``tag``/``endpoint`` rows, the
        ``--by minute``/``hour``/``day`` series)."""
        total, groups = self.groups()
        return {
            "from": _iso(self.first),
            "to": _iso(self.last),
            "total": total.row(),
            "groups": {
                d: {
                    "rows": [{"name": n, **t.row()} for n, t in _top(groups[d], rows)],
                    "count": len(groups[d]),
                }
                for d in DIMENSIONS
            },
            "series": self.series(),
            "error_codes": top_errors(self.error_codes, rows),
        }

    def series(self) -> dict[str, Any]:
        """The slots from the first to the last record (empty ones too), in the finest resolution
        that needs at most MAX_BARS of them."""
        if self.first is None or self.last is None:
            return {"resolution": None, "slots": []}
        usable = [r for r in RESOLUTIONS if r[0] >= self.resolution]
        seconds, name, fmt = next(
            (r for r in usable if self.last // r[0] - self.first // r[0] < MAX_BARS), usable[-1]
        )
        first = int(self.first // seconds) * seconds
        count = int(self.last // seconds - self.first // seconds) + 1
        merged: dict[int, Slot] = {}
        for start, slot in self.slots.items():
            merged.setdefault(int(start // seconds) * seconds, Slot()).merge(slot)
        slots = []
        for i in range(count):
            start = first + i * seconds
            slot = merged.get(start, Slot())
            slots.append({"label": time.strftime(fmt, time.gmtime(start)), **slot.row()})
        return {"resolution": name, "slots": slots}


def _top(groups: dict[str, Totals], rows: int) -> list[tuple[str, Totals]]:
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))
    return ranked[:rows]


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))
