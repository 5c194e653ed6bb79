"""The proxy's own endpoints: ``/healthz`` (the process answers), ``/readyz`` (ready for traffic,
503 once shutting down; details with the admin token) and ``/metrics`` (Prometheus, summed over
``--workers``: each worker writes its counters to a file every second, ``MetricsShare``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog
from aiohttp import web

from proxy import __version__
from proxy.cache import CACHE
from proxy.errors import error_response
from proxy.forward import POOL
from proxy.inbound import secret_bytes
from proxy.metrics import Metrics
from proxy.store import REDIS
from proxy.summary import Summary
from proxy.types import METRICS, SETTINGS, Part


@dataclass(slots=True)
class AppState:
    started: float
    shutting_down: bool = False


STATE: web.AppKey[AppState] = web.AppKey("state", AppState)

SHARE_EVERY_S = 1.0  # workers: how often each one writes its counters for the others


def is_admin(request: web.Request) -> bool:
    """No admin token configured, or the request carries it (compared in constant time)."""
    token = request.app[SETTINGS].server.admin_token
    if token is None:
        return True
    given = secret_bytes(request.headers.get("Authorization", ""))
    return hmac.compare_digest(given, f"Bearer {token}".encode())


async def metrics_endpoint(request: web.Request) -> web.Response:
    if not is_admin(request):
        return error_response(
            401,
            "/metrics needs Authorization: Bearer <THRIFTGATE_ADMIN_TOKEN>",
            "invalid_request_error",
            "invalid_admin_token",
        )
    metrics = request.app[METRICS]
    others = other_workers(request.app[SETTINGS].server.metrics_dir, ".json")
    return web.Response(body=metrics.render(others), headers={"Content-Type": metrics.content_type})


def other_workers(metrics_dir: str | None, suffix: str) -> list[dict[str, Any]]:
    """The other workers' latest snapshots (each rewrites its own file every second): their
    metrics (``.json``) or their dashboard summaries (``.summary``)."""
    if metrics_dir is None:
        return []
    own = f"{os.getpid()}{suffix}"
    out = []
    for path in Path(metrics_dir).glob(f"*{suffix}"):
        if path.name == own:
            continue
        try:
            out.append(orjson.loads(path.read_bytes()))
        except (OSError, orjson.JSONDecodeError):
            continue  # a worker that is gone, or a file being replaced
    return out


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``status`` for anyone; the details (upstreams, Redis, cache) only with the admin token
    when one is set. URLs are shown redacted."""
    state = request.app[STATE]
    status = "shutting_down" if state.shutting_down else "ready"
    code = 503 if state.shutting_down else 200
    if not is_admin(request):
        return web.json_response({"status": status}, status=code)
    settings = request.app[SETTINGS]
    guard = request.app[REDIS]
    backend = request.app[CACHE].backend
    report = {
        "status": status,
        "version": __version__,
        "config_file": settings.config_file,
        "upstreams": request.app[POOL].status(),
        "redis": guard.status() if guard is not None else {"configured": False, "status": "off"},
        "cache": backend.name if backend is not None else "off",
        "uptime_s": round(time.monotonic() - state.started, 3),
        "pid": os.getpid(),
    }
    return web.json_response(report, status=code)


class MetricsShare(Part):
    """With workers (``metrics_dir``): this worker's counters (and its dashboard summary) written
    to files of its own every second, for the others' ``/metrics`` and ``/dashboard``."""

    def __init__(
        self, metrics: Metrics, metrics_dir: str | None, summary: Summary | None = None
    ) -> None:
        self.metrics = metrics
        self.metrics_dir = metrics_dir
        self.summary = summary

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        if self.metrics_dir is None:
            yield
            return
        base = Path(self.metrics_dir) / str(os.getpid())
        metrics, summary = self.metrics, self.summary

        def write() -> None:
            shares: list[tuple[str, Any]] = [(".json", metrics.snapshot)]
            if summary is not None:
                shares.append((".summary", summary.dump))
            for suffix, snapshot in shares:
                tmp = base.with_suffix(".tmp")
                tmp.write_bytes(orjson.dumps(snapshot()))
                # readers see the old file or the new one, never half of one
                os.replace(tmp, base.with_suffix(suffix))

        async def loop() -> None:
            while True:
                try:
                    write()
                except OSError as exc:
                    structlog.get_logger("thriftgate").warning(
                        "metrics_share_failed", error=repr(exc)
                    )
                await asyncio.sleep(SHARE_EVERY_S)

        task = asyncio.get_running_loop().create_task(loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(OSError):
            write()


def routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
