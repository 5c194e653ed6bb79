"""How many thriftgate requests one Redis shard can carry, from the cost of each operation a
request makes there, measured with redis-benchmark on a quiet redis-server pinned to one core.

    python bench/redis_capacity.py        # needs redis-server and redis-benchmark

A cache miss with a budget and a rate limit makes five round trips: the cache GET and SET (a
~1 KB answer), the rate-limit script (a key's two buckets; its settlement rides on the next take),
the budget script (two windows) and the budget's settlement. A cache hit makes one GET.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from run import free_port, process  # noqa: E402

from proxy.budget import TAKE_LUA as BUDGET_LUA  # noqa: E402
from proxy.ratelimit import TAKE_LUA as RATELIMIT_LUA  # noqa: E402

N = 200_000


def cli(port: int, *args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def ops_per_second(port: int, *command: str) -> float:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            "0",
            "redis-benchmark",
            "-p",
            str(port),
            "-n",
            str(N),
            "-c",
            "16",
            "-q",
            *command,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.findall(r"([\d.]+) requests per second", out)
    return float(found[-1])


def main() -> int:
    port = free_port()
    server = ["taskset", "-c", "1", "redis-server", "--port", str(port), "--save", ""]
    with process([*server, "--appendonly", "no"], port):
        budget = cli(port, "SCRIPT", "LOAD", BUDGET_LUA)
        ratelimit = cli(port, "SCRIPT", "LOAD", RATELIMIT_LUA)
        value = "x" * 1024
        far = "4102444800000"  # 2100-01-01, ms
        ops = {
            "cache GET": ops_per_second(port, "GET", "thriftgate:cache:abc"),
            "cache SET (1 KB, PX)": ops_per_second(
                port, "SET", "thriftgate:cache:abc", value, "PX", "3600000"
            ),
            "rate-limit script (2 buckets)": ops_per_second(
                port,
                "EVALSHA",
                ratelimit,
                "2",
                "rl:{k}:requests",
                "rl:{k}:tokens",
                "0",
                "60",
                "0.001",
                "1",
                "0",
                "100000",
                "1.6",
                "500",
                "0",
            ),
            "budget script (2 windows)": ops_per_second(
                port,
                "EVALSHA",
                budget,
                "2",
                "b:{k}:tokens:d1",
                "b:{k}:usd:m1",
                "1000000000000",
                "500",
                far,
                "0",
                "1000",
                far,
            ),
            "budget settlement (2 windows)": ops_per_second(
                port,
                "EVALSHA",
                budget,
                "2",
                "b:{k}:tokens:d1",
                "b:{k}:usd:m1",
                "0",
                "-10",
                far,
                "0",
                "-10",
                far,
            ),
        }
    print("\none redis-server on a core of its own, redis-benchmark with 16 connections:")
    for name, rate in ops.items():
        print(f"  {name:32} {rate:>10,.0f} ops/s   {1e6 / rate:6.1f} us each")
    miss_us = sum(1e6 / r for r in ops.values())
    hit_us = 1e6 / ops["cache GET"]
    print(f"a miss with budget and rate limit: {miss_us:.1f} us of Redis; a hit: {hit_us:.1f} us")
    for share in (1.0, 0.8):
        print(
            f"  at {share:.0%} of the shard: {share * 1e6 / miss_us:,.0f} misses/s or "
            f"{share * 1e6 / hit_us:,.0f} hits/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
