"""The floor under a cache hit: aiohttp's server answering a constant (the canned chat answer,
with the headers a hit sends) against the bare forwarder and thriftgate's hits, in one run.

    python bench/floor.py [--rounds 5] [--script same_chat.lua]

Whatever thriftgate does on a hit comes on top of what this costs; ``--serve PORT`` runs only the
constant server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import PROXY_CPU, bare_forwarder, free_port, process, static_upstream, thriftgate, wrk  # noqa: E402
from upstream import ANSWER  # noqa: E402

HEADERS = {
    "Content-Type": "application/json",
    "x-request-id": "req_bench",
    "openai-processing-ms": "1",
    "x-thriftgate-cache": "HIT",
    "age": "0",
}


def serve(port: int) -> None:
    import uvloop
    from aiohttp import web

    async def constant(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, headers=HEADERS)

    app = web.Application()
    app.router.add_route("*", "/v1/{tail:.*}", constant)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=2)
    ap.add_argument("--script", default="same_chat.lua")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    up = free_port()
    with ExitStack() as stack:
        stack.enter_context(static_upstream(up))
        upstream = f"http://127.0.0.1:{up}/v1"
        ports = {name: free_port() for name in ("bare", "constant", "thriftgate")}
        floor = [sys.executable, __file__, "--serve", str(ports["constant"])]
        pids = {
            "bare": stack.enter_context(bare_forwarder(ports["bare"], upstream)),
            "constant": stack.enter_context(process(floor, ports["constant"], cpu=PROXY_CPU)),
            "thriftgate": stack.enter_context(thriftgate(ports["thriftgate"], upstream)),
        }
        for port in ports.values():  # warm-up
            wrk(f"http://127.0.0.1:{port}", 1, 32, script=args.script)
        runs: dict[str, list[dict]] = {name: [] for name in ports}
        for r in range(args.rounds):
            for name in ports if r % 2 == 0 else list(ports)[::-1]:
                url = f"http://127.0.0.1:{ports[name]}"
                runs[name].append(wrk(url, args.duration, 32, pids[name], args.script))
    print(f"{args.script}, 32 connections, {args.rounds} alternating rounds; medians")
    for name, got in runs.items():
        cpu = statistics.median(r["cpu_us_per_request"] for r in got)
        rps = statistics.median(r["rps"] for r in got)
        print(f"{name:12} {rps:8.0f} RPS {cpu:8.1f} us CPU per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
