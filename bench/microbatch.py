"""Embeddings micro-batching: 1000 single-input embeddings requests at concurrency 64 through
thriftgate, without and with micro-batching, in the same run.

    python bench/microbatch.py [--requests 1000] [--concurrency 64] [--latency-ms 30]

The upstream is an in-process aiohttp server answering OpenAI-shaped embeddings after a fixed
latency per call (a real API's round trip; default 30 ms), counting the calls it gets. Prints
upstream calls and wall time side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port, thriftgate


class Upstream:
    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.calls = 0
        self.inputs = 0

    async def embeddings(self, request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
        self.calls += 1
        self.inputs += len(inputs)
        await asyncio.sleep(self.latency_s)
        rnd = random.Random(0)
        data = [
            {"object": "embedding", "index": i, "embedding": [rnd.random() for _ in range(256)]}
            for i in range(len(inputs))
        ]
        tokens = sum(max(1, len(t) // 4) for t in inputs)
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": req["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
            dumps=lambda v: orjson.dumps(v).decode(),
        )


async def load(url: str, n: int, concurrency: int) -> tuple[float, int]:
    semaphore = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal failures
        async with semaphore:
            body = {"model": "text-embedding-3-small", "input": f"document number {i} to embed"}
            async with session.post(
                url + "/v1/embeddings",
                json=body,
                headers={"Authorization": "Bearer sk-bench", "Cache-Control": "no-store"},
            ) as r:
                await r.read()
                failures += r.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session, i) for i in range(n)))
        return time.perf_counter() - t0, failures


async def main_async(args: argparse.Namespace) -> int:
    upstream = Upstream(args.latency_ms / 1000)
    app = web.Application()
    app.router.add_post("/v1/embeddings", upstream.embeddings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up = free_port()
    await web.TCPSite(runner, "127.0.0.1", up).start()
    base = f"http://127.0.0.1:{up}/v1"
    rows = []
    try:
        for name, env in (
            ("without micro-batching", {}),
            ("with micro-batching (5 ms window)", {"THRIFTGATE_EMBEDDINGS_MICROBATCH": "1"}),
        ):
            port = free_port()
            with thriftgate(port, base, cpu=None, **env):
                await load(f"http://127.0.0.1:{port}", 50, args.concurrency)  # warm-up
                upstream.calls = upstream.inputs = 0
                wall, failures = await load(
                    f"http://127.0.0.1:{port}", args.requests, args.concurrency
                )
                rows.append((name, upstream.calls, upstream.inputs, wall, failures))
    finally:
        await runner.cleanup()
    print(
        f"\n{args.requests} single-input embeddings requests, concurrency {args.concurrency}, "
        f"upstream latency {args.latency_ms:g} ms per call"
    )
    print(f"{'':<36}{'upstream calls':>15}{'inputs':>8}{'wall s':>9}{'req/s':>9}{'failed':>8}")
    for name, calls, inputs, wall, failures in rows:
        print(
            f"{name:<36}{calls:>15}{inputs:>8}{wall:>9.2f}{args.requests / wall:>9.0f}{failures:>8}"
        )
    base_calls, base_wall = rows[0][1], rows[0][3]
    calls, wall = rows[1][1], rows[1][3]
    print(f"\nupstream calls: {calls / base_calls:.3f}x; wall time: {wall / base_wall:.2f}x")
    return 0 if all(r[4] == 0 for r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
