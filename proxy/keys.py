"""Who a key is and what it may spend: the defaults with each ``[keys."alias"]`` table on top.

Keys are known only by their fingerprint (``context.fingerprint``); a request without a key counts
as the key ``-``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from proxy.config import KeyPolicy, Settings

ANONYMOUS = "-"


@dataclass(frozen=True, slots=True)
class Limits:
    """One key's limits, resolved (0: unlimited)."""

    alias: str | None
    tokens_per_day: int
    tokens_per_month: int
    usd_per_day: float
    usd_per_month: float
    rpm: int
    rpm_burst: int
    tpm: int
    tpm_burst: int

    @property
    def rate_limited(self) -> bool:
        return bool(self.rpm or self.tpm)

    @property
    def budgeted(self) -> bool:
        return bool(
            self.tokens_per_day or self.tokens_per_month or self.usd_per_day or self.usd_per_month
        )


class Keys:
    def __init__(self, settings: Settings) -> None:
        b, r = settings.budget, settings.ratelimit
        self.default = Limits(
            None,
            b.tokens_per_day,
            b.tokens_per_month,
            b.usd_per_day,
            b.usd_per_month,
            r.rpm,
            r.rpm_burst,
            r.tpm,
            r.tpm_burst,
        )
        self._by_fingerprint = {k.fingerprint: self._resolve(k) for k in settings.keys}

    def _resolve(self, policy: KeyPolicy) -> Limits:
        overrides = {
            f.name: getattr(policy, f.name)
            for f in dataclasses.fields(Limits)
            if f.name != "alias" and getattr(policy, f.name) is not None
        }
        return dataclasses.replace(self.default, alias=policy.alias, **overrides)

    def limits(self, fingerprint: str | None) -> Limits:
        if fingerprint is None:
            return self.default
        return self._by_fingerprint.get(fingerprint, self.default)

    def alias(self, fingerprint: str | None) -> str | None:
        return self.limits(fingerprint).alias

    @property
    def any_budget(self) -> bool:
        return any(v.budgeted for v in (self.default, *self._by_fingerprint.values()))

    @property
    def any_rate_limit(self) -> bool:
        return any(v.rate_limited for v in (self.default, *self._by_fingerprint.values()))
