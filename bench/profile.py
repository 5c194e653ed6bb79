"""Where a request's CPU goes: py-spy samples of thriftgate under wrk, summed by layer.

    python bench/profile.py [--seconds 8] [--connections 32] [--script unique_chat.lua ...]

Starts the static upstream of bench/run.py and one thriftgate (its own core), warms it up, then
samples it with ``py-spy record`` (package ``py-spy``; raw collapsed stacks, 200 Hz) while wrk
sends the script's requests. Prints, per script, the share of samples whose innermost frame is in
each layer (the aiohttp server, the aiohttp client, each thriftgate module, the event loop's
native code) and the thriftgate functions with the most samples, inner and inclusive. The raw
stacks go to bench/results/<script>.stacks (for a flame graph: flamegraph.pl or speedscope).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import LOAD_CPU, PROXY_CPU, free_port, pinned, static_upstream, thriftgate  # noqa: E402

CLIENT = ("client.py", "client_reqrep.py", "client_proto.py", "connector.py", "client_ws.py")
FRAME = re.compile(r"^(?P<fn>.*) \((?P<path>[^:]*):(?P<line>\d+)\)$")


def layer(frame: str) -> str:
    m = FRAME.match(frame)
    path = m.group("path") if m else frame
    if path.startswith("proxy/"):
        return "thriftgate " + path.removeprefix("proxy/")
    if "aiohttp/" in path:
        name = path.rsplit("/", 1)[-1]
        return "aiohttp client" if name in CLIENT else "aiohttp server and shared"
    if "multidict" in path or "yarl" in path:
        return "multidict, yarl"
    return "other: " + path.rsplit("/", 1)[-1]


def summarise(stacks: Path, top: int = 12) -> str:
    total = 0
    inner: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in stacks.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        frames = stack.split(";")
        leaf = frames[-1]
        where = layer(leaf)
        if where == "thriftgate cli.py":  # run_until_complete: the event loop's own (native) work
            where = "event loop (uvloop, native)"
        inner[where] += count
        if where.startswith("thriftgate"):
            functions[leaf] += count
        seen = set()
        for f in frames:
            m = FRAME.match(f)
            if m and m.group("path").startswith("proxy/") and "cli.py" not in f:
                key = f"{m.group('fn')} ({m.group('path')})"
                if key not in seen and "__main__" not in key:
                    seen.add(key)
                    inclusive[key] += count
    lines = [f"{total} samples", "  innermost frame, by layer:"]
    lines += [f"    {n / total:6.1%}  {k}" for k, n in inner.most_common()]
    lines.append("  thriftgate functions, innermost:")
    lines += [f"    {n / total:6.1%}  {k}" for k, n in functions.most_common(top)]
    lines.append("  thriftgate functions, inclusive:")
    lines += [f"    {n / total:6.1%}  {k}" for k, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--script", action="append", help="bench/*.lua (default: unique and same)")
    args = ap.parse_args()
    scripts = args.script or ["unique_chat.lua", "same_chat.lua"]
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    up = free_port()
    with static_upstream(up):
        for script in scripts:
            port = free_port()
            with thriftgate(port, f"http://127.0.0.1:{up}/v1") as pid:
                wrk = ["wrk", "-t1", f"-c{args.connections}", "-s", str(HERE / script)]
                url = f"http://127.0.0.1:{port}"
                subprocess.run(pinned(LOAD_CPU, [*wrk, "-d2s", url]), capture_output=True)
                stacks = out / f"{script.removesuffix('.lua')}.stacks"
                record = ["py-spy", "record", "-p", str(pid), "-d", str(args.seconds)]
                spy = subprocess.Popen(
                    [*record, "-r", "200", "-f", "raw", "-o", str(stacks), "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env={**os.environ},
                )
                duration = f"-d{args.seconds + 1}s"
                subprocess.run(pinned(LOAD_CPU, [*wrk, duration, url]), capture_output=True)
                spy.wait()
            print(f"\n{script} (thriftgate on core {PROXY_CPU})")
            print(summarise(stacks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
