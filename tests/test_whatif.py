"""What-if estimates (``thriftgate usage --what-if``): the usage line's ``request_hash`` and
``trim_tokens``, and what they predict held against what the cache and trimming really do."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import API_KEY, MakeProxy, post
from fake_openai import FakeOpenAI, Fault
from traffic import conversation

from proxy.pricing import PriceTable
from proxy.whatif import WhatIf

OTHER_KEY = "sk-other-key-0000000000000000"
ask = functools.partial(post, headers={"x-thriftgate-max-retries": "0"})


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def what_if(log: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "usage", str(log), "--what-if", "--format", "json", *args],
        capture_output=True,
        check=True,
    )
    return json.loads(out.stdout)["what_if"]


async def test_request_hash_is_the_cache_key_whether_the_cache_is_on_or_not(
    make_proxy: MakeProxy,
) -> None:
    off = await make_proxy(env={"THRIFTGATE_CACHE": "false"})
    on = await make_proxy()
    for proxy in (off, on):
        await ask(proxy, chat("a", temperature=0))
        await ask(
            proxy,
            b'{"temperature":0,"messages":[{"content":"a","role":"user"}],"model":"gpt-4o-mini"}',
        )  # the same request, keys in another order
        await ask(proxy, chat("a", temperature=0), key=OTHER_KEY)  # another key: another scope
        await ask(proxy, chat("b", temperature=0))
    off_lines, on_lines = await off.usage.wait(4), await on.usage.wait(4)
    assert [r["cache"] for r in off_lines] == [None] * 4
    assert [r["cache"] for r in on_lines] == ["miss", "hit", "miss", "miss"]
    hashes = [r["request_hash"] for r in off_lines]
    assert hashes == [r["request_hash"] for r in on_lines]
    assert hashes[0] == hashes[1] and len(set(hashes)) == 3
    assert all(len(h) == 24 for h in hashes)
    shared = await make_proxy(env={"THRIFTGATE_CACHE": "false", "THRIFTGATE_CACHE_SCOPE": "shared"})
    await ask(shared, chat("a", temperature=0))
    await ask(shared, chat("a", temperature=0), key=OTHER_KEY)
    a, b = await shared.usage.wait(2)
    assert a["request_hash"] == b["request_hash"]  # the cache would serve it across keys


async def test_what_the_cache_would_save_is_what_it_saves(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    """The same traffic, once with the cache off and once on: the estimate from the first log
    is what the second one saved, hit for hit."""
    traffic = [chat(f"q{i % 4}") for i in range(10)] + [
        chat("q0", stream=True, stream_options={"include_usage": True})
    ] * 2
    logs = []
    for enabled in ("false", "true"):
        proxy = await make_proxy(env={"THRIFTGATE_CACHE": enabled})
        for body in traffic:
            assert (await ask(proxy, body)).status == 200
        fake.fail_next(Fault(status=500))
        assert (await ask(proxy, chat("fails"))).status == 500  # an error: no hash, never a hit
        records = await proxy.usage.wait(len(traffic) + 1)
        log = tmp_path / f"cache-{enabled}.jsonl"
        log.write_bytes(proxy.usage.getvalue())
        logs.append((log, records))
    (off_log, off_records), (_, on_records) = logs
    estimate = what_if(off_log)["cache"]
    hits = [r for r in on_records if r["cache"] == "hit"]
    assert len(hits) == 7  # 6 repeats of the four questions, and the second stream
    assert estimate["would_hit"] == len(hits) and estimate["already_hit"] == 0
    assert estimate["saved_usd"] == pytest.approx(sum(r["saved_usd"] for r in hits))
    assert estimate["requests"] == len(traffic)
    assert sum(1 for r in off_records if r["request_hash"]) == len(traffic)
    # with answers kept no time at all, nothing would have been a hit
    assert what_if(off_log, "--cache-ttl", "0")["cache"]["would_hit"] == 0


async def test_trim_tokens_are_what_trimming_saves(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    body = {"model": "gpt-4o", "messages": conversation(12)}
    await ask(proxy, body)
    for keep in (5, 10, 20):
        await ask(proxy, body, headers={"x-thriftgate-trim": f"last-{keep}"})
    plain, *trimmed = await proxy.usage.wait(4)
    assert set(plain["trim_tokens"]) == {"5", "10", "20"}
    for keep, record in zip(("5", "10", "20"), trimmed, strict=True):
        assert plain["trim_tokens"][keep] == record["optimized"]["tokens_saved"] > 0
        # the prompt counted before the call is that much smaller
        saved = plain["prompt_tokens_estimate"] - record["prompt_tokens_estimate"]
        assert saved == plain["trim_tokens"][keep]
    short = {"model": "gpt-4o", "messages": conversation(1)}
    await ask(proxy, short)
    assert "trim_tokens" not in (await proxy.usage.wait(5))[-1]  # nothing to trim: not written


async def test_responses_input_is_trimmed_by_its_items(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    items = [{"role": "user", "content": f"turn {i} " * 20} for i in range(8)]
    items[3:3] = [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "done " * 30},
    ]
    body = {"model": "gpt-4o", "input": items}
    await ask(proxy, body, path="/v1/responses")
    await ask(proxy, body, path="/v1/responses", headers={"x-thriftgate-trim": "last-5"})
    plain, trimmed = await proxy.usage.wait(2)
    assert plain["trim_tokens"]["5"] == trimmed["optimized"]["tokens_saved"] > 0


async def test_batch_estimate_on_tagged_traffic(make_proxy: MakeProxy, tmp_path: Path) -> None:
    proxy = await make_proxy()
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        for tags in ("batch", "nightly,offline", "web", "report"):
            await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": f"summarise for {tags}"}],
                extra_headers={"x-thriftgate-tags": tags},
            )
    records = await proxy.usage.wait(4)
    log = tmp_path / "usage.jsonl"
    log.write_bytes(proxy.usage.getvalue())
    batch = what_if(log)["batch"]
    tagged = records[:2]
    assert batch["requests"] == 2
    assert batch["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in tagged))
    # what the same calls cost through the Batch API, by the price table
    prices = PriceTable()
    at_batch = sum(prices.cost(r["model"], r, batch=True) for r in tagged)  # type: ignore[misc]
    assert batch["saved_usd"] == pytest.approx(batch["cost_usd"] - at_batch)
    custom = what_if(log, "--batch-tag", "report")["batch"]
    assert custom["requests"] == 1 and custom["tags"] == ["report"]


def test_the_cache_replay_forgets_what_expired() -> None:
    """Memory stays bounded by what the cache would still hold, and pruning changes nothing."""
    w = WhatIf(PriceTable(), ttl_s=60)
    for i in range(30_000):  # a new request a second, each repeated once 30 s later
        for when in (i, i + 30):
            minute, second = divmod(when, 60)
            w.add(
                {
                    "ts": f"2026-12-01T{minute // 60:02d}:{minute % 60:02d}:{second:02d}.000Z",
                    "status": 200,
                    "request_hash": f"h{i}",
                    "cost_usd": 0.001,
                    "cache": None,
                }
            )
    assert w.cache["would_hit"] == 30_000
    assert len(w.stored) < 25_000  # what expired was forgotten along the way


async def test_request_hash_of_a_failed_call_and_of_a_bypass(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    """A request the cache keyed carries its request_hash whatever became of it (an upstream
    500 too); one the cache did not key (``no-store``) only when it was answered."""
    proxy = await make_proxy()
    fake.fail_next(Fault(status=500))
    await ask(proxy, chat("x", temperature=0))  # keyed, failed
    await ask(proxy, chat("x", temperature=0))  # keyed, answered (a miss: the 500 was not kept)
    fake.fail_next(Fault(status=500))
    no_store = {"x-thriftgate-max-retries": "0", "Cache-Control": "no-store"}
    await post(proxy, chat("x", temperature=0), headers=no_store)  # not keyed, failed
    await post(proxy, chat("x", temperature=0), headers=no_store)  # not keyed, answered
    failed, answered, bypass_failed, bypassed = await proxy.usage.wait(4)
    assert (failed["status"], failed["cache"]) == (500, "miss")
    assert (answered["status"], answered["cache"]) == (200, "miss")
    assert failed["request_hash"] == answered["request_hash"] is not None
    assert (bypass_failed["status"], bypass_failed["request_hash"]) == (500, None)
    assert bypassed["cache"] == "bypass" and bypassed["request_hash"] == answered["request_hash"]
