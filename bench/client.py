"""The upstream client alone: CPU per request of aiohttp's ClientSession vs proxy.client.

    python bench/client.py [--requests 20000] [--concurrency 32] [--rounds 3]

Starts the static upstream of bench/run.py (nginx when installed, on the load core) and, in this
process (pinned to the proxy core), sends the same chat body with the headers a proxied call has,
``--concurrency`` at a time: through ``aiohttp.ClientSession.request`` configured as thriftgate
configured it before (no decompression, no cookies, no automatic headers), and through
``proxy.client.Connections`` (the lean client thriftgate now uses when the body is in hand). Prints
the process CPU time per request and the requests per second of each, in alternating rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
import uvloop  # noqa: E402
from multidict import CIMultiDict  # noqa: E402
from run import PROXY_CPU, free_port, static_upstream  # noqa: E402
from yarl import URL  # noqa: E402

from proxy.client import Connections  # noqa: E402
from proxy.upstream import SKIP_AUTO_HEADERS  # noqa: E402

BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"what is the capital of France?"}]}'
)
HEADERS = CIMultiDict(
    [("Authorization", "Bearer sk-bench-key"), ("Content-Type", "application/json")]
)


async def measure(one: Callable[[], Awaitable[bytes]], n: int, c: int) -> tuple[float, float]:
    """(µs of CPU per request, requests per second) for n requests, c at a time."""
    for _ in range(200):  # warm-up: connections open, code paths hot
        await one()
    left = iter(range(n))

    async def worker() -> None:
        for _ in left:
            await one()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(c)))
    return (time.process_time() - cpu) / n * 1e6, n / (time.perf_counter() - wall)


async def session_side(url: URL, n: int, c: int) -> tuple[float, float]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=SKIP_AUTO_HEADERS,
    )

    async def one() -> bytes:
        resp = await session.request("POST", url, headers=HEADERS, data=BODY)
        body = await resp.read()
        resp.release()
        return body

    try:
        return await measure(one, n, c)
    finally:
        await session.close()


async def lean_side(url: URL, n: int, c: int) -> tuple[float, float]:
    pool = Connections(0, connect_timeout_s=5, total_timeout_s=60)

    async def one() -> bytes:
        answer = await pool.send("POST", url, HEADERS, BODY)
        return await answer.read()

    try:
        return await measure(one, n, c)
    finally:
        await pool.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {PROXY_CPU})
    sides = {"aiohttp ClientSession": session_side, "proxy.client": lean_side}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    port = free_port()
    with static_upstream(port):
        url = URL(f"http://127.0.0.1:{port}/v1/chat/completions")
        for r in range(args.rounds):
            for name in sides if r % 2 == 0 else list(sides)[::-1]:
                run = sides[name](url, args.requests, args.concurrency)
                results[name].append(uvloop.run(run))
    print(f"{args.requests} requests, {args.concurrency} at a time, {args.rounds} rounds; medians")
    for name, runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        rps = statistics.median(r[1] for r in runs)
        print(f"  {name:24}{cpu:8.1f} µs CPU per request {rps:10,.0f} requests/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
