"""Who a key is and what it may spend: the defaults with each ``[keys."alias"]`` table on top.

A key is never kept. It is known by three hashes, made once per request (``identify``):

- its **fingerprint**, the first 12 hex digits of its SHA-256: for display only (usage lines,
  ``[keys]`` tables, alerts); 48 bits, so two keys can share one;
- its **digest**, the whole SHA-256, which a ``[keys]`` table may name instead of the fingerprint;
- its **scope**, HMAC-SHA256 keyed with ``server.scope_secret``: what cache entries, budget
  counters and rate-limit buckets are filed under. 256 bits: a collision is not a practical attack.

A request without a key, or with one that does not look like an API key (``looks_like_key``),
counts as the key ``-`` for budgets and rate limits, so random strings create no lasting state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from dataclasses import dataclass

from proxy.config import KeyPolicy, Settings

ANONYMOUS = "-"
FINGERPRINT_HEX = 12  # the display fingerprint's length
_KEY_SHAPE = re.compile(rb"^[A-Za-z0-9_\-.:+/=~]{8,512}$")


def key_digest(secret: str) -> str:
    """An API key's whole SHA-256, in hex (what a ``[keys]`` table may name)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible name for an API key: 12 hex digits of its SHA-256."""
    return key_digest(secret)[:FINGERPRINT_HEX]


def bearer_token(authorization: str | None) -> bytes | None:
    """The key in an Authorization header (``Bearer <key>``, or the bare key), as sent."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else authorization.strip()
    return token.encode("utf-8", "surrogateescape") if token else None


def looks_like_key(token: bytes) -> bool:
    """8 to 512 characters of the kinds API keys are made of (OpenAI's, Azure's, most others')."""
    return _KEY_SHAPE.match(token) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    fingerprint: str | None  # display
    digest: str | None  # the whole SHA-256, for [keys] tables that name it
    scope: str  # HMAC-SHA256: cache, budgets, limits (ANONYMOUS without a key)
    limits_scope: str  # scope, or ANONYMOUS for a key that does not look like one


NOBODY = Identity(None, None, ANONYMOUS, ANONYMOUS)


def identify(token: bytes, digest: bytes, secret: bytes) -> Identity:
    """The identity of ``token`` (a key, as sent), whose SHA-256 is ``digest``."""
    hexed = digest.hex()
    scope = hmac.digest(secret, token, "sha256").hex()
    shown = hexed[:FINGERPRINT_HEX]
    return Identity(shown, hexed, scope, scope if looks_like_key(token) else ANONYMOUS)


IDENTITIES_KEPT = 4096  # identities remembered per process, by the key's SHA-256 (never the key)


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
        self.scope_secret = settings.server.scope_secret.encode()
        self._seen: dict[bytes, Identity] = {}

    def _resolve(self, policy: KeyPolicy) -> Limits:
        overrides = {
            f.name: getattr(policy, f.name)
            for f in dataclasses.fields(Limits)
            if f.name != "alias" and getattr(policy, f.name) is not None
        }
        return dataclasses.replace(self.default, alias=policy.alias, **overrides)

    def identify(self, authorization: str | None) -> Identity:
        """The request's identity. A client sends the same key again and again: the HMAC is made
        once per key, remembered by the key's SHA-256 (a bounded map; the key is not kept)."""
        token = bearer_token(authorization)
        if token is None:
            return NOBODY
        digest = hashlib.sha256(token).digest()
        found = self._seen.get(digest)
        if found is None:
            if len(self._seen) >= IDENTITIES_KEPT:
                self._seen.clear()
            found = self._seen[digest] = identify(token, digest, self.scope_secret)
        return found

    def limits(self, who: Identity | None) -> Limits:
        """A key's limits: its ``[keys]`` table (named by the whole digest, or by the
        fingerprint), else the defaults."""
        if who is None or who.digest is None or not self._by_fingerprint:
            return self.default
        found = self._by_fingerprint.get(who.digest)
        if found is None:
            found = self._by_fingerprint.get(who.digest[:12], self.default)
        return found

    def alias(self, who: Identity | None) -> str | None:
        return self.limits(who).alias

    @property
    def any_budget(self) -> bool:
        return any(v.budgeted for v in (self.default, *self._by_fingerprint.values()))

    @property
    def any_rate_limit(self) -> bool:
        return any(v.rate_limited for v in (self.default, *self._by_fingerprint.values()))
