"""Before/after in one run: thriftgate from two (or more) checkouts and the bare forwarder.

    git worktree add /tmp/before <commit>
    python bench/ab.py /tmp/before . [--script unique_chat.lua] [--rounds 6] [--redis]
    python bench/ab.py . .,THRIFTGATE_CACHE_ENABLED=false     # one build, two configurations

Each tree's thriftgate and the bare forwarder (each on the proxy core in turn, one at a time, so
no side shares it) are loaded by wrk with the same script in alternating rounds (the order
reversed every other round); prints the medians of RPS and of CPU time per request, and each
side's ratios to the bare forwarder — the figures of bench/run.py, for several builds at once.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402
    LOAD_CPU,
    bare_forwarder,
    free_port,
    paired_ratio,
    process,
    static_upstream,
    thriftgate,
    wrk,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "sides", nargs="+", help="a checkout to run thriftgate from, then any ,NAME=VALUE settings"
    )
    ap.add_argument("--script", default="unique_chat.lua")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--redis", action="store_true", help="thriftgate with a Redis (cache hits)")
    args = ap.parse_args()
    trees = [Path(side.split(",")[0]).resolve() for side in args.sides]
    settings = [dict(kv.split("=", 1) for kv in side.split(",")[1:]) for side in args.sides]
    names = ["bare"]
    for tree, extra in zip(trees, settings, strict=True):
        name = tree.name if tree != HERE.parent else "this"
        names.append(" ".join([name, *(f"{k}={v}" for k, v in extra.items())]))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    up, d, c = free_port(), args.duration, args.connections
    with ExitStack() as stack:
        stack.enter_context(static_upstream(up))
        upstream = f"http://127.0.0.1:{up}/v1"
        env: dict[str, str] = {}
        if args.redis:
            rport = free_port()
            stack.enter_context(
                process(
                    ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                    rport,
                    cpu=LOAD_CPU,
                )
            )
            env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        sides = {"bare": lambda p: bare_forwarder(p, upstream)}
        for name, tree, extra in zip(names[1:], trees, settings, strict=True):
            sides[name] = lambda p, tree=tree, extra=extra: thriftgate(
                p, upstream, tree=tree, **env, **extra
            )
        ports = {n: free_port() for n in names}
        pids = {n: stack.enter_context(sides[n](ports[n])) for n in names}
        for n in names:  # warm-up
            wrk(f"http://127.0.0.1:{ports[n]}", 1, c, script=args.script)
        for r in range(args.rounds):
            for n in names if r % 2 == 0 else names[::-1]:
                runs[n].append(wrk(f"http://127.0.0.1:{ports[n]}", d, c, pids[n], args.script))
    print(
        f"\n{args.script}, {c} connections, {args.rounds} alternating {d}s rounds, "
        f"Python {platform.python_version()}; medians"
    )
    width = max(len(n) for n in names) + 2
    print(f"{'':{width}}{'RPS':>8}{'CPU us/req':>12}{'RPS vs bare':>13}{'req/CPU-s vs bare':>19}")
    for n in names:
        rps = statistics.median(r["rps"] for r in runs[n])
        cpu = statistics.median(r["cpu_us_per_request"] for r in runs[n])
        by_rps = paired_ratio(runs["bare"], runs[n], "rps")
        by_cpu = 1 / paired_ratio(runs["bare"], runs[n], "cpu_us_per_request")
        print(f"{n:{width}}{rps:>8.0f}{cpu:>12.1f}{by_rps:>12.2f}x{by_cpu:>18.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
