"""What a person at a terminal reads: the start-up summary, one access line per request, and
shutdown progress. On a terminal (``log.format = auto``) or with ``--log-format console`` these
are plain lines on stderr; in JSON mode the same facts go into the ``listening`` event and the
usage log, and no access lines are written.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from proxy import __version__
from proxy.config import Settings, redact_url


def resolve_format(fmt: str, stream: IO[Any] | None = None) -> str:
    """``auto`` → ``console`` when ``stream`` (stderr) is a terminal, else ``json``."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    try:
        return "console" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def _money(value: Any) -> str:
    return "$?" if value is None else f"${value:.6f}".rstrip("0").rstrip(".")


def access_line(record: dict[str, Any]) -> str:
    """One request as uvicorn or nginx would show it: time, status, method, endpoint, model,
    cache, tokens, cost, latency (and the error code of a failure)."""
    parts = [
        time.strftime("%H:%M:%S"),
        str(record.get("status") or "-"),
        str(record.get("method") or "-"),
        str(record.get("endpoint") or "-"),
        str(record.get("model") or "-"),
    ]
    cache = record.get("cache")
    if cache:
        parts.append(cache.upper())
    tokens = record.get("total_tokens")
    if isinstance(tokens, int):
        parts.append(f"{tokens:,} tok" + ("~" if record.get("tokens_source") != "upstream" else ""))
    if record.get("cache") == "hit":
        parts.append(f"saved {_money(record.get('saved_usd'))}")
    elif (record.get("status") or 0) < 400:
        parts.append(_money(record.get("cost_usd")))
    latency = record.get("latency_ms")
    if isinstance(latency, int | float):
        parts.append(f"{latency:,.0f}ms")
    if record.get("error"):
        parts.append(str(record["error"]))
    return " ".join(parts)


def access_writer(stream: IO[str]) -> Callable[[dict[str, Any]], None]:
    def write(record: dict[str, Any]) -> None:
        try:
            stream.write(access_line(record) + "\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr never fails a request
            pass

    return write


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


def _limits(settings: Settings) -> dict[str, Any]:
    """What is in force, as a flat dict (for the banner and the ``listening`` event)."""
    b, r, o = settings.budget, settings.ratelimit, settings.optimize
    budgets = [
        f"{label} {value:,}"
        for label, value in (
            ("tokens/day", b.tokens_per_day),
            ("tokens/month", b.tokens_per_month),
        )
        if value
    ] + [
        f"{label} ${value:,.2f}"
        for label, value in (("usd/day", b.usd_per_day), ("usd/month", b.usd_per_month))
        if value
    ]
    limits = [f"{r.rpm:,} rpm"] if r.rpm else []
    limits += [f"{r.tpm:,} tpm"] if r.tpm else []
    own = len(settings.keys)
    optimise = []
    if o.trim:
        optimise.append(f"trim to the last {o.trim_keep} messages")
    if o.dynamic_max_tokens:
        optimise.append(f"dynamic max_tokens (cap {o.max_tokens_cap:,})")
    return {
        "budgets": ", ".join(budgets) + " per key" if budgets else "none",
        "rate_limits": (", ".join(limits) + f" per key ({r.mode})") if limits else "none",
        "model_limits": len(settings.model_limits),
        "keys_with_own_policy": own,
        "optimisations": ", ".join(optimise) or "off",
    }


def summary(
    settings: Settings, *, url: str, redis: str, cache: str, cache_bytes: int | None
) -> dict[str, Any]:
    """The start-up facts, for the ``listening`` event."""
    usage = settings.usage
    return {
        "version": __version__,
        "listen": url,
        "upstreams": [redact_url(t.url) for t in settings.targets()],
        "cache": cache,
        "cache_max_bytes": cache_bytes,
        "cache_ttl_s": settings.cache.ttl_s if cache != "off" else None,
        "redis": redis,
        "usage_log": (usage.log_path or "stdout") if usage.enabled else "off",
        **_limits(settings),
        "retries": settings.retry.max_attempts if settings.retry.enabled else 0,
        "admin_token": settings.server.admin_token is not None,
        "config_file": settings.config_file,
        "workers": settings.server.workers,
        "pid": os.getpid(),
    }


def banner(facts: dict[str, Any]) -> str:
    """The start-up summary as a person reads it."""
    cache = facts["cache"]
    if cache != "off" and facts["cache_max_bytes"]:
        cache += (
            f", up to {_mib(facts['cache_max_bytes'])}, answers kept {facts['cache_ttl_s']:g} s"
        )
    admin = (
        "set (/metrics and /readyz details need it)"
        if facts["admin_token"]
        else "not set: /metrics and /readyz details are open to whoever reaches this port"
    )
    own = facts["keys_with_own_policy"]
    budgets = facts["budgets"] + (f"; {own} keys with their own" if own else "")
    limits = facts["rate_limits"]
    if facts["model_limits"]:
        limits += f"; {facts['model_limits']} model limits"
    rows = [
        ("upstream", ", ".join(facts["upstreams"])),
        ("cache", cache),
        ("redis", facts["redis"]),
        ("usage log", facts["usage_log"]),
        ("budgets", budgets),
        ("rate limits", limits),
        ("optimise", facts["optimisations"]),
        ("retries", f"up to {facts['retries']} attempts" if facts["retries"] else "off"),
        ("admin token", admin),
        ("config", facts["config_file"] or "defaults and environment (no config file)"),
    ]
    url = facts["listen"]
    lines = [f"thriftgate {facts['version']} listening on {url} (pid {facts['pid']})"]
    lines += [f"  {name:<12} {value}" for name, value in rows]
    for upstream in facts["upstreams"]:
        if not upstream.split("?")[0].rstrip("/").endswith("/v1"):
            lines.append(
                f"  warning: the upstream {upstream} does not end in /v1 (OpenAI's API is at "
                "https://api.openai.com/v1); requests may get 404"
            )
    lines.append(f"  point clients at OPENAI_BASE_URL={url}/v1 · check: curl {url}/readyz")
    return "\n".join(lines)
