"""Tokens before the call: the prompt estimate header, the model catalogue, the context guard."""

from __future__ import annotations

import asyncio
import calendar
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as redis
from conftest import API_KEY, NO_STORE, MakeProxy, Proxy, RedisServer, scope_of
from conftest import AUTH_NO_STORE as AUTH
from conftest import post as post_to
from fake_openai import FakeOpenAI, Fault

from proxy import tokens
from proxy.admission import AdmissionStage
from proxy.app import part
from proxy.budget import BudgetStage, MemoryCounters, RedisCounters, period_of
from proxy.config import ConfigError, ModelInfo, load_settings
from proxy.keys import Keys, fingerprint
from proxy.metrics import Metrics
from proxy.pricing import PriceTable
from proxy.tokens import Catalogue

ROOT = Path(__file__).resolve().parent.parent


post = partial(post_to, headers=NO_STORE)  # past the cache


def chat(model: str, words: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi " * words}], **extra}


async def test_prompt_estimate_header_and_usage_field(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = chat("gpt-4o", 50)
    status, headers, _ = await post(proxy, body)
    expected = tokens.count_request("/v1/chat/completions", body).tokens
    assert status == 200
    assert headers["x-thriftgate-prompt-tokens"] == str(expected)
    assert (await proxy.usage.wait(1))[-1]["prompt_tokens_estimate"] == expected


async def test_context_guard_refuses_before_any_upstream_call(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    body = chat("gpt-4-0613", 9000)  # gpt-4: 8192 tokens
    status, _, payload = await post(proxy, body)
    assert status == 400
    error = payload["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    n = tokens.count_request("/v1/chat/completions", body).tokens
    assert error["message"] == (
        f"This model's maximum context length is 8192 tokens. However, you requested {n} tokens "
        f"({n} in the messages, 0 in the completion). Please reduce the length of the messages "
        "or completion."
    )
    assert fake.requests == []
    assert (await proxy.usage.wait(1))[-1]["error"] == "context_length_exceeded"


async def test_requested_output_counts_toward_the_window(proxy: Proxy, fake: FakeOpenAI) -> None:
    fits = chat("gpt-4", 4000)
    assert (await post(proxy, fits))[0] == 200
    status, _, payload = await post(proxy, {**fits, "max_tokens": 5000})
    assert status == 400 and "5000 in the completion" in payload["error"]["message"]
    status, _, _ = await post(proxy, {**fits, "max_completion_tokens": 4000})
    assert status == 200
    assert fake.calls("/v1/chat/completions") == 2


async def test_no_guard_for_unknown_models_estimated_images_or_embeddings(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    assert (await post(proxy, chat("my-local-model", 20_000)))[0] == 200
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    many_images = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": [image] * 11}],  # 11 x 765 estimated > 8192
    }
    assert (await post(proxy, many_images))[0] == 200
    emb = {"model": "text-embedding-3-small", "input": ["hi " * 9000]}
    assert (await post(proxy, emb, "/v1/embeddings"))[0] == 200


async def test_the_sdk_sees_openais_error(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**chat("gpt-3.5-turbo", 17_000))
    assert caught.value.code == "context_length_exceeded"


async def test_config_overrides_the_catalogue(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[models."gpt-4o"]\ncontext_window = 100\nmax_output_tokens = 50\n'
        '[models."house-model"]\ncontext_window = 60\n'
    )
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    assert (await post(proxy, chat("gpt-4o-2024-08-06", 150)))[0] == 400
    assert (await post(proxy, chat("house-model-v2", 80)))[0] == 400
    assert (await post(proxy, chat("gpt-4o-mini", 150)))[0] == 200  # its own, shipped entry


def test_catalogue_lookup_and_shipped_copy() -> None:
    assert (ROOT / "config" / "models.toml").read_bytes() == (
        ROOT / "proxy" / "data" / "models.toml"
    ).read_bytes()
    cat = Catalogue()
    assert cat.lookup("gpt-4o-2024-08-06") == ModelInfo("gpt-4o", 128000, 16384)
    assert cat.lookup("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"  # type: ignore[union-attr]
    assert cat.lookup("gpt-4-turbo-2024-04-09").name == "gpt-4-turbo"  # type: ignore[union-attr]
    assert cat.lookup("gpt-4-0613").name == "gpt-4"  # type: ignore[union-attr]
    for name in ("gpt-4.1", "o3", "o4-mini", "gpt-5", "gpt-5-mini", "text-embedding-3-small"):
        assert cat.lookup(name) is not None, name
    assert cat.lookup("llama-3") is None
    assert cat.lookup(None) is None
    override = Catalogue((ModelInfo("gpt-4o", 1000, 10),))
    assert override.lookup("gpt-4o-2024-08-06") == ModelInfo("gpt-4o", 1000, 10)


def test_bad_model_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    for text, message in [
        ('[models."x"]\nmax_output_tokens = 5\n', "context_window is required"),
        ('[models."x"]\ncontext_window = "big"\n', "is not a valid int"),
        ('[models."x"]\ncontext_window = 10\nspeed = 1\n', "unknown setting speed"),
        ('[models."x"]\ncontext_window = 0\n', "models.x.context_window: must be at least 1"),
        ('[models."x"]\ncontext_window = 9\nmax_output_tokens = -1\n', "must not be negative"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(env={}, config_file=str(cfg))
        assert message in str(caught.value)


# -- per-key budgets -----------------------------------------------------------------------------

FP = fingerprint(API_KEY)
SCOPE = scope_of(API_KEY)
NO_RETRY = {**AUTH, "x-thriftgate-max-retries": "0"}


def reservation(body: dict[str, Any]) -> int:
    return tokens.count_request("/v1/chat/completions", body).tokens + body["max_tokens"]


def spent(proxy: Proxy, unit: str = "tokens", period: str = "day", key: str = SCOPE) -> int:
    stage = part(proxy.app, BudgetStage)
    label, _ = period_of(stage.clock(), period)
    counters = stage.counters
    assert isinstance(counters, MemoryCounters)
    return counters.value(f"thriftgate:budget:{{{key}}}:{unit}:{label}")


async def test_budget_spent_gives_openais_429_and_no_upstream_call(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    body = chat("gpt-4o", 20, max_tokens=50)
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": str(2 * reservation(body) + 10)})
    assert (await post(proxy, body))[0] == 200
    used = spent(proxy)
    assert used == (await proxy.usage.wait(1))[-1]["total_tokens"]  # settled to the actual usage
    assert (await post(proxy, body))[0] == 200
    status, headers, payload = await post(proxy, body)
    assert status == 429
    assert headers["x-should-retry"] == "false"
    error = payload["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota",
        "insufficient_quota",
        None,
    )
    assert "tokens budget per day" in error["message"] and "resets at" in error["message"]
    # what is left cannot cover the estimate, though the budget is not all used: it says so
    assert "cannot cover this request" in error["message"] and " left;" in error["message"]
    assert fake.calls("/v1/chat/completions") == 2
    record = (await proxy.usage.wait(3))[-1]
    assert (record["status"], record["error"]) == (429, "insufficient_quota")
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        metrics = await r.text()
    assert 'thriftgate_budget_rejections_total{period="day",unit="tokens"} 1.0' in metrics


async def test_the_sdk_does_not_retry_a_spent_budget(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "5"})
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**chat("gpt-4o", 20))
    assert caught.value.code == "insufficient_quota"
    assert len(proxy.usage.records()) == 1  # one attempt: x-should-retry: false was honoured
    assert fake.calls() == 0


async def test_budget_resets_at_the_utc_day_and_month(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    body = chat("gpt-4o", 20, max_tokens=50)
    per_request = reservation(body)
    limit = str(per_request + 10)
    now = [calendar.timegm((2026, 11, 30, 23, 59, 0))]
    proxy = await make_proxy(
        env={"THRIFTGATE_TOKENS_PER_DAY": limit, "THRIFTGATE_TOKENS_PER_MONTH": limit},
        wall_clock=lambda: now[0],
    )
    assert (await post(proxy, body))[0] == 200
    status, _, payload = await post(proxy, body)
    assert status == 429 and "budget per day" in payload["error"]["message"]
    assert "resets at 2026-12-01T00:00:00Z" in payload["error"]["message"]
    now[0] += 120  # 2026-12-01 00:01 UTC: a new day and a new month
    assert (await post(proxy, body))[0] == 200
    now[0] = calendar.timegm((2026, 12, 2, 0, 0, 1))  # a new day; the month's budget is spent
    status, _, payload = await post(proxy, body)
    assert status == 429 and "budget per month" in payload["error"]["message"]
    assert "resets at 2027-01-01T00:00:00Z" in payload["error"]["message"]
    assert fake.calls() == 2


async def test_fifty_concurrent_requests_cannot_overshoot(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    body = chat("gpt-4o", 20, max_tokens=50)
    per_request = reservation(body)
    limit = 10 * per_request + per_request // 2
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": str(limit)})
    fake.hold = asyncio.Event()  # every admitted request stays in flight until released
    tasks = [asyncio.create_task(post(proxy, body, headers=NO_RETRY)) for _ in range(50)]
    try:
        async with asyncio.timeout(10):
            while sum(t.done() for t in tasks) < 40:
                await asyncio.wait(
                    [t for t in tasks if not t.done()], return_when="FIRST_COMPLETED"
                )
        await asyncio.wait_for(fake.held.wait(), 5)  # 40 refused, the others all in flight
    finally:
        fake.hold.set()
    results = await asyncio.gather(*tasks)
    assert sorted(status for status, _, _ in results) == [200] * 10 + [429] * 40
    assert fake.calls() == 10
    records = await proxy.usage.wait(50)
    actual = sum(r["total_tokens"] for r in records if r["status"] == 200)
    assert actual <= limit
    assert spent(proxy) == actual  # every reservation settled to what the upstream reported


async def test_failed_calls_give_the_reservation_back(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    fake.fail_next(Fault(status=500))
    assert (await post(proxy, chat("gpt-4o", 20), headers=NO_RETRY))[0] == 500
    await proxy.usage.wait(1)
    assert spent(proxy) == 0


async def test_usd_budget_and_per_key_overrides(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    other = "sk-other-key-000000000"
    cfg = tmp_path / "keys.toml"
    cfg.write_text(
        "[budget]\nusd_per_day = 1000.0\n"
        f'[keys."ci-bot"]\nfingerprint = "{FP}"\nusd_per_day = 0.0001\n'
    )
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    body = chat("gpt-4o", 20)  # reserves 1024 output tokens: $0.01 at gpt-4o's price
    status, _, payload = await post(proxy, body)
    assert status == 429
    assert "usd budget per day of key 'ci-bot'" in payload["error"]["message"]
    assert "$0.00 of $0.00 used" not in payload["error"]["message"]
    status, _, _ = await post(proxy, body, headers={**AUTH, "Authorization": f"Bearer {other}"})
    assert status == 200
    records = await proxy.usage.wait(2)
    assert records[0]["key_alias"] == "ci-bot" and records[1]["key_alias"] is None
    assert spent(proxy, "usd", key=scope_of(other)) == round(records[1]["cost_usd"] * 1e9)
    assert API_KEY not in proxy.usage.getvalue().decode()


async def test_two_instances_share_a_budget_through_redis(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    body = chat("gpt-4o", 20, max_tokens=50)
    env = {"REDIS_URL": redis_url, "THRIFTGATE_TOKENS_PER_DAY": str(3 * reservation(body))}
    a, b = await make_proxy(env=env), await make_proxy(env=env)
    admitted = 0
    for turn in range(20):  # alternate between the instances until the budget is spent
        proxy = (a, b)[turn % 2]
        status = (await post(proxy, body))[0]
        await proxy.usage.wait(turn // 2 + 1)
        await part(proxy.app, BudgetStage).counters.drain()  # the settlement has reached Redis
        if status == 429:
            break
        admitted += 1
    assert admitted >= 3
    other = (a, b)[(turn + 1) % 2]
    assert (await post(other, body))[0] == 429  # the other instance sees the same spent budget
    label, _ = period_of(time.time(), "day")
    client = redis.Redis.from_url(redis_url)
    try:
        stored = int(await client.get(f"thriftgate:budget:{{{SCOPE}}}:tokens:{label}"))
        ttl = await client.pttl(f"thriftgate:budget:{{{SCOPE}}}:tokens:{label}")
    finally:
        await client.aclose()
    assert 0 < ttl <= 2 * 86400 * 1000
    records = [*a.usage.records(), *b.usage.records()]
    assert stored == sum(r["total_tokens"] for r in records if r["status"] == 200)


async def test_redis_gone_means_local_accounting(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str, redis_server: RedisServer
) -> None:
    body = chat("gpt-4o", 20, max_tokens=50)
    env = {"REDIS_URL": redis_url, "THRIFTGATE_TOKENS_PER_DAY": str(2 * reservation(body))}
    proxy = await make_proxy(env=env)
    assert (await post(proxy, body))[0] == 200
    redis_server.kill()
    assert (await post(proxy, body))[0] == 200  # served, and counted in memory
    assert (await post(proxy, body))[0] == 200
    assert (await post(proxy, body))[0] == 429  # the local count enforces the budget too
    counters = part(proxy.app, BudgetStage).counters
    assert isinstance(counters, RedisCounters)
    label, _ = period_of(time.time(), "day")
    assert counters.local.value(f"thriftgate:budget:{{{SCOPE}}}:tokens:{label}") > 0
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
        assert (await r.json())["redis"]["status"] == "degraded"


async def test_the_stage_alone_settles_to_the_answers_usage_by_its_clock(
    stage_app: Any,
) -> None:
    """Admission and budget stages on their own, around a stub handler that always reports 12
    tokens: each call is settled to them, and the day's budget resets by the injected clock."""
    settings = load_settings({}, env={"THRIFTGATE_TOKENS_PER_DAY": "30"})
    now = [calendar.timegm((2026, 11, 30, 23, 0, 0))]
    keys, prices = Keys(settings), PriceTable(settings.prices)
    budget = BudgetStage(keys, prices, settings.budget, Metrics(), clock=lambda: now[0])
    app = await stage_app(settings, AdmissionStage(Catalogue(settings.models)), budget)
    small = chat("gpt-4o-mini", 1, max_tokens=2)  # reserves about 10, settled to 12
    assert [(await app.post(small)).status for _ in range(3)] == [200, 200, 429]
    assert len(app.calls) == 2
    now[0] += 3600  # the next UTC day
    assert (await app.post(small)).status == 200
