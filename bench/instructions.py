"""Instructions per request through thriftgate, counted by callgrind: deterministic where wall-clock
and CPU time on a shared VM are not.

    python bench/instructions.py chat responses      # needs valgrind (apt-get install valgrind)

For each workload it runs an in-process loop (client, thriftgate with its default chain, and the
static upstream of bench/upstream.py, all in one process) under ``valgrind --tool=callgrind``
twice, with SHORT and LONG requests after the same warm-up, and reports the difference divided by
LONG - SHORT: the instructions one more request costs, start-up cancelled out. Workloads: ``chat``
and ``responses`` (unique bodies with the same content, as bench/unique_*.lua send), ``chat-hit``
and ``responses-hit`` (the same body every time: cache hits).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
SHORT, LONG, WARM = 200, 700, 50


def body(kind: str, n: int) -> tuple[str, bytes]:
    if kind.endswith("-hit"):
        n = 0
    question = f"unique request {n}: what is the capital of France?"
    if kind.startswith("responses"):
        text = f'{{"model":"gpt-4o-mini","instructions":"You are terse.","input":"{question}"}}'
        return "/v1/responses", text.encode()
    text = (
        '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
        f'{{"role":"user","content":"{question}"}}]}}'
    )
    return "/v1/chat/completions", text.encode()


async def loop(kind: str, count: int) -> None:
    import aiohttp
    from aiohttp import web
    from upstream import chat, responses

    from proxy.app import create_app
    from proxy.cli import tune_collector
    from proxy.config import load_settings

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", chat)
    upstream.router.add_post("/v1/responses", responses)
    up_runner = web.AppRunner(upstream, access_log=None)
    await up_runner.setup()
    up_site = web.TCPSite(up_runner, "127.0.0.1", 0)
    await up_site.start()
    up_port = up_site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    # THRIFTGATE_* settings from the environment apply (THRIFTGATE_DASHBOARD=false, ...)
    env = {k: v for k, v in os.environ.items() if k.startswith("THRIFTGATE_")}
    env["THRIFTGATE_UPSTREAM_URL"] = f"http://127.0.0.1:{up_port}/v1"
    settings = load_settings(env=env)
    with open(os.devnull, "wb") as devnull:  # noqa: ASYNC230 - opened once, before the loop
        app = create_app(settings, usage_stream=devnull)
        tune_collector()  # the collector as ``thriftgate serve`` sets it
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        headers = {"Authorization": "Bearer sk-bench-key", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            for n in range(WARM + count):
                path, data = body(kind, n)
                async with session.post(
                    f"http://127.0.0.1:{port}{path}", data=data, headers=headers
                ) as r:
                    assert r.status == 200, (r.status, await r.read())
                    await r.read()
        await runner.cleanup()
    await up_runner.cleanup()


def instructions(kind: str, count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                str(Path(__file__)),
                "--run",
                kind,
                str(count),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        summary = re.search(rb"^summary:\s+(\d+)", out.read_bytes(), re.M)
        assert summary is not None
        return int(summary.group(1))


def main() -> int:
    if sys.argv[1:2] == ["--run"]:
        asyncio.run(loop(sys.argv[2], int(sys.argv[3])))
        return 0
    kinds = sys.argv[1:] or ["chat", "responses"]
    per: dict[str, float] = {}
    for kind in kinds:
        short, long = instructions(kind, SHORT), instructions(kind, LONG)
        per[kind] = (long - short) / (LONG - SHORT)
        print(f"{kind:15} {per[kind]:>12,.0f} instructions per request")
    first = kinds[0]
    for kind in kinds[1:]:
        print(f"{kind} / {first}: {per[kind] / per[first]:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
