"""Per-key budgets: tokens and USD, per UTC day and month.

For every request to the text endpoints that reaches it (cache hits do not, and cost nothing) from
a key with a budget, the key's budgets are charged the estimate the admission stage made — prompt
plus the requested output, or ``output_reserve_tokens`` when none is set — or the request is
refused with 429 ``insufficient_quota`` and ``x-should-retry: false``. A body the admission stage
could not count is refused with 400 naming the field (nothing can be reserved for it). When the
answer has been delivered the charge is settled to the request's ``Outcome`` (``proxy.outcome``),
so concurrent requests can overshoot a budget only by what their answers exceed their
reservations.

The Responses API is one of the optimised endpoints (counted, guarded, reserved and settled like
chat). Images and audio reserve their price where the request tells it (``media_estimate``) and
settle to what the answer says (``media_cost``). Every other POST to /v1 from a key with a budget
is a probe: refused once a budget is spent, and charged after the fact what its answer reports.
Free calls (``proxy.endpoints.free``) are never refused.

Budgets live in ``Counters``: in memory, or in Redis (one Lua script checks every window and
charges them all atomically). While Redis is unreachable, ``redis.on_failure`` decides: ``local``
counts in memory, ``closed`` refuses budgeted requests with 503. Settlements that cannot reach
Redis are kept (merged per counter) and sent once it answers again.
"""

from __future__ import annotations

import calendar
import itertools
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from redis.asyncio import Redis

from proxy.alerts import Alerts
from proxy.config import BudgetSettings
from proxy.context import RequestContext, context_of, unreadable_error
from proxy.endpoints import EMBEDDINGS, free
from proxy.errors import QuotaExceeded, ServiceUnavailable
from proxy.keys import Keys, Limits
from proxy.metrics import Metrics
from proxy.outcome import Outcome
from proxy.pricing import PriceTable
from proxy.store import REDIS, RedisGuard, Shared, hash_tag
from proxy.types import Clock, Handler, Stage

NANO = 1_000_000_000  # USD budgets are counted in nano-dollars (integers, exact in Lua)


# -- counters ------------------------------------------------------------------------------------


def counter_name(prefix: str, scope: str, unit: str, label: str) -> str:
    """A budget counter. The key's scope is the hash tag: every window of one key lives in one
    Redis Cluster slot, so one script checks and charges them all; keys spread over the slots."""
    return f"{prefix}{{{scope}}}:{unit}:{label}"


@dataclass(frozen=True, slots=True)
class Charge:
    counter: str  # e.g. thriftgate:budget:{<scope>}:tokens:d20261122
    limit: int  # 0: charged without a check
    amount: int  # may be negative (a settlement giving back part of a reservation)
    expires_at: float  # wall-clock seconds: the counter outlives its period by a day


class Counters(Protocol):
    name: str

    async def take(self, charges: Sequence[Charge]) -> tuple[Counters, int | None, list[int]]:
        """Charge all of ``charges`` or none: (the counters that took them, the index of the
        charge that did not fit or None, the counters' values: each one's after the charge, or
        the one that did not fit's alone)."""
        ...

    def add(self, charges: Sequence[Charge]) -> None:
        """Charge without a check, now or shortly (settlements)."""
        ...

    async def drain(self) -> None: ...


MAX_LOCAL_COUNTERS = 200_000  # in-process counters kept at most (about 30 MB)


class MemoryCounters:
    """Counters in a dict bounded to ``max_counters``: past it, the periods that are over go
    first, then counters at zero (keys that spent nothing, such as refused ones), and only then
    the counters charged least recently (a process that sees more keys than that forgets the
    quietest ones' spend: use Redis for budgets over that many keys)."""

    name = "memory"

    def __init__(self, clock: Clock = time.time, max_counters: int = MAX_LOCAL_COUNTERS) -> None:
        self.clock = clock
        self.max_counters = max_counters
        self.values: dict[str, list[float]] = {}  # counter -> [value, expires_at]
        self._sweep_at = min(1024, max_counters)

    def value(self, counter: str) -> int:
        entry = self.values.get(counter)
        if entry is None or entry[1] <= self.clock():
            return 0
        return int(entry[0])

    async def take(self, charges: Sequence[Charge]) -> tuple[Counters, int | None, list[int]]:
        return self, *self.take_now(charges)

    def take_now(self, charges: Sequence[Charge]) -> tuple[int | None, list[int]]:
        for i, charge in enumerate(charges):
            used = self.value(charge.counter)
            if charge.limit and used + charge.amount > charge.limit:
                return i, [used]
        self.add(charges)
        return None, [self.value(c.counter) for c in charges]

    def add(self, charges: Sequence[Charge]) -> None:
        now = self.clock()
        values = self.values
        for charge in charges:
            entry = values.pop(charge.counter, None)  # re-inserted last: least recent first
            if entry is None or entry[1] <= now:
                values[charge.counter] = [charge.amount, charge.expires_at]
            else:
                entry[0] += charge.amount
                values[charge.counter] = entry
        if len(values) > self._sweep_at:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        half = self.max_counters // 2
        values = {k: v for k, v in self.values.items() if v[1] > now}  # periods that are over
        if len(values) > half:  # then the counters at zero
            values = {k: v for k, v in values.items() if v[0] > 0}
        if len(values) > half:  # then the least recently charged
            values = dict(itertools.islice(values.items(), len(values) - half, None))
        self.values = values
        self._sweep_at = min(max(1024, 2 * len(values)), self.max_counters)

    async def drain(self) -> None:
        return None


# KEYS: counters. ARGV: limit, amount, expire-at (ms) for each. Checks every limited counter,
# then charges all of them: {0, value 1, value 2, ...} when charged, {i, value} when counter i
# has no room.
TAKE_LUA = """
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 2])
  if limit > 0 then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used + tonumber(ARGV[3 * i - 1]) > limit then
      return {i, used}
    end
  end
end
local out = {0}
for i = 1, #KEYS do
  out[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  redis.call('PEXPIREAT', KEYS[i], ARGV[3 * i])
end
return out
"""


class RedisCounters(Shared[MemoryCounters]):
    """Counters in Redis, shared by every replica. While Redis is unavailable: in memory
    (``closed`` off), or refused (``closed`` on); settlements are kept until it is back."""

    name = "redis"
    operation = "budget"

    def __init__(self, guard: RedisGuard, local: MemoryCounters, *, closed: bool = False) -> None:
        super().__init__(guard, local, TAKE_LUA)
        self.closed = closed
        self.unsent: dict[str, Charge] = {}  # settlements Redis did not take, merged per counter

    async def _run(self, client: Redis, charges: Sequence[Charge]) -> list[int]:
        args: list[int] = []
        for c in charges:
            args += (c.limit, c.amount, int(c.expires_at * 1000))
        assert self.script is not None
        result = await self.script(keys=[c.counter for c in charges], args=args, client=client)
        return [int(v) for v in result]

    async def take(self, charges: Sequence[Charge]) -> tuple[Counters, int | None, list[int]]:
        result = await self.call(lambda c: self._run(c, charges), None)
        if result is None:  # Redis unavailable (the guard has said so)
            if self.closed:
                raise ServiceUnavailable(
                    "thriftgate cannot reach its shared budget counters (Redis) and is set to "
                    "refuse budgeted requests until they are back (redis.on_failure = closed). "
                    "Try again shortly.",
                    headers={"retry-after": "1"},
                )
            return await self.local.take(charges)
        if self.unsent:
            self._send(list(self.unsent.values()))  # Redis answers again: what it missed
            self.unsent = {}
        if result[0]:
            return self, result[0] - 1, result[1:2]
        return self, None, result[1:]

    def add(self, charges: Sequence[Charge]) -> None:
        self._send(charges)

    def _send(self, charges: Sequence[Charge]) -> None:
        self.tasks.spawn(self._settle(charges))

    async def _settle(self, charges: Sequence[Charge]) -> None:
        """Charge without a check now; what Redis does not take is kept for the next chance. On a
        Redis Cluster, settlements of several keys (kept during an outage) go one slot at a
        time."""
        groups: dict[str, list[Charge]] = {}
        for c in charges:
            groups.setdefault(hash_tag(c.counter) if self.cluster else "", []).append(c)
        for group in groups.values():
            if await self.call(lambda c, g=group: self._run(c, g), None) is None:
                self.keep(group)

    def keep(self, charges: Sequence[Charge]) -> None:
        """Keep settlements Redis did not take, merged per counter, for its next answer."""
        for c in charges:
            if len(self.unsent) >= MAX_LOCAL_COUNTERS and c.counter not in self.unsent:
                continue  # a very long outage: beyond this many counters, settlements are lost
            before = self.unsent.get(c.counter)
            amount = c.amount + (before.amount if before is not None else 0)
            self.unsent[c.counter] = Charge(c.counter, 0, amount, c.expires_at)

    async def drain(self) -> None:
        """Wait for the settlements under way, and send what Redis missed once more."""
        await self.tasks.drain()
        if self.unsent:
            charges, self.unsent = list(self.unsent.values()), {}
            await self._settle(charges)


# -- periods -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    unit: str  # tokens | usd
    period: str  # day | month
    limit: float  # tokens, or USD


def period_of(now: float, period: str) -> tuple[str, float]:
    """The UTC period containing ``now``: its label and when it ends (wall-clock seconds)."""
    t = time.gmtime(now)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return f"d{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}", start + 86400.0
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return f"m{t.tm_year:04d}{t.tm_mon:02d}", float(calendar.timegm((year, month, 1, 0, 0, 0)))


def windows(limits: Limits) -> list[Window]:
    candidates = [
        Window("tokens", "day", limits.tokens_per_day),
        Window("tokens", "month", limits.tokens_per_month),
        Window("usd", "day", limits.usd_per_day),
        Window("usd", "month", limits.usd_per_month),
    ]
    return [w for w in candidates if w.limit > 0]


@dataclass(slots=True)
class Reservation:
    counters: Counters
    charges: list[Charge]
    units: list[str]  # the unit of each charge
    tokens: int
    usd_nano: int


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


# -- the stage -----------------------------------------------------------------------------------


class BudgetStage(Stage):
    """Per-key budgets; in the chain only when some key has one (``keys.any_budget``)."""

    def __init__(
        self,
        keys: Keys,
        prices: PriceTable,
        settings: BudgetSettings,
        metrics: Metrics,
        *,
        clock: Clock = time.time,
        alerts: Alerts | None = None,
        on_failure: str = "local",
    ) -> None:
        self.on_failure = on_failure
        self.alerts = alerts
        self.keys = keys
        self.prices = prices
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.counters: Counters = MemoryCounters(clock)
        self.active = keys.any_budget

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """Budgets in Redis when one is configured (falling back to memory while it is down);
        the settlements Redis has not taken yet are sent before it closes."""
        guard = app[REDIS]
        if guard is not None:
            self.counters = RedisCounters(
                guard, MemoryCounters(self.clock), closed=self.on_failure == "closed"
            )
        yield
        await self.counters.drain()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None or request.method != "POST" or free(ctx.endpoint):
            return await handler(request)
        limits = self.keys.limits(ctx.who)
        if not limits.budgeted:
            return await handler(request)
        if ctx.optimised and ctx.prompt_estimate is None:  # admission could not count it
            raise unreadable_error(ctx, "a budget")
        # the text endpoints reserve their estimate; other paid ones are refused once spent and
        # charged after the fact
        await self._reserve(ctx, limits)
        return await handler(request)

    # -- budgets ---------------------------------------------------------------------------------

    async def _reserve(self, ctx: RequestContext, limits: Limits) -> None:
        """Charge the estimate to every budget window, or refuse. Images and audio reserve their
        price where the request tells it (else one nano-dollar); any other endpoint the proxy
        does not count is a probe (one token, one nano-dollar): refused once spent."""
        if not ctx.optimised:
            usd = None
            if ctx.media is not None and ctx.kind is not None:
                usd = self.prices.media_estimate(ctx.kind, ctx.media)
            tokens = 1  # refused once a token budget is spent; settled to the answer's usage
            usd_nano = max(math.ceil(usd * NANO), 1) if usd is not None else 1
        else:
            prompt = ctx.prompt_estimate or 0
            output = 0
            if ctx.endpoint != EMBEDDINGS:
                output = ctx.output_limit or self.settings.output_reserve_tokens
            tokens = prompt + output
            usd = self.prices.estimate(ctx.model, prompt, output)
            usd_nano = math.ceil(usd * NANO) if usd is not None else 0
        now = self.clock()
        key = ctx.who.limits_scope
        charges, units, wins = [], [], windows(limits)
        for w in wins:
            label, ends = period_of(now, w.period)
            amount, limit = (
                (tokens, int(w.limit)) if w.unit == "tokens" else (usd_nano, round(w.limit * NANO))
            )
            counter = counter_name(self.settings.redis_prefix, key, w.unit, label)
            charges.append(Charge(counter, limit, amount, ends + 86400.0))
            units.append(w.unit)
        counters, refused, values = await self.counters.take(charges)
        if refused is not None:
            if self.alerts is not None:
                w = wins[refused]
                used = values[0] / charges[refused].limit
                self.alerts.budget(ctx.key, limits.alias, w.unit, w.period, used, refused=True)
            self._refuse(wins[refused], charges[refused], values[0], now, limits)
        if self.alerts is not None:
            for w, charge, value in zip(wins, charges, values, strict=True):
                self.alerts.budget(ctx.key, limits.alias, w.unit, w.period, value / charge.limit)
        reservation = Reservation(counters, charges, units, tokens, usd_nano)
        ctx.settlers.append(lambda outcome: self._settle(outcome, reservation))

    def _refuse(self, w: Window, charge: Charge, used: int, now: float, limits: Limits) -> None:
        rejected = self.metrics.budget_rejections
        rejected[(w.unit, w.period)] = rejected.get((w.unit, w.period), 0) + 1
        _, ends = period_of(now, w.period)
        who = f"key {limits.alias!r}" if limits.alias else "this API key"
        if w.unit == "tokens":
            left = max(int(w.limit) - used, 0)
            state = f"{used:,} of {int(w.limit):,} tokens used, {left:,} left"
            need = f"an estimated {charge.amount:,} tokens"
        else:
            left_usd = max(w.limit - used / NANO, 0.0)
            state = f"${used / NANO:,.4f} of ${w.limit:,.2f} used, ${left_usd:,.4f} left"
            need = f"an estimated ${charge.amount / NANO:,.4f}"
        verdict = "is spent" if used >= charge.limit else "cannot cover this request"
        hint = (
            "Ask your administrator to raise the budget, or wait for the reset."
            if used >= charge.limit
            else "Ask for fewer output tokens (max_tokens / max_output_tokens: the estimate is "
            "the prompt plus that limit), ask your administrator to raise the budget, or wait "
            "for the reset."
        )
        raise QuotaExceeded(
            f"thriftgate: the {w.unit} budget per {w.period} of {who} {verdict} ({state}; this "
            f"request needs {need}). It resets at {_iso(ends)}. {hint}",
            headers={"x-should-retry": "false"},
        )

    def _settle(self, outcome: Outcome, r: Reservation) -> None:
        """Give back the reservation and charge what the call actually used: the upstream's usage;
        nothing for an answer that failed; the prompt estimate when usage is unknown."""
        spent = outcome.spent
        usd: float | None
        if outcome.ctx.media is not None:  # images and audio: their price, from the answer
            total = (spent or {}).get("total_tokens") or 0
            usd = 0.0 if outcome.failed else outcome.price_usd  # None: keep the reservation
        elif spent is None:
            total = outcome.ctx.prompt_estimate or 0
            usd = self.prices.estimate(outcome.model, total, 0)
        else:
            total = spent["total_tokens"] or 0
            usd = outcome.price_usd
        if usd is None and total == 0 and outcome.ctx.media is None:
            usd = 0.0  # nothing was spent (a failure, or an answer without usage)
        actual_usd = math.ceil(usd * NANO) if usd is not None else r.usd_nano
        deltas = []
        for charge, unit in zip(r.charges, r.units, strict=True):
            delta = total - r.tokens if unit == "tokens" else actual_usd - r.usd_nano
            if delta:
                deltas.append(Charge(charge.counter, 0, delta, charge.expires_at))
        if deltas:
            r.counters.add(deltas)
