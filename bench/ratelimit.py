"""Rate limiter cost and exactness, in the same run as the chain without it.

    python bench/ratelimit.py [--duration 4] [--rounds 5] [--connections 32] [--quick]

1. Overhead: thriftgate without limits, with per-key RPM/TPM buckets in memory, and with them in
   Redis (limits too high to ever refuse, so every request pays for the check and the
   settlement), loaded with wrk in alternating rounds; prints RPS and CPU per request of each
   side as ratios to the chain without the limiter. The cache is off on all three sides.
2. Exactness: two thriftgate processes sharing one Redis, a global model limit of 120 requests
   per minute (capacity 120, refilling 2 per second), both loaded at once by wrk; prints how many
   requests got through against the most the limit allows in that time.

Needs wrk (and uses nginx as the upstream when installed), like bench/run.py.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from run import (
    LOAD_CPU,
    free_port,
    median_run,
    paired_ratio,
    process,
    static_upstream,
    thriftgate,
    wrk,
)

NO_CACHE = {"THRIFTGATE_CACHE": "0"}
HUGE = {"THRIFTGATE_RPM": str(10**9), "THRIFTGATE_TPM": str(10**12)}


def redis(port: int) -> object:
    return process(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
        port,
        cpu=LOAD_CPU,
    )


def overhead(args: argparse.Namespace, upstream: str) -> dict[str, list[dict]]:
    plain, mem, red, rport = (free_port() for _ in range(4))
    runs: dict[str, list[dict]] = {"no limiter": [], "limiter, memory": [], "limiter, Redis": []}
    url = f"redis://127.0.0.1:{rport}/0"
    with (
        redis(rport),
        thriftgate(plain, upstream, **NO_CACHE) as plain_pid,
        thriftgate(mem, upstream, **NO_CACHE, **HUGE) as mem_pid,
        thriftgate(red, upstream, **NO_CACHE, **HUGE, REDIS_URL=url) as red_pid,
    ):
        sides = [
            ("no limiter", plain, plain_pid),
            ("limiter, memory", mem, mem_pid),
            ("limiter, Redis", red, red_pid),
        ]
        for _, port, _ in sides:
            wrk(f"http://127.0.0.1:{port}", 1, args.connections)
        for _ in range(args.rounds):
            for name, port, pid in sides:
                runs[name].append(
                    wrk(f"http://127.0.0.1:{port}", args.duration, args.connections, pid)
                )
    return runs


def exactness(args: argparse.Namespace, upstream: str) -> tuple[int, int, float]:
    a, b, rport = (free_port() for _ in range(3))
    url = f"redis://127.0.0.1:{rport}/0"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "limits.toml"
        cfg.write_text('[model_limits."gpt-4o-mini"]\nrpm = 120\n')
        env = {**NO_CACHE, "REDIS_URL": url, "THRIFTGATE_CONFIG": str(cfg)}
        with (
            redis(rport),
            thriftgate(a, upstream, cpu=None, **env),
            thriftgate(b, upstream, cpu=None, **env),
        ):
            results: list[dict] = []

            def load(port: int) -> None:
                results.append(wrk(f"http://127.0.0.1:{port}", args.duration, 8))

            threads = [threading.Thread(target=load, args=(p,)) for p in (a, b)]
            t0 = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
    passed = sum(r["requests"] - r["non_2xx"] for r in results)
    return passed, 120 + int(2 * elapsed), elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds = 2, 3
    if shutil.which("wrk") is None or shutil.which("redis-server") is None:
        print("needs wrk and redis-server: apt-get install wrk redis-server", file=sys.stderr)
        return 2
    up = free_port()
    upstream = f"http://127.0.0.1:{up}/v1"
    with static_upstream(up) as kind:
        runs = overhead(args, upstream)
        passed, most, elapsed = exactness(args, upstream)
    base = runs["no limiter"]
    print(
        f"\nlimiter overhead: unique chat bodies, cache off, {args.connections} connections, "
        f"{args.rounds} alternating {args.duration}s rounds per side, upstream: {kind}; medians"
    )
    print(
        f"{'side':<18}{'RPS':>9}{'p50 ms':>9}{'CPU us/req':>12}{'RPS ratio':>11}{'CPU ratio':>11}"
    )
    for name, r in runs.items():
        m = median_run(r)
        rps = paired_ratio(base, r, "rps")
        cpu = paired_ratio(base, r, "cpu_us_per_request")
        print(
            f"{name:<18}{m['rps']:>9.0f}{m['p50_ms']:>9.2f}{m['cpu_us_per_request']:>12.0f}"
            f"{rps:>10.2f}x{cpu:>10.2f}x"
        )
    print(
        f"\nexactness: two processes, one Redis, global limit 120/min (capacity 120, +2/s), "
        f"{elapsed:.1f}s of load from both: {passed} requests passed, the limit allows at most "
        f"{most}"
    )
    return 0 if passed <= most else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)
        raise
