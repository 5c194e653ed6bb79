"""The first seconds after start: latency of the first requests a fresh thriftgate serves.

    python bench/coldstart.py [--rounds 5] [--seconds 3] [--connections 32] [--tree DIR ...]

Starts the static upstream of bench/run.py, then, per round and per tree (this checkout unless
``--tree`` names others, e.g. a ``git worktree`` of an older commit: an A/B in the same run, in
alternating order), a fresh ``thriftgate serve`` from that tree; the moment its port answers, C
clients (a connection each, unique chat bodies) send requests for S seconds. Prints, per tree,
p50 / p90 / max latency of the requests that started in each window after the port opened
(0-0.5 s, 0.5-1 s, 1-2 s, 2 s-end), the medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import free_port, static_upstream, thriftgate  # noqa: E402

WINDOWS = ((0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, float("inf")))
TEMPLATE = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"cold {id}: what is the capital of France?"}]}'
)
HEADERS = {"Authorization": "Bearer sk-bench-key", "Content-Type": "application/json"}


async def load(url: str, seconds: float, connections: int) -> list[tuple[float, float]]:
    """(started after t0, latency) of every request, in seconds."""
    t0 = time.monotonic()
    out: list[tuple[float, float]] = []

    async def client(i: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as s:
            n = 0
            while time.monotonic() - t0 < seconds:
                n += 1
                body = TEMPLATE.replace(b"{id}", f"{i}-{n}".encode())
                start = time.monotonic()
                async with s.post(
                    url,
                    data=body,
                    headers={
                        "Authorization": "Bearer sk-bench-key",
                        "Content-Type": "application/json",
                    },
                ) as r:
                    await r.read()
                    assert r.status == 200, r.status
                out.append((start - t0, time.monotonic() - start))

    await asyncio.gather(*(client(i) for i in range(connections)))
    return out


def windows(samples: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    rows = []
    for lo, hi in WINDOWS:
        lat = sorted(ms for at, ms in samples if lo <= at < hi)
        if not lat:
            rows.append((float("nan"),) * 3)
            continue
        rows.append((lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.9)] * 1e3, lat[-1] * 1e3))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--tree", action="append", help="a checkout to run thriftgate from")
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.tree] if args.tree else [HERE.parent]
    results: dict[Path, list[list[tuple[float, float, float]]]] = {t: [] for t in trees}
    up = free_port()
    with static_upstream(up) as kind:
        print(f"upstream: {kind}")
        for r in range(args.rounds):
            for tree in trees if r % 2 == 0 else list(reversed(trees)):
                port = free_port()
                with thriftgate(port, f"http://127.0.0.1:{up}/v1", tree=tree):
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    samples = asyncio.run(load(url, args.seconds, args.connections))
                results[tree].append(windows(samples))
    for tree, runs in results.items():
        print(f"\n{tree}  (median of {len(runs)} rounds; ms: p50 / p90 / max)")
        for i, (lo, hi) in enumerate(WINDOWS):
            cells = [statistics.median(run[i][k] for run in runs) for k in range(3)]
            span = f"{lo:g}-{hi:g} s" if hi != float("inf") else f"{lo:g} s-end"
            print(f"  {span:>10}: {cells[0]:7.1f} / {cells[1]:7.1f} / {cells[2]:7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
