"""The real program: ``thriftgate serve`` / ``python -m proxy serve`` as a separate process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from conftest import API_KEY, Served, start
from fake_openai import FakeOpenAI
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture
async def served(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Served]:
    server = start(tmp_path, "--upstream", str(upstream.make_url("/v1")))
    await server.ready()
    yield server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


async def test_serve_proxies_for_the_sdk(served: Served, fake: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=API_KEY) as client:
        completion = await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "via process"}]
        )
    assert completion.choices[0].message.content == "You said: via process"
    served.proc.send_signal(signal.SIGTERM)
    assert await served.wait() == 0
    lines = [orjson.loads(x) for x in served.log.read_text().splitlines() if x.startswith("{")]
    assert {"listening", "stopped"} <= {line.get("event") for line in lines}
    # the usage log went to stdout, apart from the operational log on stderr
    usage = [orjson.loads(x) for x in served.log.with_suffix(".usage").read_bytes().splitlines()]
    assert [u["endpoint"] for u in usage] == ["/v1/chat/completions"]
    assert usage[0]["total_tokens"] == completion.usage.total_tokens  # type: ignore[union-attr]
    assert all(line.get("event") != "usage" for line in lines)


async def test_sigterm_lets_inflight_stream_finish(served: Served, fake: FakeOpenAI) -> None:
    fake.gate = asyncio.Event()
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(served.url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        served.proc.send_signal(signal.SIGTERM)
        # the listener closes: a new connection is refused while the stream goes on
        async with asyncio.timeout(10):
            while True:
                try:
                    async with aiohttp.ClientSession() as s2, s2.get(served.url + "/healthz"):
                        pass
                except aiohttp.ClientConnectionError:
                    break
                await asyncio.sleep(0.05)
        assert served.proc.poll() is None
        fake.gate.set()
        rest = await asyncio.wait_for(r.read(), 10)
    assert b"role" in first
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await served.wait() == 0


async def test_workers_share_the_port(tmp_path: Path, upstream: TestServer) -> None:
    server = start(tmp_path, "--upstream", str(upstream.make_url("/v1")), "--workers", "2")
    try:
        await server.ready()
        pids: set[int] = set()
        async with asyncio.timeout(20):  # new connections spread over both workers once both listen
            while len(pids) < 2:
                async with aiohttp.ClientSession() as s, s.get(server.url + "/readyz") as r:
                    pids.add((await r.json())["pid"])
        assert len(pids) == 2
        assert server.proc.pid not in pids
        # /metrics counts for both workers, whichever answers the scrape
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for _ in range(10):  # new connections: spread over the workers
            async with (
                aiohttp.ClientSession() as s,
                s.get(server.url + "/v1/models", headers=headers) as r,
            ):
                assert r.status == 200
        agreeing = 0
        async with asyncio.timeout(20):
            while agreeing < 8:  # eight scrapes in a row (on new connections) see all ten
                async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as r:
                    text = await r.text()
                count = sum(
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "thriftgate_requests_total"
                    and sample.labels["endpoint"] == "/v1/models"
                )
                agreeing = agreeing + 1 if count == 10 else 0
                if count != 10:
                    await asyncio.sleep(0.1)  # the workers share their counts every second
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


def test_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", "99999"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--port: 99999 is not a TCP port" in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_the_same_program() -> None:
    result = subprocess.run(["thriftgate", "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("thriftgate ")


async def test_sighup_reopens_the_usage_log_for_logrotate(
    tmp_path: Path, upstream: TestServer
) -> None:
    usage = tmp_path / "usage.jsonl"
    server = start(
        tmp_path,
        "--upstream",
        str(upstream.make_url("/v1")),
        env={"THRIFTGATE_USAGE_LOG": str(usage)},
    )
    try:
        await server.ready()
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(server.url + "/v1/models", headers=headers) as r:
                assert r.status == 200
            rotated = tmp_path / "usage.jsonl.1"
            await written(usage)
            usage.rename(rotated)  # what logrotate does
            server.proc.send_signal(signal.SIGHUP)
            await written(usage, empty_ok=True)  # the process reopened the path
            async with s.get(server.url + "/v1/models?after=x", headers=headers) as r:
                assert r.status == 200
        await written(usage)
        assert orjson.loads(rotated.read_bytes().splitlines()[0])["endpoint"] == "/v1/models"
        assert len(rotated.read_bytes().splitlines()) == 1
        assert len(usage.read_bytes().splitlines()) == 1
        assert server.proc.poll() is None  # SIGHUP did not stop it
    finally:
        server.proc.terminate()
        assert await server.wait() == 0


async def written(path: Path, *, empty_ok: bool = False, within: float = 5) -> None:
    """Wait until another process has created (and written to) ``path``: polled, bounded."""

    def ready() -> bool:
        return path.exists() and (empty_ok or path.stat().st_size > 0)

    async with asyncio.timeout(within):
        while not ready():  # noqa: ASYNC110 - another process writes it: nothing to wait on
            await asyncio.sleep(0.02)


async def test_console_mode_shows_a_banner_access_lines_and_shutdown(
    tmp_path: Path, upstream: TestServer, fake: FakeOpenAI
) -> None:
    server = start(
        tmp_path,
        "--upstream",
        str(upstream.make_url("/v1")),
        "--log-format",
        "console",
        env={"THRIFTGATE_RPM": "60", "THRIFTGATE_USD_PER_DAY": "5"},
    )
    try:
        await server.ready()
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY) as client:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "console please"}]
            )
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "console please"}]
            )
        server.proc.send_signal(signal.SIGTERM)
        assert await server.wait() == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    text = server.log.read_text()
    assert not any(line.startswith("{") for line in text.splitlines())  # no JSON for a person
    assert f"listening on {server.url}" in text
    for row in ("upstream", "cache        memory", "redis        off", "usage log    stdout"):
        assert row in text, row
    assert "usd/day $5.00 per key" in text and "60 rpm per key (reject)" in text
    assert "admin token  not set" in text
    access = [line for line in text.splitlines() if "POST /v1/chat/completions" in line]
    assert len(access) == 2
    assert " 200 POST /v1/chat/completions gpt-4o MISS " in access[0] and " tok " in access[0]
    assert access[0].rstrip().endswith("ms") and "$0.0000" in access[0]
    assert " HIT " in access[1] and "saved $" in access[1]
    assert "draining 0 requests in flight, up to 30 s" in text
    assert text.rstrip().endswith("thriftgate: stopped")


def test_auto_is_console_on_a_terminal_only() -> None:
    import io

    from proxy.console import resolve_format

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Terminal()) == "console"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("json", Terminal()) == "json"


def test_a_bad_log_format_is_a_configuration_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "THRIFTGATE_LOG_FORMAT": "pretty"},
        timeout=30,
    )
    assert out.returncode == 2
    assert "THRIFTGATE_LOG_FORMAT: 'pretty' is not one of auto, console, json" in out.stderr


def test_the_banner_warns_of_an_upstream_without_v1() -> None:
    from proxy.config import load_settings
    from proxy.console import banner, summary

    settings = load_settings(env={"THRIFTGATE_UPSTREAM_URL": "http://user:pw@llm.internal:8000"})
    facts = summary(
        settings, url="http://127.0.0.1:8080", redis="off", cache="memory", cache_bytes=1
    )
    text = banner(facts)
    assert "does not end in /v1" in text and "pw" not in text
    assert "does not end in /v1" not in banner(
        {**facts, "upstreams": ["https://api.openai.com/v1"]}
    )
