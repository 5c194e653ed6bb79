"""The numbers of the savings pages (``thriftgate usage --html`` and the live ``/dashboard``):
totals, the same totals per model, key, tag and endpoint, a time series, the error codes.

A record is counted in its *cell* (its model, endpoint and whether it has tags; a
``report.Totals``: counters and log-scale histograms), in its key's row, in each of its tags'
rows and in its time slot; the model, endpoint and untagged rows and the total are the cells
added up when a page is drawn. That keeps the cost per request small (``/dashboard`` counts every
one) and the memory constant whatever the log's size: at most ``MAX_GROUPS`` models and
endpoints, ``MAX_KEYS`` keys and ``MAX_TAGS`` tags (the rest are an ``(other)`` row), and time
slots that start a minute wide and are merged into hours, then days, once there are more than
``MAX_SLOTS``. A worker's summary
is ``dump``-ed for the others, which ``merge`` it (``/dashboard`` with ``--workers``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from proxy.report import Facts, Totals, _groups, _ts, error_code, group, top_errors

DIMENSIONS = ("model", "key", "tag", "endpoint")
MAX_GROUPS = 200  # distinct models, and endpoints; the rest are counted under OTHER
MAX_KEYS = 2000  # distinct keys (aliases); the rest are counted under OTHER
MAX_TAGS = 500  # distinct tags; the rest are counted under OTHER
MAX_CELLS = 2000  # distinct (model, endpoint, tagged): past that, one more (OTHER, OTHER) cell
OTHER = "(other)"
UNTAGGED = ("-",)  # the tag group of a request without tags (as ``thriftgate usage --by tag``)
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

    def add(self, f: Facts) -> None:
        """One record, by its ``report.facts``."""
        tokens, cost, saved, cacheable, hit, error = f[:6]
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
    model: str
    endpoint: str
    tagged: bool  # its requests have tags (counted again per tag); else their tag group is "-"
    totals: Totals = field(default_factory=Totals)


@dataclass(slots=True)
class Summary:
    # (model, endpoint, tagged) -> counts: the total, the model and endpoint rows, the "-" tag
    cells: dict[Any, Cell] = field(default_factory=dict)
    keys: dict[str, Totals] = field(default_factory=dict)  # the key rows (the alias if any)
    tags: dict[str, Totals] = field(default_factory=dict)  # the rows of the tags requests had
    models: set[str] = field(default_factory=set)  # the names the cells have, each capped
    endpoints: set[str] = field(default_factory=set)
    made: int = 0  # distinct cells (``cells`` also files some under a second ident)
    resolution: int = 60  # seconds per slot
    slots: dict[int, Slot] = field(default_factory=dict)  # slot start (POSIX seconds) -> counters
    error_codes: dict[str, int] = field(default_factory=dict)
    first: float | None = None  # the earliest and latest record's time
    last: float | None = None

    def add(self, record: dict[str, Any], at: float | None = None) -> None:
        """One usage record; ``at``: its time (else read from its ``ts``)."""
        get = record.get
        tags = get("tags")
        tagged = type(tags) is list and len(tags) > 0
        ident = (get("model"), get("endpoint"), tagged)
        try:
            cell = self.cells.get(ident)
        except TypeError:  # a value that is not hashable (a hand-edited log): by its names
            ident = (group(record, "model"), group(record, "endpoint"), tagged)
            cell = self.cells.get(ident)
        if cell is None:
            cell = self._cell(ident, record, tagged)
        part = cell.totals.add(record)
        alias = get("key_alias")
        key = alias if alias is not None else get("key")
        totals = self.keys.get(key) if type(key) is str else None
        if totals is None:
            totals = _row(self.keys, group(record, "key"), MAX_KEYS)
        totals.apply(part)
        if tagged:
            for name in _groups(record, "tag"):
                totals = self.tags.get(name)
                if totals is None:
                    totals = _row(self.tags, name, MAX_TAGS)
                totals.apply(part)
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

    def _cell(self, ident: Any, record: dict[str, Any], tagged: bool) -> Cell:
        model = _capped(self.models, group(record, "model"), MAX_GROUPS)
        endpoint = _capped(self.endpoints, group(record, "endpoint"), MAX_GROUPS)
        if self.made >= MAX_CELLS:  # a flood of odd models and paths: one more cell
            model = endpoint = OTHER
        names = (model, endpoint, tagged)
        cell = self.cells.get(names)
        if cell is None:
            cell = self.cells[names] = Cell(model, endpoint, tagged)
            self.made += 1
        if ident != names and len(self.cells) < 2 * MAX_CELLS:
            self.cells[ident] = cell  # found at once next time (the same cell, twice)
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
        for cell in other.unique_cells():
            names = (cell.model, cell.endpoint, cell.tagged)
            mine = self.cells.get(names)
            if mine is None:
                mine = self.cells[names] = Cell(*names)
                self.made += 1
            mine.totals.merge(cell.totals)
        for rows, theirs, cap in (
            (self.keys, other.keys, MAX_KEYS),
            (self.tags, other.tags, MAX_TAGS),
        ):
            for name, totals in theirs.items():
                _row(rows, name, cap).merge(totals)
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

    def unique_cells(self) -> list[Cell]:
        """Each cell once (a cell can be filed under two idents)."""
        return list({id(c): c for c in self.cells.values()}.values())

    def dump(self) -> dict[str, Any]:
        return {
            "cells": [
                [c.model, c.endpoint, c.tagged, c.totals.dump()] for c in self.unique_cells()
            ],
            "keys": {name: totals.dump() for name, totals in self.keys.items()},
            "tags": {name: totals.dump() for name, totals in self.tags.items()},
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
        for model, endpoint, tagged, totals in data["cells"]:
            cell = Cell(str(model), str(endpoint), bool(tagged), Totals.load(totals))
            cells[(cell.model, cell.endpoint, cell.tagged)] = cell
        return cls(
            cells=cells,
            made=len(cells),
            keys={str(name): Totals.load(t) for name, t in data["keys"].items()},
            tags={str(name): Totals.load(t) for name, t in data["tags"].items()},
            resolution=int(data["resolution"]),
            slots={int(s[0]): Slot(**dict(zip(names, s[1:], strict=True))) for s in data["slots"]},
            error_codes=dict(data["error_codes"]),
            first=data["first"],
            last=data["last"],
        )

    def groups(self) -> tuple[Totals, dict[str, dict[str, Totals]]]:
        """The total and the rows of each dimension."""
        total = Totals()
        groups: dict[str, dict[str, Totals]] = {
            "model": {},
            "key": self.keys,
            "tag": dict(self.tags),
            "endpoint": {},
        }
        for cell in self.unique_cells():
            total.merge(cell.totals)
            rows = [groups["model"], cell.model], [groups["endpoint"], cell.endpoint]
            if not cell.tagged:
                rows = (*rows, [groups["tag"], UNTAGGED[0]])
            for table, name in rows:
                table.setdefault(name, Totals()).merge(cell.totals)
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


def _row(rows: dict[str, Totals], name: str, cap: int) -> Totals:
    """The row of ``name`` (new, or OTHER's once there are ``cap`` rows)."""
    found = rows.get(name)
    if found is None:
        found = rows.setdefault(name if len(rows) < cap else OTHER, Totals())
    return found


def _capped(seen: set[str], name: str, cap: int) -> str:
    if name not in seen:
        if len(seen) >= cap:
            return OTHER
        seen.add(name)
    return name


def _top(groups: dict[str, Totals], rows: int) -> list[tuple[str, Totals]]:
    ranked = sorted(groups.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))
    return ranked[:rows]


def _iso(when: float | None) -> str | None:
    if when is None:
        return None
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(when))
