"""`thriftgate doctor`: each check against real parts (the fake upstream, a real Redis, files)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer
from conftest import free_port
from fake_openai import FakeOpenAI, Fault

from proxy.doctor import FAIL, OK, WARN, Check, run_checks


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name.split(" ")[0]: c for c in checks}


async def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, in a thread: the fake upstream answers from this test's event loop."""
    return await asyncio.to_thread(_doctor, env, *args)


def _doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("THRIFTGATE_", "REDIS_"))}
    return subprocess.run(
        [sys.executable, "-m", "proxy", "doctor", "--port", "0", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


async def test_a_good_setup_passes_every_check(
    upstream: TestServer, redis_url: str, tmp_path: Path
) -> None:
    env = {
        "THRIFTGATE_UPSTREAM_URL": str(upstream.make_url("/v1")),
        "THRIFTGATE_UPSTREAM_API_KEY": "sk-doctor-test",
        "REDIS_URL": redis_url,
        "THRIFTGATE_USAGE_LOG": str(tmp_path / "usage.jsonl"),
    }
    out = await doctor(env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert "GET /models 200" in out.stdout and "the key works" in out.stdout
    assert "ping and scripts loaded" in out.stdout
    assert "sk-doctor-test" not in out.stdout  # the key is never shown
    assert "usage.jsonl (will be created)" in out.stdout


async def test_a_refused_key_and_a_missing_v1_are_named(
    upstream: TestServer, fake: FakeOpenAI
) -> None:
    fake.fail_next(Fault(status=401))
    flags = {"upstream": str(upstream.make_url("/v1")), "port": 0}
    checks = by_name(await run_checks(flags, None, "sk-wrong"))
    assert checks["upstream"].result == FAIL and "the key is refused" in checks["upstream"].detail
    flags = {"upstream": str(upstream.make_url("")), "port": 0}
    checks = by_name(await run_checks(flags, None, "sk-any"))
    assert checks["upstream"].result == FAIL
    assert "is the upstream URL missing /v1?" in checks["upstream"].detail


async def test_no_key_is_a_warning_when_the_upstream_wants_one(upstream: TestServer) -> None:
    checks = by_name(
        await run_checks({"upstream": str(upstream.make_url("/v1")), "port": 0}, None, None)
    )
    assert checks["upstream"].result == WARN and "401" in checks["upstream"].detail


async def test_unreachable_parts_fail_with_the_reason(tmp_path: Path) -> None:
    env = {
        "THRIFTGATE_UPSTREAM_URL": f"http://127.0.0.1:{free_port()}/v1",
        "REDIS_URL": f"redis://:hunter2@127.0.0.1:{free_port()}/0",
        "THRIFTGATE_USAGE_LOG": str(tmp_path / "missing-folder" / "usage.jsonl"),
    }
    out = await doctor(env)
    assert out.returncode == 1
    assert "connection refused" in out.stdout
    assert "redis " in out.stdout and "hunter2" not in out.stdout  # the password is not shown
    assert "missing-folder does not exist" in out.stdout
    assert "3 checks failed" in out.stdout


async def test_a_bad_config_fails_first(tmp_path: Path) -> None:
    out = await doctor({"THRIFTGATE_RPM": "lots"})
    assert out.returncode == 1
    assert "config" in out.stdout and "THRIFTGATE_RPM" in out.stdout and "FAIL" in out.stdout


@pytest.mark.parametrize("taken", [True, False])
async def test_the_port_check(upstream: TestServer, taken: bool) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1] if taken else free_port()
        flags = {"upstream": str(upstream.make_url("/v1")), "port": port}
        listen = by_name(await run_checks(flags, None, "sk-x"))["listen"]
    assert listen.result == (WARN if taken else OK)
    if taken:
        assert "already running" in listen.detail
