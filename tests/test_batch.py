"""`thriftgate batch`: the Batch API, individual requests through the proxy, fallback, resume."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestServer
from conftest import API_KEY, Proxy
from fake_openai import FakeOpenAI, embeddings_payload

from proxy import batch
from proxy.pricing import PriceTable

PRICES = PriceTable()


def chat_line(i: int, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
    }


def write_input(path: Path, items: list[dict[str, Any]]) -> str:
    path.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items))
    return str(path)


def results(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


class Waits:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def run(proxy: Proxy, input_path: str, output: Path, via: str, **kwargs: Any) -> batch.Stats:
    options: dict[str, Any] = {
        "via": via,
        "base_url": proxy.base_url,
        "api_key": API_KEY,
        "concurrency": 4,
        "prices": PRICES,
        "sleep": Waits(),
        "poll_initial_s": 2.0,
        **kwargs,
    }
    return await batch.run(input_path, str(output), **options)


def cli_run(
    input_path: str, output: str, base_url: str, *more: str
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "batch",
            "run",
            input_path,
            "-o",
            output,
            "--base-url",
            base_url,
            *more,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": API_KEY},
    )


def test_invalid_lines_are_reported_with_their_numbers(tmp_path: Path) -> None:
    good = chat_line(1)
    path = tmp_path / "in.jsonl"
    path.write_bytes(
        orjson.dumps(good)
        + b"\n{not json\n"
        + orjson.dumps({**good, "custom_id": ""})
        + b"\n"
        + orjson.dumps(good)
        + b"\n"
        + orjson.dumps({**chat_line(2), "url": "/v1/images/generations"})
        + b"\n\n"
        + orjson.dumps({**chat_line(3), "method": "GET"})
        + b"\n"
    )
    lines, problems = batch.read_input(str(path))
    assert [line.custom_id for line in lines] == ["req-1"]
    assert problems == [
        "line 2: not valid JSON",
        "line 3: custom_id is missing (a non-empty string is required)",
        "line 4: custom_id 'req-1' repeats line 1",
        "line 5: url '/v1/images/generations' is not one of /v1/chat/completions, "
        "/v1/embeddings, /v1/completions, /v1/responses",
        "line 7: method must be POST, not 'GET'",
    ]


def test_the_cli_sends_nothing_when_the_input_has_problems(
    tmp_path: Path, upstream: TestServer, fake: FakeOpenAI
) -> None:
    path = write_input(tmp_path / "in.jsonl", [chat_line(1), chat_line(1)])
    out = cli_run(path, str(tmp_path / "out.jsonl"), str(upstream.make_url("/v1")))
    assert out.returncode == 2
    assert "line 2: custom_id 'req-1' repeats line 1" in out.stderr
    assert "nothing was sent" in out.stderr
    assert fake.requests == []


async def test_via_api_uploads_polls_and_writes_in_input_order(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(i) for i in range(6)]
    items[2]["body"]["model"] = "fail-me"  # the fake answers it 400, in the error file
    output = tmp_path / "out.jsonl"
    waits = Waits()
    stats = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, "api", sleep=waits)
    got = results(output)
    assert [r["custom_id"] for r in got] == [f"req-{i}" for i in range(6)]  # input order
    assert got[2]["response"]["status_code"] == 400
    assert got[0]["response"]["status_code"] == 200
    assert got[0]["response"]["body"]["choices"][0]["message"]["content"] == "You said: question 0"
    assert (stats.succeeded, stats.failed, stats.skipped) == (5, 1, 0)
    assert waits.waits == [2.0, 3.0]  # polled with backoff until it completed
    [created] = fake.batches.values()
    assert created["endpoint"] == "/v1/chat/completions"
    assert created["completion_window"] == "24h"
    usage = [r["response"]["body"]["usage"] for r in got if r["response"]["status_code"] == 200]
    full = sum(
        PRICES.cost(
            "gpt-4o-mini",
            {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"]},
        )
        or 0
        for u in usage
    )
    assert stats.cost_usd == pytest.approx(full / 2)  # Batch API prices: half
    assert not batch.state_path(output).exists()
    assert stats.summary().endswith("(Batch API prices)")


async def test_via_proxy_bounded_concurrency_and_immediate_appends(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(i) for i in range(12)]
    output = tmp_path / "out.jsonl"
    fake.slow = asyncio.Event()
    task = asyncio.create_task(
        run(proxy, write_input(tmp_path / "in.jsonl", items), output, "proxy", concurrency=3)
    )
    async with asyncio.timeout(10):
        while fake.in_flight < 3:  # noqa: ASYNC110 - the fake's state: nothing to wait on
            await asyncio.sleep(0.005)
    assert fake.in_flight == 3
    fake.slow.set()
    stats = await task
    assert fake.max_in_flight == 3 and stats.max_in_flight == 3
    got = results(output)
    assert sorted(r["custom_id"] for r in got) == sorted(f"req-{i}" for i in range(12))
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in got)
    assert stats.succeeded == 12 and stats.cost_usd > 0
    records = await proxy.usage.wait(13)  # every line went through the proxy's chain...
    assert [r["method"] for r in records].count("POST") == 12
    assert records[0]["endpoint"] == "/v1/models"  # ...after one look that it is there


async def test_auto_falls_back_without_a_batch_api(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    fake.batch_api = False
    items = [chat_line(i) for i in range(3)]
    output = tmp_path / "out.jsonl"
    stats = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, "auto")
    assert stats.via == "proxy" and stats.succeeded == 3
    assert "fell back" in stats.notes[0]
    with pytest.raises(batch.NoBatchAPI, match="no Batch API"):
        await run(proxy, write_input(tmp_path / "in.jsonl", items), tmp_path / "o2.jsonl", "api")


async def test_auto_falls_back_when_the_batch_fails_validation(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(0), chat_line(1, model="reject-batch")]
    output = tmp_path / "out.jsonl"
    stats = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, "auto")
    assert stats.via == "proxy"
    assert [b["status"] for b in fake.batches.values()] == ["failed"]
    assert len(results(output)) == 2


async def test_embeddings_via_api(proxy: Proxy, fake: FakeOpenAI, tmp_path: Path) -> None:
    items = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"text {i}"},
        }
        for i in range(3)
    ]
    output = tmp_path / "out.jsonl"
    stats = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, "api")
    got = results(output)
    assert stats.succeeded == 3
    expected = embeddings_payload(items[1]["body"])["data"][0]["embedding"]
    assert got[1]["response"]["body"]["data"][0]["embedding"] == expected


@pytest.mark.parametrize("via", ["api", "proxy"])
async def test_responses_batches(proxy: Proxy, tmp_path: Path, via: str) -> None:
    items = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/responses",
            "body": {"model": "gpt-4o-mini", "input": f"question {i}"},
        }
        for i in range(3)
    ]
    output = tmp_path / "out.jsonl"
    stats = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, via)
    got = results(output)
    assert stats.succeeded == 3 and [r["custom_id"] for r in got] == ["r0", "r1", "r2"]
    body = got[1]["response"]["body"]
    assert body["object"] == "response" and "question 1" in body["output"][0]["content"][0]["text"]
    usage = [r["response"]["body"]["usage"] for r in got]
    full = sum(
        PRICES.cost(
            "gpt-4o-mini",
            {"prompt_tokens": u["input_tokens"], "completion_tokens": u["output_tokens"]},
        )
        or 0
        for u in usage
    )
    assert stats.cost_usd == pytest.approx(full / 2 if via == "api" else full)  # Batch: half


async def test_resume_skips_what_was_answered(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(i) for i in range(5)]
    output = tmp_path / "out.jsonl"
    first = await run(proxy, write_input(tmp_path / "in.jsonl", items[:3]), output, "proxy")
    assert first.succeeded == 3
    with output.open("ab") as fh:  # an earlier run was cut off mid-line, and one had failed
        fh.write(
            orjson.dumps(
                {
                    "custom_id": "req-3",
                    "response": None,
                    "error": {"code": "request_failed", "message": "reset"},
                }
            )
            + b"\n"
        )
        fh.write(b'{"custom_id": "req-4", "respo')
    before = fake.calls("/v1/chat/completions")
    second = await run(proxy, write_input(tmp_path / "in.jsonl", items), output, "proxy")
    assert second.skipped == 3 and second.succeeded == 2
    assert fake.calls("/v1/chat/completions") - before == 2
    answered = {r["custom_id"] for r in batch.read_output(output).values() if batch.answered(r)}
    assert answered == {f"req-{i}" for i in range(5)}
    # exactly one line per custom_id: the failed and the cut lines were replaced, not kept
    ids = [r["custom_id"] for r in results(output)]
    assert sorted(ids) == [f"req-{i}" for i in range(5)]


async def test_nothing_is_sent_when_nothing_answers_at_the_base_url(tmp_path: Path) -> None:
    from conftest import free_port

    output = tmp_path / "out.jsonl"
    with pytest.raises(batch.BatchError) as refused:
        await batch.run(
            write_input(tmp_path / "in.jsonl", [chat_line(1)]),
            str(output),
            via="proxy",
            base_url=f"http://127.0.0.1:{free_port()}/v1",
            api_key=API_KEY,
            concurrency=2,
            prices=PRICES,
        )
    message = str(refused.value)
    assert "connection refused" in message and "Is the proxy running" in message
    assert "--base-url" in message and "ConnectionKey" not in message
    assert not output.exists()


async def test_cache_hits_are_counted_as_saved_not_spent(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(i) for i in range(3)]
    path = write_input(tmp_path / "in.jsonl", items)
    first = await run(proxy, path, tmp_path / "a.jsonl", "proxy")
    again = await run(proxy, path, tmp_path / "b.jsonl", "proxy")
    assert fake.calls("/v1/chat/completions") == 3  # the second run was served from the cache
    assert first.cost_usd > 0 and first.cache_hits == 0
    assert again.cache_hits == 3 and again.cost_usd == 0
    assert again.saved_usd == pytest.approx(first.cost_usd)
    assert "3 cache hits saved $" in again.summary() and "cost $0.000000" in again.summary()


async def test_an_interrupted_api_run_picks_up_its_batch(
    proxy: Proxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    items = [chat_line(i) for i in range(4)]
    output = tmp_path / "out.jsonl"
    path = write_input(tmp_path / "in.jsonl", items)

    async def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt  # Ctrl-C while waiting for the batch

    with pytest.raises(KeyboardInterrupt):
        await run(proxy, path, output, "api", sleep=interrupt)
    assert batch.state_path(output).exists()
    stats = await run(proxy, path, output, "api")
    assert len(fake.batches) == 1  # the same batch, not a second one
    assert stats.batch_id in fake.batches and stats.succeeded == 4
    assert [r["custom_id"] for r in results(output)] == [f"req-{i}" for i in range(4)]
    again = await run(proxy, path, output, "api")
    assert again.skipped == 4 and len(fake.batches) == 1  # nothing left to send


async def test_status_and_cancel_commands(
    upstream: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    base = str(upstream.make_url("/v1"))
    env_key = {"OPENAI_API_KEY": API_KEY}
    lines, _ = batch.read_input(write_input(tmp_path / "in.jsonl", [chat_line(0)]))
    import aiohttp

    async with aiohttp.ClientSession() as session:
        client = batch.Client(session, base, API_KEY)
        batch_id = await batch._create(client, lines, tmp_path / "state.json")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        import os

        return subprocess.run(
            [sys.executable, "-m", "proxy", "batch", *args, batch_id, "--base-url", base],
            capture_output=True,
            text=True,
            env={**os.environ, **env_key},
        )

    shown = await asyncio.to_thread(cli, "status")
    assert shown.returncode == 0 and '"status": "in_progress"' in shown.stdout
    cancelled = await asyncio.to_thread(cli, "cancel")
    assert cancelled.returncode == 0 and '"status": "cancelling"' in cancelled.stdout
    assert fake.batches[batch_id]["status"] == "cancelling"


async def test_the_cli_runs_and_summarises(
    upstream: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    path = write_input(tmp_path / "in.jsonl", [chat_line(i) for i in range(3)])
    output = tmp_path / "out.jsonl"
    fake.batch_api = False  # auto: straight to individual requests

    def cli() -> subprocess.CompletedProcess[str]:
        return cli_run(path, str(output), str(upstream.make_url("/v1")), "--concurrency", "2")

    out = await asyncio.to_thread(cli)
    assert out.returncode == 0, out.stderr
    assert "3 requests via proxy: 3 succeeded, 0 failed, 0 already answered, cost $" in out.stdout
    assert "sending individual requests instead" in out.stderr
    assert "batch: 3/3 done" in out.stderr  # plain progress lines: not a terminal
    again = await asyncio.to_thread(cli)
    assert "0 succeeded, 0 failed, 3 already answered" in again.stdout
