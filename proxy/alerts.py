"""Alerts: spend, budgets, upstream errors and cache hit rate, watched from the usage records.

When a rule fires: a structured ``alert`` log event (warning) and, when a webhook is configured, a
POST of ``{"text": ...}`` (Slack-compatible) sent in the background. Each alert (rule and scope)
fires at most once per ``cooldown_s``. A failing webhook is logged and never affects traffic.

With Redis, the fleet acts as one: spend is summed in shared counters (each process adds what it
saw once a second, in one pipeline, and compares the fleet's total with the thresholds), budget
fractions come from the shared budget counters, and every alert is claimed with ``SET NX`` for its
cool-down, so ten replicas send one webhook, not ten. The error-rate and hit-rate windows stay per
process (each replica sees its own upstream path); their alerts are de-duplicated all the same.
While Redis is unavailable each process falls back to its own counters and cool-downs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from proxy.background import Background
from proxy.config import AlertSettings
from proxy.types import Part

log = structlog.get_logger("thriftgate.alerts")

UPSTREAM_ERRORS = frozenset({"upstream_unavailable", "upstream_timeout", "upstream_disconnected"})
SHARE_EVERY_S = 1.0  # with Redis: spend reaches the fleet's counters within this


class Alerts(Part):
    def __init__(
        self,
        settings: AlertSettings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.fired: dict[tuple[str, str], float] = {}  # (rule, scope) -> when it last fired
        self.sent: list[dict[str, Any]] = []  # the alerts fired, newest last (bounded)
        self._spend: dict[str, float] = {}  # "h2026112210" / "d20261122" -> USD
        self._key_spend: dict[tuple[str, str], float] = {}  # (hour or day, key) -> USD
        self._window: collections.deque[tuple[float, bool, bool, bool]] = collections.deque()
        self._errors = self._cacheable = self._hits = 0
        self._session: aiohttp.ClientSession | None = None
        self.tasks = Background()  # webhooks, claims, spend shared with the fleet
        self._spend_rules = bool(
            settings.spend_usd_per_hour
            or settings.spend_usd_per_day
            or settings.key_spend_usd_per_hour
            or settings.key_spend_usd_per_day
        )
        self.shared: Any = None  # the RedisGuard: fleet-wide spend and one alert per fleet
        self.prefix = "thriftgate:alerts:"
        self._unshared: dict[tuple[str, str, str], float] = {}  # spend not yet added in Redis
        self._flush_timer: asyncio.TimerHandle | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """Fleet-wide spend in Redis when one is configured, and the webhook's session; on the
        way out the spend not yet shared is added and the alerts under way are sent."""
        from proxy.store import REDIS

        self.shared = app.get(REDIS)
        if self.settings.webhook_url:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
            )
        yield
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._unshared:
            await self._share()
        await self.tasks.drain()
        if self._session is not None:
            await self._session.close()

    # -- what is watched -------------------------------------------------------------------------

    def observe(self, record: dict[str, Any]) -> None:
        """One usage record: spend, and the error and cache-hit window."""
        s = self.settings
        now = self.clock()
        cost = record.get("cost_usd")
        if self._spend_rules and isinstance(cost, int | float) and cost > 0:
            self._spend_seen(now, record, float(cost))
        if s.error_rate or s.cache_hit_rate_below:
            self._slide(now, record)

    def _spend_seen(self, now: float, record: dict[str, Any], cost: float) -> None:
        t = time.gmtime(now)
        hour = f"h{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}"
        day = f"d{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}"
        if len(self._spend) > 64:
            self._spend = {k: v for k, v in self._spend.items() if k in (hour, day)}
        if len(self._key_spend) > 100_000:
            self._key_spend = {k: v for k, v in self._key_spend.items() if k[0] in (hour, day)}
        key = str(record.get("key_alias") or record.get("key") or "-")
        s = self.settings
        items = []  # (period, label, scope): the counters a rule watches
        for period, label, overall, per_key in (
            ("hour", hour, s.spend_usd_per_hour, s.key_spend_usd_per_hour),
            ("day", day, s.spend_usd_per_day, s.key_spend_usd_per_day),
        ):
            if overall:
                items.append((period, label, "all"))
            if per_key:
                items.append((period, label, key))
        if self.shared is None:
            for period, label, scope in items:
                self._check(period, scope, self._add_local(label, scope, cost))
            return
        for k in items:  # the fleet's totals decide, once a second
            if k[2] == "all" or k in self._unshared or len(self._unshared) < 100_000:
                self._unshared[k] = self._unshared.get(k, 0.0) + cost
        if self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(SHARE_EVERY_S, self._share_soon)

    def _add_local(self, label: str, scope: str, usd: float) -> float:
        """Add to this process's own spend counter; its total."""
        if scope == "all":
            self._spend[label] = spent = self._spend.get(label, 0.0) + usd
        else:
            k = (label, scope)
            self._key_spend[k] = spent = self._key_spend.get(k, 0.0) + usd
        return spent

    def _check(self, period: str, scope: str, spent: float) -> None:
        """Fire the spend rule watching ``scope`` (all, or one key) when ``spent`` is over it."""
        s = self.settings
        if scope == "all":
            rule = f"spend_per_{period}"
            threshold = s.spend_usd_per_hour if period == "hour" else s.spend_usd_per_day
        else:
            rule = f"key_spend_per_{period}"
            threshold = s.key_spend_usd_per_hour if period == "hour" else s.key_spend_usd_per_day
        if threshold and spent > threshold:
            self._spent(rule, scope, period, spent, threshold)

    # -- fleet-wide spend -------------------------------------------------------------------------

    def _share_soon(self) -> None:
        self._flush_timer = None
        self.tasks.spawn(self._share())

    async def _share(self) -> None:
        """Add this process's spend to the fleet's counters (one pipeline) and check the
        thresholds against the totals Redis returns. Redis unavailable: the local totals."""
        items, self._unshared = list(self._unshared.items()), {}
        if not items:
            return

        async def add(client: Any) -> list[float]:
            async with client.pipeline(transaction=False) as pipe:
                for (period, label, scope), usd in items:
                    name = f"{self.prefix}{{spend:{scope}}}:{label}"
                    pipe.incrbyfloat(name, usd)
                    pipe.expire(name, 3 * 86400 if period == "day" else 2 * 3600)
                done = await pipe.execute()
            return [float(v) for v in done[::2]]

        totals = await self.shared.call("alerts", add, None)
        for n, ((period, label, scope), usd) in enumerate(items):
            # Redis unavailable: this process's own counts
            spent = totals[n] if totals is not None else self._add_local(label, scope, usd)
            self._check(period, scope, spent)

    def _spent(self, rule: str, scope: str, period: str, spent: float, threshold: float) -> None:
        who = "" if scope == "all" else f"key {scope} "
        self.fire(
            rule,
            scope,
            f"thriftgate: {who}${spent:,.2f} spent this {period} (UTC), over the alert threshold "
            f"of ${threshold:,.2f}",
            **({} if scope == "all" else {"key": scope}),
            spent_usd=round(spent, 6),
            threshold_usd=threshold,
        )

    def _slide(self, now: float, record: dict[str, Any]) -> None:
        s = self.settings
        status = record.get("status")
        error = record.get("error") in UPSTREAM_ERRORS or (
            isinstance(status, int) and status >= 500
        )
        cache = record.get("cache")
        entry = (now, error, cache in ("hit", "miss"), cache == "hit")
        self._window.append(entry)
        self._count(entry, 1)
        while self._window and self._window[0][0] < now - s.window_s:
            self._count(self._window.popleft(), -1)
        n = len(self._window)
        if s.error_rate and n >= s.min_requests and self._errors / n > s.error_rate:
            self.fire(
                "upstream_error_rate",
                "all",
                f"thriftgate: {self._errors / n:.0%} of the last {n} requests failed upstream "
                f"(window {s.window_s:g}s), over the alert threshold of {s.error_rate:.0%}",
                error_rate=round(self._errors / n, 4),
                requests=n,
            )
        if (
            s.cache_hit_rate_below
            and self._cacheable >= s.min_requests
            and self._hits / self._cacheable < s.cache_hit_rate_below
        ):
            rate = self._hits / self._cacheable
            self.fire(
                "cache_hit_rate",
                "all",
                f"thriftgate: cache hit rate {rate:.0%} over the last {self._cacheable} "
                f"cacheable requests, under the alert threshold of {s.cache_hit_rate_below:.0%}",
                hit_rate=round(rate, 4),
                requests=self._cacheable,
            )

    def _count(self, entry: tuple[float, bool, bool, bool], sign: int) -> None:
        self._errors += sign * entry[1]
        self._cacheable += sign * entry[2]
        self._hits += sign * entry[3]

    def budget(
        self,
        key: str | None,
        alias: str | None,
        unit: str,
        period: str,
        fraction: float,
        *,
        refused: bool = False,
    ) -> None:
        """A key's budget is at ``fraction`` of its limit: ``budget_warning`` past the warning
        fraction, ``budget_spent`` at 1.0, ``budget_refused`` when a request was refused before
        it was all spent (what was left could not cover the request's estimate)."""
        warn = self.settings.budget_warn_fraction
        if fraction < warn and fraction < 1.0 and not refused:
            return
        who = alias or key or "-"
        if fraction >= 1.0:
            rule, what = "budget_spent", "is spent"
        elif refused:
            rule = "budget_refused"
            what = f"is {fraction:.0%} used and refused a request it could not cover"
        else:
            rule, what = "budget_warning", f"is {fraction:.0%} used"
        self.fire(
            rule,
            f"{who}:{unit}:{period}",
            f"thriftgate: the {unit} budget per {period} of key {who} {what}",
            key=who,
            unit=unit,
            period=period,
            fraction=round(fraction, 4),
        )

    # -- firing ----------------------------------------------------------------------------------

    def fire(self, rule: str, scope: str, text: str, **values: Any) -> bool:
        """Log and send the alert unless it fired within the cool-down. True if it fired."""
        now = self.clock()
        last = self.fired.get((rule, scope))
        if last is not None and now - last < self.settings.cooldown_s:
            return False
        self.fired[(rule, scope)] = now
        if self.shared is not None:  # one replica of the fleet claims it, the others stay quiet
            self.tasks.spawn(self._claim(rule, scope, text, values))
            return True
        self._send(rule, scope, text, values)
        return True

    async def _claim(self, rule: str, scope: str, text: str, values: dict[str, Any]) -> None:
        """``SET NX`` for the cool-down: the replica that sets it sends the alert. Redis
        unavailable: this replica sends it (one per replica, as without Redis)."""
        name = f"{self.prefix}{{fired}}:{rule}:{scope}"
        cooldown_ms = max(1, int(self.settings.cooldown_s * 1000))
        claimed = await self.shared.call(
            "alerts", lambda c: c.set(name, "1", nx=True, px=cooldown_ms), "unavailable"
        )
        if claimed:  # True, or "unavailable"
            self._send(rule, scope, text, values)

    def _send(self, rule: str, scope: str, text: str, values: dict[str, Any]) -> None:
        log.warning("alert", alert=rule, scope=scope, text=text, **values)
        self.sent.append({"alert": rule, "scope": scope, "text": text, **values})
        del self.sent[:-100]
        if self._session is not None and self.settings.webhook_url:
            self.tasks.spawn(self._post(rule, text))

    async def _post(self, rule: str, text: str) -> None:
        assert self._session is not None and self.settings.webhook_url is not None
        try:
            async with self._session.post(self.settings.webhook_url, json={"text": text}) as r:
                if r.status >= 300:
                    log.warning("alert_webhook_failed", alert=rule, status=r.status)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("alert_webhook_failed", alert=rule, error=repr(exc)[:200])
