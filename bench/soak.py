"""Soak: 200k requests (100k chat requests with a key and model never seen before, 100k GETs of
paths never seen before) against one worker with day and month budgets and RPM and TPM limits on,
the cache off, so every request leaves per-key state behind (two budget counters, two buckets).
Prints the process's RSS and the size of /metrics after every 5 s of load: both should level off
once the bounds are reached (buckets: 100k, local counters: 200k).

    python bench/soak.py [--requests 200000] [--connections 16]
    python bench/soak.py --minutes 10        # a duration instead of a count

With ``--minutes`` it also prints the size of ``/dashboard`` (its rows are capped: every request
here is a new key and model, the worst case for them).

Needs wrk and the static upstream of bench/run.py (nginx when installed).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from run import HERE, LOAD_CPU, free_port, pinned, static_upstream, thriftgate


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--minutes", type=float, help="run this long instead of --requests")
    args = parser.parse_args()
    started = time.monotonic()

    def more() -> bool:
        if args.minutes is not None:
            return time.monotonic() - started < args.minutes * 60
        return done < args.requests

    up, port = free_port(), free_port()
    env = {  # cache off: its answers are bounded by bytes (max_bytes), not what this measures
        "THRIFTGATE_CACHE": "0",
        "THRIFTGATE_TOKENS_PER_DAY": "1000000000",
        "THRIFTGATE_TOKENS_PER_MONTH": "1000000000",
        "THRIFTGATE_RPM": "1000000",
        "THRIFTGATE_TPM": "1000000000",
    }
    with static_upstream(up), thriftgate(port, f"http://127.0.0.1:{up}/v1", **env) as pid:
        print(f"start: RSS {rss_mib(pid):.1f} MiB")
        done = 0
        print("requests   RSS MiB   /metrics KiB   /dashboard KiB   minutes")
        while more():
            out = subprocess.run(
                pinned(
                    LOAD_CPU,
                    [
                        "wrk",
                        "-t1",
                        f"-c{args.connections}",
                        "-d5s",
                        "-s",
                        str(HERE / "distinct_keys.lua"),
                        f"http://127.0.0.1:{port}",
                    ],
                ),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            done += int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                size = len(r.read()) / 1024
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard") as r:
                page = len(r.read()) / 1024
            minutes = (time.monotonic() - started) / 60
            print(
                f"{done:8d}   {rss_mib(pid):7.1f}   {size:12.1f}   {page:14.1f}   {minutes:7.1f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
