"""Memory a full cache costs: RSS of thriftgate (its default memory cache) before and after wrk
sends it unique chat bodies (every answer a new entry), for one or more checkouts, one at a time.

    git worktree add /tmp/before <commit>
    python bench/cache_rss.py /tmp/before . [--seconds 45]

Prints, per checkout, the RSS after start, the RSS after the load, the answers stored, the RSS
growth per stored answer, and the CPU per request over the load.
"""

from __future__ import annotations

import argparse
import re
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import free_port, static_upstream, thriftgate, wrk  # noqa: E402


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def stores(port: int) -> int:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    found = re.search(r'^thriftgate_cache_events_total\{event="store"\} (\S+)', text, re.M)
    return int(float(found.group(1))) if found else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--seconds", type=int, default=45)
    args = ap.parse_args()
    up = free_port()
    with static_upstream(up):
        for tree in args.trees:
            port = free_port()
            with thriftgate(port, f"http://127.0.0.1:{up}/v1", tree=Path(tree).resolve()) as pid:
                start = rss_mib(pid)
                run = wrk(f"http://127.0.0.1:{port}", args.seconds, 32, pid)
                end, kept = rss_mib(pid), stores(port)
                print(
                    f"{tree}: RSS {start:.1f} -> {end:.1f} MiB after {run['requests']:,} misses, "
                    f"{kept:,} answers stored, {(end - start) * 1024 * 1024 / max(kept, 1):,.0f} "
                    f"bytes of RSS per stored answer, {run['cpu_us_per_request']:.1f} us CPU per "
                    "request"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
