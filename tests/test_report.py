"""`thriftgate usage`: totals per group from usage logs, plain, gzipped or on stdin."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import API_KEY, Proxy

from proxy.report import Report, Totals, parse_time


def rec(i: int, **fields: Any) -> dict[str, Any]:
    return {
        "ts": f"2026-11-{20 + i % 3:02d}T10:00:00.000Z",
        "request_id": f"r{i}",
        "key": "aaaaaaaaaaaa",
        "key_alias": None,
        "model": "gpt-4o",
        "endpoint": "/v1/chat/completions",
        "user": None,
        "status": 200,
        "cache": "miss",
        "total_tokens": 100,
        "prompt_tokens": 80,
        "completion_tokens": 20,
        "cost_usd": 0.001,
        "saved_usd": None,
        "latency_ms": 100.0,
        **fields,
    }


RECORDS = [
    rec(0),
    rec(1, cache="hit", cost_usd=0.0, saved_usd=0.001, latency_ms=2.0),
    rec(
        2,
        status=429,
        total_tokens=None,
        prompt_tokens=None,
        completion_tokens=None,
        cost_usd=None,
        cache=None,
        latency_ms=1.0,
    ),
    rec(
        3,
        ts="2026-11-21T23:59:59.999Z",
        model="gpt-4o-mini",
        key="bbbbbbbbbbbb",
        key_alias="ci-bot",
        cost_usd=0.0001,
        latency_ms=400.0,
    ),
    rec(
        4,
        model="text-embedding-3-small",
        endpoint="/v1/embeddings",
        total_tokens=7,
        prompt_tokens=7,
        completion_tokens=0,
        cost_usd=0.00000014,
        user="alice",
    ),
]


def lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_totals_equal_a_hand_computation() -> None:
    report = Report(("model",))
    report.feed([*lines(RECORDS).splitlines(), b"not json", b"[1, 2]", b""])
    assert report.skipped == 1 and report.foreign == 1  # not JSON; JSON but not a record
    total = report.total.row()
    assert total["requests"] == 5
    assert total["tokens"] == 100 + 100 + 100 + 7
    assert total["cost_usd"] == pytest.approx(0.001 + 0.0 + 0.0001 + 0.00000014)
    assert total["saved_usd"] == pytest.approx(0.001)
    assert total["cache_hit_rate"] == pytest.approx(1 / 4)  # one hit of four cacheable
    assert total["error_rate"] == pytest.approx(1 / 5)
    rows = {r["model"]: r for r in report.rows()}
    assert rows["gpt-4o"]["requests"] == 3 and rows["gpt-4o"]["tokens"] == 200
    assert rows["gpt-4o-mini"]["cost_usd"] == pytest.approx(0.0001)
    assert rows["TOTAL"]["requests"] == 5
    assert list(rows) == ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "TOTAL"]  # by cost


def test_percentiles_within_one_percent_in_bounded_memory() -> None:
    totals = Totals()
    values = [1 + i * 0.37 for i in range(100_000)]
    for v in values:
        totals.add({"latency_ms": v})
    assert len(totals.latency_bins) < 600  # constant memory, whatever the number of lines
    exact = sorted(values)
    assert totals.percentile(0.5) == pytest.approx(exact[49_999], rel=0.011)
    assert totals.percentile(0.95) == pytest.approx(exact[94_999], rel=0.011)


def test_groups_window_and_key_alias() -> None:
    report = Report(("key", "day"), since=parse_time("2026-11-21"), until=parse_time("2026-11-22"))
    report.feed(lines(RECORDS).splitlines())
    rows = list(report.rows())
    assert report.outside == 2
    assert [(r["key"], r["day"], r["requests"]) for r in rows] == [
        ("ci-bot", "2026-11-21", 1),
        ("aaaaaaaaaaaa", "2026-11-21", 2),
        ("TOTAL", "", 3),
    ]
    assert parse_time("24h", now=100_000.0) == 100_000.0 - 86_400
    with pytest.raises(ValueError, match="is not a time"):
        parse_time("yesterday")


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "usage", *args], input=stdin, capture_output=True
    )


def test_cli_gzip_stdin_and_formats(tmp_path: Path) -> None:
    plain = tmp_path / "usage.jsonl"
    plain.write_bytes(lines(RECORDS[:3]) + b"{broken\n")
    zipped = tmp_path / "usage.jsonl.1.gz"
    zipped.write_bytes(gzip.compress(lines(RECORDS[3:])))
    out = run(str(plain), str(zipped), "--by", "user", "--format", "json")
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert data["total"]["requests"] == 5 and data["skipped_lines"] == 1
    assert {g["user"]: g["requests"] for g in data["groups"]} == {"-": 4, "alice": 1}
    assert b"skipped 1 malformed lines" in out.stderr
    out = run("--format", "csv", "--by", "endpoint", stdin=gzip.compress(lines(RECORDS)))
    rows = out.stdout.decode().splitlines()
    assert rows[0].startswith("endpoint,requests,tokens")
    assert rows[-1].startswith("TOTAL,5,307,")
    out = run(str(plain))
    table = out.stdout.decode()
    assert "requests" in table and "p95 ms" in table
    assert run(str(tmp_path / "missing.jsonl")).returncode == 2
    assert run(str(plain), "--since", "someday").returncode == 2


async def test_user_and_tags_reach_the_log(proxy: Proxy) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "user": "u-42"}
    headers = {"Authorization": f"Bearer {API_KEY}", "x-thriftgate-tags": "team=search, nightly"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/chat/completions", json=body, headers=headers) as r,
    ):
        assert r.status == 200
    record = (await proxy.usage.wait(1))[-1]
    assert (record["user"], record["tags"]) == ("u-42", ["team=search", "nightly"])


async def test_the_report_covers_responses_images_and_audio(proxy: Proxy, tmp_path: Path) -> None:
    import openai

    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        await client.responses.create(model="gpt-4o", input="hello")
        await client.responses.create(model="gpt-4o", input="hello")  # a cache hit
        await client.images.generate(model="dall-e-3", prompt="a boat", n=2)
        await client.audio.transcriptions.create(
            model="whisper-1", file=("a.mp3", b"\0" * 16_000 * 120, "audio/mpeg")
        )
        await client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="hi")
    records = await proxy.usage.wait(5)
    log = tmp_path / "usage.jsonl"
    log.write_bytes(proxy.usage.getvalue())
    out = run(str(log), "--by", "endpoint", "--format", "json")
    data = json.loads(out.stdout)
    groups = {g["endpoint"]: g for g in data["groups"]}
    responses = groups["/v1/responses"]
    assert responses["requests"] == 2 and responses["cache_hit_rate"] == 0.5
    assert responses["cost_usd"] == pytest.approx(records[0]["cost_usd"])
    assert responses["saved_usd"] == pytest.approx(records[0]["cost_usd"])
    assert groups["/v1/images/generations"]["images"] == 2
    assert groups["/v1/images/generations"]["cost_usd"] == pytest.approx(0.08)
    assert groups["/v1/audio/transcriptions"]["audio_minutes"] == 2
    assert groups["/v1/audio/transcriptions"]["cost_usd"] == pytest.approx(0.012)
    assert groups["/v1/audio/speech"]["unpriced"] == 1  # its cost is unknown, and shown so
    assert data["total"]["unpriced"] == 1
    table = run(str(log), "--by", "endpoint").stdout.decode()
    assert "images" in table and "audio min" in table and "unpriced" in table
    assert "/v1/responses" in table


def test_an_operational_log_is_refused_with_the_line_and_why(tmp_path: Path) -> None:
    app_log = tmp_path / "thriftgate.log"
    events = [
        {"event": "listening", "level": "info", "ts": "2026-12-02T10:00:00Z", "port": 8080},
        {"event": "retrying", "level": "info", "request_id": "r1", "attempt": 1},
    ]
    app_log.write_bytes(lines(events))
    out = run(str(app_log))
    assert out.returncode == 2 and out.stdout == b""
    assert f"{app_log}, line 1: it is an operational log event ('listening')".encode() in out.stderr
    # a usage log with a few foreign lines mixed in: those are skipped, and said so
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(lines(RECORDS[:2]) + lines(events[1:]))
    out = run(str(mixed), "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout)["total"]["requests"] == 2
    assert b"skipped 1 lines that are not usage records (first: " in out.stderr
    assert f"{mixed}, line 3".encode() in out.stderr


def test_an_unknown_cost_is_shown_as_unknown(tmp_path: Path) -> None:
    log = tmp_path / "usage.jsonl"
    log.write_bytes(lines([rec(1, model="house-model", cost_usd=None), rec(2, cost_usd=0.002)]))
    table = run(str(log), "--by", "model").stdout.decode()
    house = next(line for line in table.splitlines() if line.startswith("house-model"))
    assert " unknown " in house
    total = table.splitlines()[-1]
    assert "0.0020+?" in total  # a total that misses a cost says so


def test_no_file_on_a_terminal_prints_help_instead_of_waiting() -> None:
    import os
    import pty

    leader, follower = pty.openpty()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "proxy", "usage"],
            stdin=follower,
            capture_output=True,
            timeout=30,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert out.returncode == 2
    assert b"usage: thriftgate usage" in out.stdout
    assert b"nothing to read from a terminal" in out.stderr


def test_ctrl_c_is_a_word_not_a_traceback() -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "usage", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    proc.stdin.write(lines(RECORDS[:1]))  # it is reading, and waits for more
    proc.stdin.flush()
    import time

    deadline = time.monotonic() + 20
    # the program is up once it blocks reading its stdin (the kernel says where it waits)
    while time.monotonic() < deadline and not _waiting_on(proc.pid).endswith("pipe_read"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"interrupted" in err


def _waiting_on(pid: int) -> str:
    """The kernel function the process sleeps in (``pipe_read``: blocked reading a pipe)."""
    with open(f"/proc/{pid}/wchan") as fh:
        return fh.read().strip()
