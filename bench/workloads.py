"""Workloads side by side against one thriftgate: RPS and CPU per request, alternating rounds.

    python bench/workloads.py bench/unique_chat.lua bench/unique_chat_t0.lua [--rounds 6]

One thriftgate (its own core) in front of the static upstream of bench/run.py; per round, each
wrk script in turn (the order reversed every other round), 4 s each; prints the medians of RPS
and of the proxy's CPU time per request (from /proc), and every round's CPU figure.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import LOAD_CPU, cpu_seconds, free_port, parse_wrk, pinned, static_upstream, thriftgate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scripts", nargs="+")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--connections", type=int, default=32)
    args = ap.parse_args()
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in args.scripts}
    up = free_port()
    with static_upstream(up):
        port = free_port()
        with thriftgate(port, f"http://127.0.0.1:{up}/v1") as pid:
            for r in range(args.rounds):
                for script in args.scripts if r % 2 == 0 else args.scripts[::-1]:
                    before = cpu_seconds(pid)
                    wrk = ["wrk", "-t1", f"-c{args.connections}", "-d4s", "--latency", "-s"]
                    out = subprocess.run(
                        pinned(LOAD_CPU, [*wrk, script, f"http://127.0.0.1:{port}"]),
                        capture_output=True,
                        text=True,
                    ).stdout
                    w = parse_wrk(out)
                    cpu_us = (cpu_seconds(pid) - before) / w["requests"] * 1e6
                    results[script].append((w["rps"], cpu_us))
    for script, runs in results.items():
        rps = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(
            f"{script}: {rps:,.0f} RPS, {cpu:,.0f} µs CPU per request {[round(c) for _, c in runs]}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
