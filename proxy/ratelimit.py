"""Rate limiting: token buckets for requests and tokens per minute, per key and per model.

Every request to the text endpoints (chat, completions, embeddings, Responses) that reaches the
stage (cache hits do not) is charged one request and its estimated tokens (prompt estimate + its
output limit, or ``default_output_tokens``) against its key's RPM/TPM buckets and the global
buckets of its model (``[model_limits."pattern"]``). After the answer the token charge is settled
to the actual usage.
Images and audio are charged one request (and the tokens their answers report, afterwards).

- ``reject`` mode: a request that does not fit gets 429 ``rate_limit_exceeded`` with
  ``retry-after``/``retry-after-ms`` and OpenAI's ``x-ratelimit-*`` headers;
- ``queue`` mode: it waits, first come first served per key, until it fits or ``max_wait_s``
  passes; a client that disconnects while waiting leaves the queue and is not charged;
- a request larger than a bucket's capacity is refused at once;
- adaptive (queue mode): the upstream's own ``x-ratelimit-remaining-*``/``reset-*`` headers and
  429s hold new requests for that model back, queued here, until its limits reset.

Buckets live in memory, or in Redis (one Lua script refills and takes atomically on Redis's own
clock), falling back to memory while Redis is unavailable.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict
from redis.asyncio import Redis

from proxy.background import Background
from proxy.config import ModelLimit, RateLimitSettings
from proxy.context import RequestContext, context_of, unreadable_error
from proxy.endpoints import EMBEDDINGS
from proxy.errors import ProxyError
from proxy.keys import Keys, Limits
from proxy.metrics import Metrics
from proxy.outcome import Outcome
from proxy.store import REDIS, RedisGuard, Shared, hash_tag
from proxy.types import Clock, Handler, Sleep, Stage

HEADER_KINDS = ("requests", "tokens")


class RateLimited(ProxyError):
    """429 ``rate_limit_exceeded``; ``kind`` (requests or tokens) is OpenAI's error type."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        kind: str = "requests",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self.type = kind


# -- OpenAI's duration format (Go's time.Duration) -----------------------------------------------


def format_duration(seconds: float) -> str:
    """``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``: as OpenAI's x-ratelimit-reset-* headers."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(text: str | None) -> float | None:
    """Seconds in a Go duration (``6m0s``, ``20ms``) or a plain number of seconds; None if not."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


# -- buckets -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    # e.g. thriftgate:rl:{key:<scope>}:requests: the hash tag ({key:...} or {model:...}) keeps a
    # key's buckets in one Redis Cluster slot, and a model's in one
    name: str
    scope: str  # key | model
    kind: str  # requests | tokens
    capacity: float
    rate: float  # refill per second
    cost: float


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    wait_s: float  # when not ok: how long until every bucket has room
    levels: tuple[float, ...]  # each bucket's level (after the charge when ok)


class Buckets(Protocol):
    name: str

    async def take(self, buckets: Sequence[Bucket]) -> Verdict:
        """Charge every bucket its cost if all have room."""
        ...

    def settle(self, adjustments: Sequence[Bucket]) -> None:
        """Charge each bucket its ``cost`` regardless (negative: give back), now or shortly."""
        ...

    async def drain(self) -> None:
        """Send what ``settle`` has not sent yet."""
        ...


MAX_BUCKETS = 100_000  # in-process buckets kept at most (about 15 MB)
MAX_HOLDS = 10_000  # adaptive holds kept at most


class MemoryBuckets:
    """Exact token buckets on the event loop (one coroutine at a time: no lock needed), at most
    ``max_buckets`` of them: buckets that have refilled are forgotten first (they start full
    anyway), then the ones untouched the longest."""

    name = "memory"

    def __init__(self, clock: Clock = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self.state: dict[str, list[float]] = {}  # name -> [level, updated_at]
        self._sweep_at = min(4096, max_buckets)

    def level(self, bucket: Bucket, now: float) -> float:
        entry = self.state.get(bucket.name)
        if entry is None:
            return bucket.capacity
        return min(bucket.capacity, entry[0] + (now - entry[1]) * bucket.rate)

    async def take(self, buckets: Sequence[Bucket]) -> Verdict:
        return self.take_now(buckets)

    def settle(self, adjustments: Sequence[Bucket]) -> None:
        self.take_now(adjustments, force=True)

    async def drain(self) -> None:
        return None

    def take_now(self, buckets: Sequence[Bucket], *, force: bool = False) -> Verdict:
        now = self.clock()
        state = self.state
        levels = []
        wait = 0.0
        for b in buckets:
            entry = state.get(b.name)
            level = b.capacity if entry is None else entry[0] + (now - entry[1]) * b.rate
            if level > b.capacity:
                level = b.capacity
            levels.append(level)
            if level < b.cost:
                wait = max(wait, (b.cost - level) / b.rate)
        if wait > 0 and not force:
            return Verdict(False, wait, tuple(levels))
        for i, b in enumerate(buckets):
            level = levels[i] = levels[i] - b.cost
            entry = state.get(b.name)
            if entry is None:
                state[b.name] = [level, now]
            else:
                entry[0], entry[1] = level, now
        if len(state) > self._sweep_at:
            self._sweep(now)
        return Verdict(True, 0.0, tuple(levels))

    def _sweep(self, now: float) -> None:
        """Forget buckets that have refilled (they start full anyway); past the bound, the half
        untouched the longest."""
        state = {k: v for k, v in self.state.items() if now - v[1] < 120}
        if len(state) > self.max_buckets // 2:
            newest = sorted(state.items(), key=lambda kv: kv[1][1])[-(self.max_buckets // 2) :]
            state = dict(newest)
        self.state = state
        self._sweep_at = min(max(4096, 2 * len(state)), self.max_buckets)


# KEYS: buckets. ARGV[1]: 1 to charge regardless; then capacity, rate per ms, cost and a
# settlement carried over (tokens to add to the charge, negative to give back) for each.
# Refills every bucket on Redis's own clock and applies the settlements; charges all of them only
# if all have room. Returns {1|0, wait in ms, level 1, level 2, ...} (levels as strings: Lua
# numbers would be truncated to integers).
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local force = ARGV[1] == '1'
local levels = {}
local wait = 0
for i = 1, #KEYS do
  local cap = tonumber(ARGV[4 * i - 2])
  local rate = tonumber(ARGV[4 * i - 1])
  local cost = tonumber(ARGV[4 * i])
  local s = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = cap
  if s[1] then
    level = math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
  end
  level = level - tonumber(ARGV[4 * i + 1])
  levels[i] = level
  if level < cost then wait = math.max(wait, (cost - level) / rate) end
end
local ok = not (wait > 0 and not force)
for i = 1, #KEYS do
  local cap = tonumber(ARGV[4 * i - 2])
  local rate = tonumber(ARGV[4 * i - 1])
  if ok then levels[i] = levels[i] - tonumber(ARGV[4 * i]) end
  if ok or tonumber(ARGV[4 * i + 1]) ~= 0 then
    redis.call('HSET', KEYS[i], 'l', tostring(levels[i]), 't', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.max(1, math.ceil((cap - levels[i]) / rate)) + 1000)
  end
end
local out = {1, 0}
if not ok then out = {0, math.ceil(wait)} end
for i = 1, #KEYS do out[i + 2] = tostring(levels[i]) end
return out
"""

SETTLE_EVERY_S = 1.0  # Redis: settlements not carried by a take within this are sent alone


class RedisBuckets(Shared[MemoryBuckets]):
    """Buckets in Redis, shared by every replica; in memory while Redis is unavailable.

    A settlement is not a round trip of its own: it is carried by the next take of the same
    bucket (one script call per request), or sent with the others within ``SETTLE_EVERY_S``."""

    name = "redis"
    operation = "ratelimit"

    def __init__(self, guard: RedisGuard, local: MemoryBuckets) -> None:
        super().__init__(guard, local, TAKE_LUA)
        self.pending: dict[str, tuple[Bucket, float]] = {}  # settlements not yet in Redis
        self._timer: asyncio.TimerHandle | None = None

    async def _run(
        self, client: Redis, buckets: Sequence[Bucket], carried: list[float], force: bool
    ) -> Verdict:
        args: list[Any] = [1 if force else 0]
        for b, adjust in zip(buckets, carried, strict=True):
            args += (b.capacity, b.rate / 1000, b.cost, adjust)
        assert self.script is not None
        out = await self.script(keys=[b.name for b in buckets], args=args, client=client)
        levels = tuple(float(v) for v in out[2:])
        return Verdict(bool(int(out[0])), int(out[1]) / 1000, levels)

    async def _run_slots(
        self, client: Redis, buckets: Sequence[Bucket], carried: list[float], force: bool
    ) -> Verdict:
        """``_run`` on a Redis Cluster: one call per hash tag (the key's buckets, a model's). A
        later group without room gives back what the earlier ones took, so a refused request is
        charged nothing (between the two a concurrent request may see less room: it can be
        refused, never let through beyond a limit)."""
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(hash_tag(b.name), []).append(i)
        if len(groups) == 1:
            return await self._run(client, buckets, carried, force)
        levels = [b.capacity for b in buckets]
        taken: list[list[int]] = []
        for n, idx in enumerate(groups.values()):
            sub = [buckets[i] for i in idx]
            verdict = await self._run(client, sub, [carried[i] for i in idx], force)
            for k, i in enumerate(idx):
                levels[i] = verdict.levels[k]
            if verdict.ok:
                taken.append(idx)
                continue
            for idx_back in taken:  # give back what the earlier groups took
                back = [buckets[i] for i in idx_back]
                free = [Bucket(b.name, b.scope, b.kind, b.capacity, b.rate, 0.0) for b in back]
                await self._run(client, free, [-b.cost for b in back], True)
            for later in list(groups.values())[n + 1 :]:  # not sent: their settlements wait
                self.keep([(buckets[i], carried[i]) for i in later])
            return Verdict(False, verdict.wait_s, tuple(levels))
        return Verdict(True, 0.0, tuple(levels))

    async def take(self, buckets: Sequence[Bucket]) -> Verdict:
        carried = [self.pending.pop(b.name, (b, 0.0))[1] for b in buckets]
        run = self._run_slots if self.cluster else self._run
        verdict = await self.call(lambda c: run(c, buckets, carried, False), None)
        if verdict is None:  # Redis unavailable: local buckets (the guard has said so)
            self.keep(list(zip(buckets, carried, strict=True)))
            return self.local.take_now(buckets)
        return verdict

    def settle(self, adjustments: Sequence[Bucket]) -> None:
        """Charge (or give back) ``cost`` of each bucket with its next take, or within a second."""
        self.keep([(b, b.cost) for b in adjustments])
        if self._timer is None and self.pending:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(SETTLE_EVERY_S, self._flush_later)

    def keep(self, items: list[tuple[Bucket, float]]) -> None:
        """Settlements to carry with the next take of each bucket (merged per bucket)."""
        for bucket, delta in items:
            if delta:
                _, before = self.pending.get(bucket.name, (bucket, 0.0))
                self.pending[bucket.name] = (bucket, before + delta)

    def _flush_later(self) -> None:
        self._timer = None
        self.tasks.spawn(self.flush())

    async def flush(self) -> None:
        """Send every pending settlement now, in one script call."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.pending:
            return
        items, self.pending = list(self.pending.values()), {}
        buckets = [Bucket(b.name, b.scope, b.kind, b.capacity, b.rate, 0.0) for b, _ in items]
        carried = [delta for _, delta in items]
        run = self._run_slots if self.cluster else self._run
        done = await self.call(lambda c: run(c, buckets, carried, True), None)
        if done is None:  # Redis unavailable: the local buckets take them
            self.local.settle(
                [Bucket(b.name, b.scope, b.kind, b.capacity, b.rate, d) for b, d in items]
            )

    async def drain(self) -> None:
        await self.flush()
        await self.tasks.drain()


# -- the stage -----------------------------------------------------------------------------------


@dataclass(slots=True)
class BucketCharge:
    buckets: list[Bucket]
    tokens: float  # the estimate charged to the token buckets


class RateLimitStage(Stage):
    def __init__(
        self,
        settings: RateLimitSettings,
        keys: Keys,
        model_limits: tuple[ModelLimit, ...],
        metrics: Metrics,
        *,
        shared_upstream_key: bool = False,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.model_limits = model_limits
        self.metrics = metrics
        self.shared_upstream_key = shared_upstream_key  # upstream limits are the proxy's own key
        self.clock = clock
        self.sleep = sleep
        self.buckets: Buckets = MemoryBuckets(clock)
        self.queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self.held_until: dict[tuple[str | None, str], float] = {}  # adaptive: (key, model)
        # adaptive holding makes clients wait at the proxy, so it works in queue mode only
        self.adaptive = settings.adaptive and settings.mode == "queue"
        self.enabled = keys.any_rate_limit or any(m.rpm or m.tpm for m in model_limits)
        self.active = self.enabled or self.adaptive  # neither: not in the chain
        self.guard: RedisGuard | None = None  # adaptive holds shared by the fleet, with Redis
        self.holds_shared = Background()

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """Buckets (and adaptive holds) shared in Redis when one is configured; on the way out,
        the settlements still waiting for Redis, and the holds being shared, are sent."""
        guard = app[REDIS]
        if guard is not None and self.enabled:
            self.buckets = RedisBuckets(guard, MemoryBuckets(self.clock))
        if guard is not None and self.adaptive:
            self.guard = guard
        yield
        await self.buckets.drain()
        await self.holds_shared.drain()

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None:
            return await handler(request)
        text = ctx.optimised
        if text:
            if ctx.model is None or ctx.unreadable is not None:
                # what cannot be read cannot be charged: refused for a rate-limited key, else sent
                if self.enabled and self.keys.limits(ctx.who).rate_limited:
                    ctx.unreadable = ctx.unreadable or "model"  # no model: nothing to charge
                    raise unreadable_error(ctx, "a rate limit")
                return await handler(request)
            if self.guard is not None:
                await self._shared_hold(ctx)
        elif ctx.media is None or not self.enabled:
            return await handler(request)
        # images and audio: one request against the request rates; tokens only as the answer
        # reports them, settled afterwards
        tokens = self._tokens(ctx) if text else 0
        limits = self.keys.limits(ctx.who)
        verdict: Verdict | None = None
        buckets = self._buckets(ctx, limits, tokens) if self.enabled else []
        if buckets:
            charge = BucketCharge(buckets, tokens)
            verdict = await self._acquire(ctx, buckets, limits)
            ctx.settlers.append(lambda outcome: self._settle(outcome, charge))
        elif text and self.adaptive and not self.enabled:
            await self._wait_for_upstream(ctx, limits)
        resp = await handler(request)
        if text and self.adaptive:
            self._observe(ctx, resp)
        if self.settings.expose_headers and verdict is not None:
            self._headers(resp.headers, buckets, verdict.levels, limits)
        return resp

    # -- what a request is charged ---------------------------------------------------------------

    def _tokens(self, ctx: RequestContext) -> int:
        prompt = ctx.prompt_estimate or 0
        if ctx.endpoint == EMBEDDINGS:
            return prompt
        return prompt + (ctx.output_limit or self.settings.default_output_tokens)

    def _buckets(self, ctx: RequestContext, limits: Limits, tokens: int) -> list[Bucket]:
        prefix = self.settings.redis_prefix
        key = ctx.who.limits_scope
        out = []
        rpm, tpm = limits.rpm, limits.tpm
        if rpm:
            cap = limits.rpm_burst or rpm
            name = f"{prefix}{{key:{key}}}:requests"
            out.append(Bucket(name, "key", "requests", cap, rpm / 60, 1))
        if tpm:
            cap = limits.tpm_burst or tpm
            name = f"{prefix}{{key:{key}}}:tokens"
            out.append(Bucket(name, "key", "tokens", cap, tpm / 60, tokens))
        for m in self.model_limits if ctx.model is not None else ():
            if ctx.model == m.pattern or fnmatch.fnmatchcase(ctx.model, m.pattern):
                if m.rpm:
                    name = f"{prefix}{{model:{m.pattern}}}:requests"
                    out.append(Bucket(name, "model", "requests", m.rpm, m.rpm / 60, 1))
                if m.tpm:
                    name = f"{prefix}{{model:{m.pattern}}}:tokens"
                    out.append(Bucket(name, "model", "tokens", m.tpm, m.tpm / 60, tokens))
                break
        return out

    # -- taking ----------------------------------------------------------------------------------

    async def _acquire(self, ctx: RequestContext, buckets: list[Bucket], limits: Limits) -> Verdict:
        for b in buckets:
            if b.cost > b.capacity:
                self._count("too_large")
                scope = "this API key" if b.scope == "key" else "the model's global limit"
                raise RateLimited(
                    f"Request too large for {ctx.model} on {scope}: limit {int(b.capacity)} "
                    f"{b.kind} per minute, requested {int(b.cost)}. Send fewer tokens, or set a "
                    "lower max_tokens.",
                    param=None,
                    code="rate_limit_exceeded",
                    headers={"x-should-retry": "false"},
                )
        queue_mode = self.settings.mode == "queue"
        scope = ctx.who.limits_scope
        queue = self.queues.get(scope)
        if not queue:  # nobody waiting ahead: the common, fast path
            hold = self._hold_left(ctx)
            verdict = await self.buckets.take(buckets) if hold <= 0 else None
            if verdict is not None and verdict.ok:
                return verdict
            if not queue_mode:
                wait = verdict.wait_s if verdict is not None else hold
                self._reject(buckets, verdict, wait, limits)
        return await self._queue(ctx, scope, buckets, limits)

    async def _queue(
        self, ctx: RequestContext, scope: str, buckets: list[Bucket], limits: Limits
    ) -> Verdict:
        """Wait in the key's line; the head takes as soon as the buckets have room."""
        loop = asyncio.get_running_loop()
        me: asyncio.Future[None] = loop.create_future()
        queue = self.queues.setdefault(scope, collections.deque())
        queue.append(me)
        if queue[0] is me:
            me.set_result(None)
        started = self.clock()
        deadline = started + self.settings.max_wait_s
        self._count("queued")
        try:
            await me  # our turn: we are the head of the line
            while True:
                hold = self._hold_left(ctx)
                verdict = await self.buckets.take(buckets) if hold <= 0 else None
                if verdict is not None and verdict.ok:
                    ctx.rate_limited_ms = round((self.clock() - started) * 1000, 3)
                    return verdict
                wait = verdict.wait_s if verdict is not None else hold
                if self.clock() + wait > deadline:
                    ctx.rate_limited_ms = round((self.clock() - started) * 1000, 3)
                    self._reject(buckets, verdict, wait, limits)
                await self.sleep(min(wait, 1.0))  # re-checked at least every second
        finally:
            if me in queue:
                queue.remove(me)
            if queue and not queue[0].done():
                queue[0].set_result(None)
            if not queue:
                self.queues.pop(scope, None)

    def _reject(
        self, buckets: list[Bucket], verdict: Verdict | None, wait: float, limits: Limits
    ) -> None:
        self._count("rejected")
        headers: CIMultiDict[str] = CIMultiDict()
        headers["retry-after"] = str(max(1, math.ceil(wait)))
        headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
        if verdict is not None:
            self._headers(headers, buckets, verdict.levels, limits)
            pairs = list(zip(buckets, verdict.levels, strict=True))
            b, level = next(((b, lv) for b, lv in pairs if lv < b.cost), pairs[0])
            per = "requests per min (RPM)" if b.kind == "requests" else "tokens per min (TPM)"
            unit = "requests" if b.kind == "requests" else "tokens"
            whose = "this API key" if b.scope == "key" else "the model's global limit"
            message = (
                f"Rate limit reached on this {b.scope} in thriftgate for {per}: "
                f"Limit {int(b.capacity)}, Remaining {max(math.floor(level), 0)}, Requested "
                f"{int(b.cost)}. Please try again in {format_duration(wait)}. ({whose} may use "
                f"{int(b.capacity):,} {unit} a minute; they come back gradually, "
                f"{b.rate * 60:,.0f} a minute.)"
            )
            type_ = b.kind
        else:
            message = (
                "The upstream reported its rate limit for this model as nearly exhausted; "
                f"thriftgate is holding requests back. Please try again in {format_duration(wait)}."
            )
            type_ = "requests"
        raise RateLimited(message, kind=type_, headers=dict(headers))

    def _headers(
        self,
        headers: CIMultiDict[str] | Any,
        buckets: list[Bucket],
        levels: tuple[float, ...],
        limits: Limits,
    ) -> None:
        """OpenAI's six x-ratelimit-* headers for the key's own buckets (the first of each kind)."""
        for kind in HEADER_KINDS:
            found = [(b, lv) for b, lv in zip(buckets, levels, strict=True) if b.kind == kind]
            if not found:
                continue
            b, level = found[0]
            headers[f"x-ratelimit-limit-{kind}"] = str(int(b.capacity))
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(level)))
            headers[f"x-ratelimit-reset-{kind}"] = format_duration((b.capacity - level) / b.rate)

    def _settle(self, outcome: Outcome, charge: BucketCharge) -> None:
        """Settle the token buckets to the usage the upstream reported (nothing for a failure)."""
        fields = outcome.spent
        if fields is None:
            return  # no usage known: the estimate stands
        delta = (fields["total_tokens"] or 0) - charge.tokens
        tokens = [b for b in charge.buckets if b.kind == "tokens"]
        if not delta or not tokens:
            return
        self.buckets.settle(
            [Bucket(b.name, b.scope, b.kind, b.capacity, b.rate, delta) for b in tokens]
        )

    def _count(self, outcome: str) -> None:
        counts = self.metrics.rate_limited
        counts[outcome] = counts.get(outcome, 0) + 1

    # -- adaptive --------------------------------------------------------------------------------

    def _scope(self, ctx: RequestContext) -> tuple[str | None, str]:
        assert ctx.model is not None
        return (None if self.shared_upstream_key else ctx.who.limits_scope, ctx.model)

    def _hold_left(self, ctx: RequestContext) -> float:
        if not self.held_until:
            return 0.0
        scope = self._scope(ctx)
        until = self.held_until.get(scope)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            self.held_until.pop(scope, None)
            return 0.0
        return left

    async def _wait_for_upstream(self, ctx: RequestContext, limits: Limits) -> None:
        """Without buckets of its own: only the upstream's hold applies (queue mode: adaptive
        holds exist only there)."""
        hold = self._hold_left(ctx)
        if hold <= 0:
            return
        if hold > self.settings.max_wait_s:
            self._reject([], None, hold, limits)
        self._count("queued")
        started = self.clock()
        while (hold := self._hold_left(ctx)) > 0:
            await self.sleep(min(hold, 1.0))
        ctx.rate_limited_ms = round((self.clock() - started) * 1000, 3)

    def _observe(self, ctx: RequestContext, resp: web.StreamResponse) -> None:
        """Hold this model back when the upstream says its limits are (nearly) spent."""
        h = resp.headers
        hold = 0.0
        if resp.status == 429 and h.get("x-thriftgate-error") is None:
            hold = parse_duration(h.get("retry-after")) or 1.0
        for kind in HEADER_KINDS:
            remaining = _int(h.get(f"x-ratelimit-remaining-{kind}"))
            limit = _int(h.get(f"x-ratelimit-limit-{kind}"))
            if remaining is None or not limit:
                continue
            if remaining <= limit * self.settings.adaptive_min_remaining:
                reset = parse_duration(h.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    hold = max(hold, reset)
        if hold > 0:
            self._count("upstream_hold")
            scope = self._scope(ctx)
            now = self.clock()
            if len(self.held_until) >= MAX_HOLDS and scope not in self.held_until:
                self.held_until = {k: v for k, v in self.held_until.items() if v > now}
                while len(self.held_until) >= MAX_HOLDS:  # the ones ending soonest go first
                    del self.held_until[min(self.held_until, key=self.held_until.__getitem__)]
            self.held_until[scope] = max(self.held_until.get(scope, 0.0), now + hold)
            if self.guard is not None:  # the other replicas hold back too
                self.holds_shared.spawn(self._share_hold(scope, hold))

    # -- adaptive holds shared by the fleet (Redis) ----------------------------------------------

    def _hold_name(self, scope: tuple[str | None, str]) -> str:
        key, model = scope
        return f"{self.settings.redis_prefix}{{hold:{key or '*'}:{model}}}"

    async def _share_hold(self, scope: tuple[str | None, str], hold: float) -> None:
        ms = max(1, math.ceil(hold * 1000))
        name = self._hold_name(scope)
        assert self.guard is not None
        await self.guard.call("ratelimit_hold", lambda c: c.set(name, "1", px=ms), None)

    async def _shared_hold(self, ctx: RequestContext) -> None:
        """A hold another replica learnt from the upstream (its time left in Redis) applies here
        too, so the fleet slows down together."""
        scope = self._scope(ctx)
        name = self._hold_name(scope)
        assert self.guard is not None
        left_ms = await self.guard.call("ratelimit_hold", lambda c: c.pttl(name), -2)
        if isinstance(left_ms, int) and left_ms > 0:
            until = self.clock() + left_ms / 1000
            self.held_until[scope] = max(self.held_until.get(scope, 0.0), until)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None
