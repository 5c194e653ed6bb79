"""thriftgate benchmark: thriftgate against a bare aiohttp forwarder, in the same run, as ratios.

    python bench/run.py [--duration 10] [--connections 32] [--quick]

Starts a fast static upstream (nginx answering a canned chat completion when nginx is installed,
else bench/upstream.py), the bare forwarder (bench/bare_forwarder.py) and thriftgate with its full
chain (1 worker and 2), loads each with wrk (Debian package `wrk`) using unique non-streaming chat
bodies in alternating rounds, and prints RPS, p50/p99 and CPU per request side by side with
thriftgate's ratios to the forwarder. It then measures time to first byte of a stream (against
bench/upstream.py), direct and through each proxy, and the Responses API's path against the chat
path through the same thriftgate (``--responses-only`` runs just that). Absolute numbers depend
on the machine (these are noisy); read the ratios. Results are also written to
bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# On a 2-core machine: the load generator and the upstream share core 0, the proxy under test
# (bare or thriftgate, one worker) has core 1 to itself, so both sides get the same CPU.
LOAD_CPU, PROXY_CPU = 0, 1
ROOT = HERE.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def pinned(cpu: int | None, args: list[str]) -> list[str]:
    """Pin a process to one core, when the machine has two or more and taskset exists."""
    if cpu is None or (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return args
    return ["taskset", "-c", str(cpu), *args]


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@contextmanager
def process(
    args: list[str],
    port: int,
    env: dict[str, str] | None = None,
    cpu: int | None = None,
    cwd: Path = ROOT,
) -> Iterator[int]:
    proc = subprocess.Popen(
        pinned(cpu, args),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_port(port)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            add_header x-request-id req_bench;
            add_header openai-processing-ms 1;
            return 200 '{body}';
        }}
        location = /v1/responses {{
            default_type application/json;
            add_header x-request-id req_bench;
            add_header openai-processing-ms 1;
            return 200 '{responses_body}';
        }}
    }}
}}
"""


@contextmanager
def static_upstream(port: int) -> Iterator[str]:
    """nginx answering every request with a canned chat completion (cheap, so the load generator
    and the upstream leave the proxy's core alone); bench/upstream.py where nginx is missing."""
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx is None:
        with process([sys.executable, str(HERE / "upstream.py"), str(port)], port, cpu=LOAD_CPU):
            yield "bench/upstream.py"
        return
    from upstream import ANSWER, RESPONSE  # the same canned answers as bench/upstream.py

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                dir=tmp, port=port, body=ANSWER.decode(), responses_body=RESPONSE.decode()
            )
        )
        with process([nginx, "-c", str(conf), "-p", tmp], port, cpu=LOAD_CPU):
            yield "nginx"


def thriftgate(
    port: int,
    upstream: str,
    *,
    workers: int = 1,
    cpu: int | None = PROXY_CPU,
    tree: Path = ROOT,
    **env: str,
) -> AbstractContextManager[int]:
    """thriftgate serving on ``port`` in front of ``upstream``, its usage log discarded;
    ``tree``: the checkout it runs from (a ``git worktree`` of another commit, for an A/B)."""
    args = [sys.executable, "-m", "proxy", "serve", "--port", str(port), "--upstream", upstream]
    args += ["--workers", str(workers)]
    # ``python -m`` puts the working directory first on the path: the tree's own ``proxy``
    return process(args, port, {"THRIFTGATE_USAGE_LOG": os.devnull, **env}, cpu=cpu, cwd=tree)


def bare_forwarder(port: int, upstream: str) -> AbstractContextManager[int]:
    """The yardstick, on the same core thriftgate gets."""
    args = [sys.executable, str(HERE / "bare_forwarder.py"), str(port), upstream]
    return process(args, port, cpu=PROXY_CPU)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    url: str,
    duration: int,
    connections: int,
    pid: int | None = None,
    script: str = "unique_chat.lua",
) -> dict:
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(
        pinned(LOAD_CPU, wrk_command(url, duration, connections, script)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    run = parse_wrk(out)
    cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    requests = run["requests"]
    return {**run, "cpu_us_per_request": cpu / requests * 1e6 if pid and requests else None}


def wrk_command(url: str, duration: int, connections: int, script: str) -> list[str]:
    """One wrk thread, ``connections`` connections, latency percentiles, a Lua request script."""
    return [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(HERE / script),
        url,
    ]


def parse_wrk(out: str) -> dict:
    """RPS, requests, p50/p99 and errors from wrk's ``--latency`` report."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "requests": requests,
        "p50_ms": _ms(pct["50"]),
        "p99_ms": _ms(pct["99"]),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else None,
    }


async def ttfb(base: str, n: int) -> list[float]:
    """Milliseconds to the first body byte of a streaming chat, n sequential requests."""
    salt = time.time_ns()
    headers = {"Authorization": "Bearer sk-bench-key", "Content-Type": "application/json"}
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            body = (  # unique, so the cache never answers: this measures the pass-through
                b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"'
                + f"hi {salt} {i}".encode()
                + b'"}]}'
            )
            t0 = time.perf_counter()
            async with s.post(base + "/v1/chat/completions", data=body, headers=headers) as r:
                await r.content.readany()
                t1 = time.perf_counter()
                await r.read()
            if i >= 20:  # warm-up excluded
                out.append((t1 - t0) * 1000)
    return out


def median_run(runs: list[dict]) -> dict:
    """The run with the median RPS (its latencies belong to it), and the median CPU/request."""
    ordered = sorted(runs, key=lambda r: r["rps"])
    cpu = [r["cpu_us_per_request"] for r in runs if r["cpu_us_per_request"]]
    return {
        **ordered[len(ordered) // 2],
        "cpu_us_per_request": statistics.median(cpu) if cpu else None,
        "rounds_rps": [round(r["rps"]) for r in runs],
    }


def paired_ratio(a: list[dict], b: list[dict], key: str) -> float:
    """Median over rounds of b/a, pairing the runs made back to back (drift cancels out)."""
    return statistics.median(y[key] / x[key] for x, y in zip(a, b, strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating runs per side")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--ttfb-requests", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 s, 100 stream requests")
    parser.add_argument(
        "--responses-only", action="store_true", help="only the Responses vs chat comparison"
    )
    args = parser.parse_args()
    if args.quick:
        args.duration, args.rounds, args.ttfb_requests = 2, 3, 100
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    if args.responses_only:
        responses_vs_chat(args.duration, args.rounds, args.connections)
        return 0

    up, sse, bare, tg, tg2 = (free_port() for _ in range(5))
    upstream = f"http://127.0.0.1:{up}/v1"
    runs: dict[str, list[dict]] = {"bare": [], "thriftgate": [], "thriftgate_2w": []}
    d, c = args.duration, args.connections
    with (
        static_upstream(up) as upstream_kind,
        bare_forwarder(bare, upstream) as bare_pid,
        thriftgate(tg, upstream) as tg_pid,
        thriftgate(tg2, upstream, workers=2, cpu=None) as tg2_pid,
    ):
        for port in (up, bare, tg, tg2):  # warm-up
            wrk(f"http://127.0.0.1:{port}", 1, c)
        for _ in range(args.rounds):  # alternate, so drift on the machine hits every side alike
            runs["bare"].append(wrk(f"http://127.0.0.1:{bare}", d, c, bare_pid))
            runs["thriftgate"].append(wrk(f"http://127.0.0.1:{tg}", d, c, tg_pid))
            runs["thriftgate_2w"].append(wrk(f"http://127.0.0.1:{tg2}", d, c, tg2_pid))
    # cache hits: the same body every time, memory and Redis backends, against the same bare
    # forwarder's pass-through
    hit_runs: dict[str, list[dict]] = {"bare": [], "hit_memory": [], "hit_redis": []}
    rport, tgr = free_port(), free_port()
    with (
        static_upstream(up),
        bare_forwarder(bare, upstream) as bare_pid,
        thriftgate(tg, upstream) as tg_pid,
        process(
            ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
            rport,
            cpu=LOAD_CPU,
        ),
        thriftgate(tgr, upstream, REDIS_URL=f"redis://127.0.0.1:{rport}/0") as tgr_pid,
    ):
        same = "same_chat.lua"
        for port in (bare, tg, tgr):
            wrk(f"http://127.0.0.1:{port}", 1, c, script=same)
        for _ in range(args.rounds):
            hit_runs["bare"].append(wrk(f"http://127.0.0.1:{bare}", d, c, bare_pid, same))
            hit_runs["hit_memory"].append(wrk(f"http://127.0.0.1:{tg}", d, c, tg_pid, same))
            hit_runs["hit_redis"].append(wrk(f"http://127.0.0.1:{tgr}", d, c, tgr_pid, same))
        one_conn = {
            "bare": wrk(f"http://127.0.0.1:{bare}", d, 1, bare_pid, same),
            "hit_memory": wrk(f"http://127.0.0.1:{tg}", d, 1, tg_pid, same),
            "hit_redis": wrk(f"http://127.0.0.1:{tgr}", d, 1, tgr_pid, same),
        }

    # streams: the Python upstream (it speaks SSE), the two proxies in front of it
    sse_upstream = f"http://127.0.0.1:{sse}/v1"
    with (
        process([sys.executable, str(HERE / "upstream.py"), str(sse)], sse, cpu=LOAD_CPU),
        bare_forwarder(bare, sse_upstream),
        thriftgate(tg, sse_upstream),
    ):
        direct_ttfb = asyncio.run(ttfb(f"http://127.0.0.1:{sse}", args.ttfb_requests))
        bare_ttfb = asyncio.run(ttfb(f"http://127.0.0.1:{bare}", args.ttfb_requests))
        tg_ttfb = asyncio.run(ttfb(f"http://127.0.0.1:{tg}", args.ttfb_requests))

    results = {name: median_run(r) for name, r in runs.items()}
    rps_ratio = {name: paired_ratio(runs["bare"], r, "rps") for name, r in runs.items()}
    cpu_ratio = {
        name: 1 / paired_ratio(runs["bare"], r, "cpu_us_per_request") for name, r in runs.items()
    }
    print(
        f"\nnon-streaming chat, unique bodies, {c} connections, {args.rounds} alternating "
        f"{d}s rounds per side (wrk), upstream: {upstream_kind}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; medians"
    )
    print(
        f"{'':15}{'RPS':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU us/req':>12}"
        f"{'RPS vs bare':>13}{'req/CPU-s vs bare':>19}  rounds (RPS)"
    )
    for name, r in results.items():
        print(
            f"{name:15}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['cpu_us_per_request']:>12.0f}{rps_ratio[name]:>12.2f}x"
            f"{cpu_ratio[name]:>18.2f}x  {r['rounds_rps']}"
        )
    print(
        "bare and thriftgate: one process, on a core of its own (the load generator and the "
        "upstream share the other);\nthriftgate_2w: two workers, sharing both cores with the "
        "load generator and the upstream."
    )
    hits = {name: median_run(r) for name, r in hit_runs.items()}
    hit_ratio = {name: paired_ratio(hit_runs["bare"], r, "rps") for name, r in hit_runs.items()}
    print(f"\ncache hits (the same chat body every time), {c} connections; bare = pass-through")
    print(
        f"{'':15}{'RPS':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU us/req':>12}{'RPS vs bare':>13}"
        f"{'p50 ms @1 conn':>16}"
    )
    for name, r in hits.items():
        print(
            f"{name:15}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['cpu_us_per_request']:>12.0f}{hit_ratio[name]:>12.2f}x"
            f"{one_conn[name]['p50_ms']:>16.3f}"
        )
    med = statistics.median
    added_tg = med(tg_ttfb) - med(direct_ttfb)
    added_bare = med(bare_ttfb) - med(direct_ttfb)
    print(f"\nstream time to first byte, {args.ttfb_requests} sequential requests (p50 ms)")
    print(
        f"  direct to upstream {med(direct_ttfb):.3f}   via bare forwarder "
        f"{med(bare_ttfb):.3f} (+{added_bare:.3f})   via thriftgate {med(tg_ttfb):.3f} "
        f"(+{added_tg:.3f})"
    )
    summary = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "connections": c,
        "duration_s": d,
        "rounds": args.rounds,
        "upstream": upstream_kind,
        "python": platform.python_version(),
        "results": results,
        "rps_ratio_vs_bare": rps_ratio,
        "requests_per_cpu_second_ratio_vs_bare": cpu_ratio,
        "cache_hits": hits,
        "cache_hit_rps_ratio_vs_bare": hit_ratio,
        "cache_hit_p50_ms_one_connection": {k: v["p50_ms"] for k, v in one_conn.items()},
        "ttfb_p50_ms": {
            "direct": med(direct_ttfb),
            "bare": med(bare_ttfb),
            "thriftgate": med(tg_ttfb),
        },
        "ttfb_added_p50_ms": added_tg,
    }
    summary["responses_vs_chat"] = responses_vs_chat(d, args.rounds, c)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(summary, indent=2))
    return 0


def responses_vs_chat(d: int, rounds: int, c: int) -> dict:
    """One thriftgate (full default chain, one worker) loaded in alternating rounds with unique
    chat bodies and unique Responses bodies of the same content: the Responses path's throughput
    and CPU per request as a ratio of the chat path's."""
    up, tg = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up}/v1"
    runs: dict[str, list[dict]] = {"chat": [], "responses": []}
    scripts = {"chat": "unique_chat.lua", "responses": "unique_responses.lua"}
    with static_upstream(up), thriftgate(tg, upstream) as tg_pid:
        for script in scripts.values():
            wrk(f"http://127.0.0.1:{tg}", 1, c, script=script)
        for _ in range(rounds):
            for name, script in scripts.items():
                runs[name].append(wrk(f"http://127.0.0.1:{tg}", d, c, tg_pid, script))
    results = {name: median_run(r) for name, r in runs.items()}
    rps = paired_ratio(runs["chat"], runs["responses"], "rps")
    cpu = 1 / paired_ratio(runs["chat"], runs["responses"], "cpu_us_per_request")
    print(f"\nResponses API vs chat through thriftgate, unique bodies, {c} connections")
    print(f"{'':12}{'RPS':>8}{'p50 ms':>8}{'p99 ms':>8}{'CPU us/req':>12}  rounds (RPS)")
    for name, r in results.items():
        print(
            f"{name:12}{r['rps']:>8.0f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['cpu_us_per_request']:>12.0f}  {r['rounds_rps']}"
        )
    print(f"responses / chat: {rps:.2f}x RPS, {cpu:.2f}x requests per CPU-second")
    return {"results": results, "rps_ratio": rps, "requests_per_cpu_second_ratio": cpu}


if __name__ == "__main__":
    raise SystemExit(main())
