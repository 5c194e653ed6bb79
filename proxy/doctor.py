"""``thriftgate doctor``: check a configuration end to end before serving it.

Takes the config file and environment as ``serve`` does, then: validates the configuration, loads
the shipped encodings, resolves and connects to each upstream and calls ``GET /models`` with the
configured (or given) key, pings Redis and loads the Lua scripts, checks the usage log can be
written and the port is free. Prints a table; the exit status is 1 when a check failed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from proxy import __version__
from proxy.config import ConfigError, Settings, UpstreamTarget, load_settings, redact_url
from proxy.upstream import unreachable, where

OK, WARN, FAIL, OFF = "ok", "warn", "FAIL", "off"


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str  # ok | warn | FAIL | off
    detail: str


def check_config(
    flags: dict[str, object], config_file: str | None, env: Mapping[str, str] | None = None
) -> tuple[Settings | None, Check]:
    try:
        settings = load_settings(flags, env=env, config_file=config_file)
    except ConfigError as exc:
        return None, Check("config", FAIL, str(exc))
    shown = settings.config_file or "defaults and environment (no config file)"
    return settings, Check("config", OK, shown)


def check_encodings() -> Check:
    from proxy.tokens import _ENCODINGS, EncodingDataError, encoding

    try:
        for name in _ENCODINGS:
            encoding(name)
    except (EncodingDataError, OSError) as exc:
        return Check("encodings", FAIL, str(exc))
    return Check("encodings", OK, f"{', '.join(_ENCODINGS)} (checksums verified)")


def _status_meaning(status: int, keyed: bool, base: str) -> tuple[str, str]:
    if status == 200:
        return OK, "the key works" if keyed else "answers without a key"
    if status == 401:
        if keyed:
            return FAIL, "the key is refused (401): check THRIFTGATE_UPSTREAM_API_KEY or --key"
        return WARN, (
            "reachable; it wants a key (401) and none is configured: clients must send their "
            "own (or give one with --key to test it)"
        )
    if status == 403:
        return FAIL, "the key is not allowed to list models (403): check its permissions"
    if status == 404:
        hint = "" if URL(base).path.rstrip("/").endswith("/v1") else " (it does not end in /v1)"
        return FAIL, f"not found (404): is the upstream URL missing /v1?{hint}"
    if status == 429:
        return WARN, "reachable, but rate limited or out of quota right now (429)"
    return FAIL, f"answered {status}"


async def check_upstream(target: UpstreamTarget, key: str | None, settings: Settings) -> Check:
    base = target.url.rstrip("/")
    url = URL(base + "/models")
    name = f"upstream {target.name}"
    host = url.host or "?"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), 10)
    except (OSError, TimeoutError):
        return Check(name, FAIL, f"{host} does not resolve (DNS): check the upstream URL")
    key = key or target.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=settings.upstream.connect_timeout_s + 10)
    started = time.monotonic()
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=True) as session,
            session.get(url, headers=headers, allow_redirects=False) as resp,
        ):
            await resp.read()
            status = resp.status
    except aiohttp.ConnectionTimeoutError as exc:
        why = unreachable(exc, settings.upstream)
        return Check(name, FAIL, f"{where(url)} cannot be reached: {why}")
    except TimeoutError:
        return Check(name, FAIL, f"{where(url)} did not answer within {timeout.total:g} s")
    except aiohttp.ClientError as exc:
        return Check(
            name, FAIL, f"{where(url)} cannot be reached: {unreachable(exc, settings.upstream)}"
        )
    ms = (time.monotonic() - started) * 1000
    result, meaning = _status_meaning(status, bool(key), base)
    return Check(
        name, result, f"{redact_url(base)}: GET /models {status} in {ms:.0f} ms: {meaning}"
    )


async def check_redis(settings: Settings) -> Check:
    if settings.redis.url is None:
        return Check("redis", OFF, "not configured: cache, budgets and limits are in-process")
    import dataclasses

    from redis.exceptions import RedisError

    from proxy.budget import TAKE_LUA as BUDGET_LUA
    from proxy.ratelimit import TAKE_LUA as RATELIMIT_LUA
    from proxy.store import close_client, connect, is_cluster

    shown = redact_url(settings.redis.url)
    patient = dataclasses.replace(settings.redis, timeout_s=5.0)  # a check, not a request
    client = await connect(patient)
    try:
        await client.ping()
        info = await client.info("server")
        for script in (BUDGET_LUA, RATELIMIT_LUA):
            await client.script_load(script)
    except (RedisError, OSError) as exc:
        why = str(exc).replace(settings.redis.url, shown)
        return Check("redis", FAIL, f"{shown}: {type(exc).__name__}: {why}")
    finally:
        await close_client(client)
    if is_cluster(client):
        kind = f"a cluster of {len(client.get_primaries())} primaries"
    else:
        kind = f"redis {info.get('redis_version', '?')}"
    return Check("redis", OK, f"{shown}: {kind}, ping and scripts loaded")


def check_usage_log(settings: Settings) -> Check:
    usage = settings.usage
    if not usage.enabled:
        return Check("usage log", OFF, "disabled (usage.enabled = false)")
    if usage.log_path is None:
        return Check("usage log", OK, "stdout (one JSON line per request)")
    path = usage.log_path
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        if os.path.isdir(path):
            return Check("usage log", FAIL, f"{path} is a directory; give a file path")
        if not os.access(path, os.W_OK):
            return Check("usage log", FAIL, f"{path} exists but this user cannot write it")
        return Check("usage log", OK, f"{path} (appending)")
    if not os.path.isdir(folder):
        return Check("usage log", FAIL, f"the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        return Check("usage log", FAIL, f"this user (uid {os.getuid()}) cannot write in {folder}")
    return Check("usage log", OK, f"{path} (will be created)")


def check_listen(settings: Settings) -> Check:
    host, port = settings.server.host, settings.server.port
    if port == 0:
        return Check("listen", OK, f"{host}: a free port is chosen at start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            why = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            return Check(
                "listen", WARN, f"{host}:{port}: {why} (is thriftgate already running there?)"
            )
    return Check("listen", OK, f"{host}:{port} is free")


async def run_checks(
    flags: dict[str, object],
    config_file: str | None,
    key: str | None,
    env: Mapping[str, str] | None = None,
) -> list[Check]:
    """Every check; ``env`` replaces the process environment (tests)."""
    settings, config = check_config(flags, config_file, env)
    checks = [config]
    if settings is None:
        return checks
    checks.append(check_encodings())
    checks += await asyncio.gather(*(check_upstream(t, key, settings) for t in settings.targets()))
    checks.append(await check_redis(settings))
    checks.append(check_usage_log(settings))
    checks.append(check_listen(settings))
    return checks


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"thriftgate doctor {__version__}"]
    lines += [f"  {c.name:<{width}}  {c.result:<4}  {c.detail}" for c in checks]
    failed = [c for c in checks if c.result == FAIL]
    if failed:
        lines.append(f"{len(failed)} check{'s' if len(failed) > 1 else ''} failed")
    else:
        warned = sum(c.result == WARN for c in checks)
        lines.append(
            "all checks passed" + (f" ({warned} warning{'s' * (warned > 1)})" if warned else "")
        )
    return "\n".join(lines)
