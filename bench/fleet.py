"""Three thriftgate replicas on shared state: no Redis, one Redis, a 3-primary Redis Cluster.

    python bench/fleet.py [--duration 5] [--rounds 3]     # needs wrk, nginx-light, redis-server

Each replica (one worker) has a per-key RPM limit, a token budget and the cache on, so every
request reads and writes the shared state (a cache lookup and store, one rate-limit script, one
budget script, their settlements). Three wrk processes load the three replicas at once with
unique bodies, in alternating rounds per setup. Reported: total RPS, p50/p99, Redis commands per
request (INFO commandstats before and after, summed over the nodes), and the p99 the shared state
adds over in-process stores in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from redis_fleet import CLI, Cluster  # noqa: E402
from run import (  # noqa: E402
    cpu_seconds,
    free_port,
    parse_wrk,
    process,
    static_upstream,
    thriftgate,
    wrk_command,
)

ENV = {
    "THRIFTGATE_RPM": "10000000",
    "THRIFTGATE_TOKENS_PER_DAY": "1000000000000",
    "THRIFTGATE_LOG_FORMAT": "json",
}


# what the scripts call inside Redis: counted by INFO commandstats, but not round trips
INSIDE_SCRIPTS = {"hmget", "hset", "pexpire", "incrby", "pexpireat", "time"}


def commands(ports: list[int]) -> tuple[int, int]:
    """(round trips: commands clients sent, every command including those inside scripts)."""
    sent = every = 0
    for port in ports:
        out = subprocess.run(
            [CLI, "-p", str(port), "INFO", "commandstats"], capture_output=True, text=True
        ).stdout
        for name, calls in re.findall(r"cmdstat_(\w+(?:\|\w+)?):calls=(\d+)", out):
            every += int(calls)
            if name.lower() not in INSIDE_SCRIPTS and name.lower() != "info":
                sent += int(calls)
    return sent, every


@contextlib.contextmanager
def replicas(upstream: str, env: dict[str, str]) -> Iterator[list[int]]:
    ports = [free_port() for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for port in ports:
            stack.enter_context(thriftgate(port, upstream, cpu=None, **env))
        yield ports


def load(ports: list[int], duration: int, connections: int) -> dict:
    """Three wrk at once, one per replica; their RPS summed, their latencies' median taken."""
    procs = [
        subprocess.Popen(
            wrk_command(f"http://127.0.0.1:{p}", duration, connections, "unique_chat.lua"),
            stdout=subprocess.PIPE,
            text=True,
        )
        for p in ports
    ]
    outs = [p.communicate()[0] for p in procs]
    runs = [parse_wrk(o) for o in outs]
    return {
        "rps": sum(r["rps"] for r in runs),
        "requests": sum(r["requests"] for r in runs),
        "p50_ms": statistics.median(r["p50_ms"] for r in runs),
        "p99_ms": statistics.median(r["p99_ms"] for r in runs),
        "non_2xx": sum(r["non_2xx"] for r in runs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8, help="per replica")
    args = parser.parse_args()
    up = free_port()
    upstream = f"http://127.0.0.1:{up}/v1"
    single = free_port()
    cluster = Cluster()
    results: dict[str, list[dict]] = {"memory": [], "redis": [], "cluster": []}
    calls: dict[str, list[float]] = {"redis": [], "cluster": []}
    inner: dict[str, list[float]] = {"redis": [], "cluster": []}
    redis_us: dict[str, list[float]] = {"redis": [], "cluster": []}  # Redis CPU per request
    with (
        static_upstream(up),
        process(
            ["redis-server", "--port", str(single), "--save", "", "--appendonly", "no"], single
        ) as single_pid,
    ):
        cluster.start()
        try:
            pids = [n.proc.pid for n in cluster.nodes if n.proc is not None]
            setups = {
                "memory": ({}, [], []),
                "redis": ({"REDIS_URL": f"redis://127.0.0.1:{single}/0"}, [single], [single_pid]),
                "cluster": ({"REDIS_URL": cluster.url}, cluster.ports, pids),
            }
            for _ in range(args.rounds):
                for name, (env, nodes, redis_pids) in setups.items():
                    with replicas(upstream, {**ENV, **env}) as ports:
                        load(ports, 1, args.connections)  # warm-up
                        before = commands(nodes) if nodes else (0, 0)
                        cpu0 = sum(cpu_seconds(p) for p in redis_pids)
                        run = load(ports, args.duration, args.connections)
                        results[name].append(run)
                        if nodes:
                            after = commands(nodes)
                            calls[name].append((after[0] - before[0]) / run["requests"])
                            inner[name].append((after[1] - before[1]) / run["requests"])
                            cpu = sum(cpu_seconds(p) for p in redis_pids) - cpu0
                            redis_us[name].append(cpu / run["requests"] * 1e6)
        finally:
            cluster.stop()
    med = statistics.median
    print(
        f"\nthree replicas, {args.connections} connections each, unique chat bodies, "
        f"{args.rounds} alternating rounds of {args.duration}s (medians)"
    )
    print(
        f"{'':10}{'RPS':>8}{'p50 ms':>8}{'p99 ms':>8}{'Redis calls/req':>17}"
        f"{'(with script inside)':>22}{'non-2xx':>9}"
    )
    base_p99 = med(r["p99_ms"] for r in results["memory"])
    for name, runs in results.items():
        per = f"{med(calls[name]):.2f}" if calls.get(name) else "-"
        every = f"{med(inner[name]):.2f}" if inner.get(name) else "-"
        print(
            f"{name:10}{med(r['rps'] for r in runs):>8.0f}{med(r['p50_ms'] for r in runs):>8.2f}"
            f"{med(r['p99_ms'] for r in runs):>8.2f}{per:>17}{every:>22}"
            f"{sum(r['non_2xx'] for r in runs):>9}"
        )
    for name in ("redis", "cluster"):
        added = med(r["p99_ms"] for r in results[name]) - base_p99
        us = med(redis_us[name])
        print(
            f"{name}: p99 added over in-process stores {added:+.2f} ms; Redis CPU per request "
            f"{us:.1f} us (all nodes), so one fully busy Redis core serves about "
            f"{1e6 / us:,.0f} requests/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
