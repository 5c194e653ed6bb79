"""Rate limiting: token buckets per key and model, reject and queue modes, Redis, adaptive holds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as redis
from conftest import API_KEY, NO_STORE, MakeProxy, RedisServer, scope_of
from conftest import post as post_to
from fake_openai import FakeOpenAI

from proxy import tokens
from proxy.app import part
from proxy.config import load_settings
from proxy.keys import Keys, fingerprint
from proxy.metrics import Metrics
from proxy.ratelimit import (
    Bucket,
    MemoryBuckets,
    RateLimitStage,
    RedisBuckets,
    format_duration,
    parse_duration,
)

FP = fingerprint(API_KEY)
SCOPE = scope_of(API_KEY)


post = partial(post_to, headers={**NO_STORE, "x-thriftgate-max-retries": "0"})


def chat(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool], within: float = 5) -> None:
    """Wait for a condition the test cannot be told about directly (polled, bounded)."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - nothing to wait on: the state is the proxy's
            await asyncio.sleep(0.002)


def test_durations_in_openais_format() -> None:
    assert format_duration(0) == "0s"
    assert format_duration(0.02) == "20ms"
    assert format_duration(1) == "1s"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(360) == "6m0s"
    assert format_duration(66.144) == "1m6.144s"
    assert format_duration(3723) == "1h2m3s"
    for text, seconds in [("6m0s", 360), ("20ms", 0.02), ("1s", 1), ("1m6.144s", 66.144)]:
        assert parse_duration(text) == pytest.approx(seconds)
    assert parse_duration("2") == 2.0
    assert parse_duration("1h30m") == 5400
    assert parse_duration("soon") is None and parse_duration(None) is None


def test_memory_bucket_arithmetic() -> None:
    clock = Clock()
    buckets = MemoryBuckets(clock)
    b = Bucket("b", "key", "requests", 10, 1.0, 4)
    assert buckets.take_now([b]).levels == (6,)
    assert buckets.take_now([b]).levels == (2,)
    refused = buckets.take_now([b])
    assert not refused.ok and refused.wait_s == pytest.approx(2.0)
    clock.now += 2
    assert buckets.take_now([b]).ok
    clock.now += 1000
    assert buckets.level(b, clock.now) == 10  # never above capacity
    other = Bucket("c", "key", "tokens", 5, 1.0, 1)
    big = Bucket("b", "key", "requests", 10, 1.0, 11)
    assert not buckets.take_now([other, big]).ok
    assert buckets.level(other, clock.now) == 5  # all or nothing: c was not charged


async def test_rpm_60_lets_exactly_60_of_61_through(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "60"}, clock=clock)
    results = await asyncio.gather(*(post(proxy, chat(f"m{i}")) for i in range(61)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 60 + [429]
    assert fake.calls() == 60
    _status, headers, payload = next(r for r in results if r[0] == 429)
    error = payload["error"]
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert "Limit 60, Remaining 0, Requested 1" in error["message"]
    assert "this API key may use 60 requests a minute" in error["message"]
    assert headers["retry-after"] == "1" and headers["retry-after-ms"] == "1000"
    assert headers["x-ratelimit-limit-requests"] == "60"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-should-retry" not in headers  # worth retrying, unlike a spent budget
    clock.now += 1.0  # one request's worth refilled
    assert (await post(proxy, chat()))[0] == 200
    assert (await post(proxy, chat()))[0] == 429
    clock.now += 30.0
    statuses = [(await post(proxy, chat(f"r{i}")))[0] for i in range(31)]
    assert statuses == [200] * 30 + [429]


async def test_the_sdk_retries_after_the_proxys_retry_after(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    import openai

    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "1"}, clock=clock)
    async with openai.AsyncOpenAI(
        base_url=proxy.base_url, api_key=API_KEY, max_retries=0
    ) as client:
        await client.chat.completions.create(**chat())
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(**chat("again"))
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after-ms"] == "60000"


async def test_tpm_charged_by_estimate_and_settled_by_usage(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_TPM": "5000"}, clock=clock)
    stage = part(proxy.app, RateLimitStage)
    body = chat("count me", max_tokens=100)
    estimate = tokens.count_request("/v1/chat/completions", body).tokens + 100
    bucket = Bucket(f"thriftgate:rl:{{key:{SCOPE}}}:tokens", "key", "tokens", 5000, 5000 / 60, 0)
    buckets = stage.buckets
    assert isinstance(buckets, MemoryBuckets)
    status, _, answer = await post(proxy, body)
    assert status == 200
    await proxy.usage.wait(1)  # delivered, so settled
    assert buckets.level(bucket, clock.now) == 5000 - answer["usage"]["total_tokens"]
    assert answer["usage"]["total_tokens"] < estimate
    # a request without an output limit is charged the default output allowance
    fake.hold = asyncio.Event()
    task = asyncio.create_task(post(proxy, chat("no limit")))
    await asyncio.wait_for(fake.held.wait(), 5)
    before = 5000 - answer["usage"]["total_tokens"]
    expected = tokens.count_request("/v1/chat/completions", chat("no limit")).tokens + 1024
    assert buckets.level(bucket, clock.now) == before - expected
    fake.hold.set()
    await task


async def test_a_request_larger_than_the_bucket_is_refused_at_once(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TPM": "500", "THRIFTGATE_RATE_LIMIT_MODE": "queue"})
    status, headers, payload = await post(proxy, chat(max_tokens=600))
    assert status == 429
    assert headers["x-should-retry"] == "false"
    assert payload["error"]["message"].startswith("Request too large for gpt-4o on this API key")
    assert fake.calls() == 0
    assert part(proxy.app, RateLimitStage).queues == {}


async def test_expose_headers_on_success(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = tmp_path / "rl.toml"
    cfg.write_text("[ratelimit]\nrpm = 100\nrpm_burst = 10\ntpm = 6000\nexpose_headers = true\n")
    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)}, clock=clock)
    status, headers, _answer = await post(proxy, chat(max_tokens=10))
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "10"  # the burst is the capacity
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-reset-requests"] == "600ms"  # 1 request at 100/min
    assert headers["x-ratelimit-limit-tokens"] == "6000"
    estimate = tokens.count_request("/v1/chat/completions", chat(max_tokens=10)).tokens + 10
    assert headers["x-ratelimit-remaining-tokens"] == str(6000 - estimate)
    assert headers["x-ratelimit-reset-tokens"] == format_duration(estimate / 100)
    plain = await make_proxy(env={"THRIFTGATE_RPM": "100"})
    _, headers, _ = await post(plain, chat())
    assert headers["x-ratelimit-limit-requests"] == "10000"  # the upstream's own, untouched


async def test_queue_mode_serves_in_order(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    gate = asyncio.Event()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:  # the queue's waits: on the test's clock
        slept.append(seconds)
        await gate.wait()
        clock.now += seconds

    cfg = tmp_path / "q.toml"
    cfg.write_text('[ratelimit]\nrpm = 60\nrpm_burst = 1\nmode = "queue"\n')
    clock = Clock()
    proxy = await make_proxy(
        env={"THRIFTGATE_CONFIG": str(cfg)}, ratelimit_sleep=sleep, clock=clock
    )
    stage = part(proxy.app, RateLimitStage)
    assert (await post(proxy, chat("first")))[0] == 200
    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(post(proxy, chat(f"queued {i}"))))
        await until(lambda n=i + 1: len(stage.queues.get(SCOPE, ())) == n)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert [status for status, _, _ in results] == [200] * 4
    sent = [orjson.loads(r.body)["messages"][0]["content"] for r in fake.requests]
    assert sent == ["first", "queued 0", "queued 1", "queued 2", "queued 3"]
    records = await proxy.usage.wait(5)
    waited = [r["rate_limited_ms"] for r in records[1:]]
    assert waited == sorted(waited) and waited[0] >= 1000
    assert stage.queues == {}


async def test_queue_gives_up_after_max_wait(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    async def sleep(seconds: float) -> None:
        clock.now += seconds

    clock = Clock()
    proxy = await make_proxy(
        env={
            "THRIFTGATE_RPM": "1",
            "THRIFTGATE_RATE_LIMIT_MODE": "queue",
            "THRIFTGATE_RATE_LIMIT_MAX_WAIT_S": "10",
        },
        ratelimit_sleep=sleep,
        clock=clock,
    )
    assert (await post(proxy, chat()))[0] == 200
    status, headers, _ = await post(proxy, chat("waits"))
    assert status == 429 and headers["retry-after"] == "60"
    assert fake.calls() == 1
    record = (await proxy.usage.wait(2))[-1]
    assert record["error"] == "rate_limit_exceeded"


async def test_a_waiter_that_disconnects_leaves_and_is_not_charged(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    never = asyncio.Event()
    sleeping = asyncio.Event()

    async def sleep(seconds: float) -> None:
        sleeping.set()
        await never.wait()

    clock = Clock()
    proxy = await make_proxy(
        env={
            "THRIFTGATE_RPM": "1",
            "THRIFTGATE_RATE_LIMIT_MODE": "queue",
            "THRIFTGATE_RATE_LIMIT_MAX_WAIT_S": "120",
        },
        ratelimit_sleep=sleep,
        clock=clock,
    )
    stage = part(proxy.app, RateLimitStage)
    assert (await post(proxy, chat()))[0] == 200
    task = asyncio.create_task(post(proxy, chat("impatient")))
    await asyncio.wait_for(sleeping.wait(), 5)
    task.cancel()  # the client goes away while it waits
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: not stage.queues)
    records = await proxy.usage.wait(2)
    assert (records[-1]["status"], records[-1]["error"]) == (499, "client_disconnected")
    bucket = Bucket(f"thriftgate:rl:{{key:{SCOPE}}}:requests", "key", "requests", 1, 1 / 60, 1)
    clock.now += 60
    buckets = stage.buckets
    assert isinstance(buckets, MemoryBuckets)
    assert buckets.level(bucket, clock.now) == 1  # one minute refilled exactly one: no charge
    assert (await post(proxy, chat("later")))[0] == 200
    assert fake.calls() == 2


async def test_model_limits_are_shared_by_every_key(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[model_limits."gpt-4o*"]\nrpm = 2\n')
    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)}, clock=clock)
    assert (await post(proxy, chat(), key="sk-a-1"))[0] == 200
    assert (await post(proxy, chat(), key="sk-b-2"))[0] == 200
    status, _, payload = await post(proxy, chat(), key="sk-c-3")
    assert status == 429 and "on this model" in payload["error"]["message"]
    other = {**chat(), "model": "gpt-4.1"}
    assert (await post(proxy, other, key="sk-c-3"))[0] == 200  # another model, no global bucket


async def test_per_key_override(make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(f'[ratelimit]\nrpm = 100\n[keys."slow"]\nfingerprint = "{FP}"\nrpm = 1\n')
    clock = Clock()
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)}, clock=clock)
    assert (await post(proxy, chat()))[0] == 200
    assert (await post(proxy, chat()))[0] == 429
    assert (await post(proxy, chat(), key="sk-someone-else"))[0] == 200


async def test_two_instances_on_one_redis_enforce_one_limit(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    # a generous Redis timeout: on a loaded machine a slow call would fall back to local buckets
    # (by design), and this test is about exactness
    env = {"REDIS_URL": redis_url, "THRIFTGATE_RPM": "10", "THRIFTGATE_REDIS_TIMEOUT_S": "2"}
    a, b = await make_proxy(env=env), await make_proxy(env=env)
    results = await asyncio.gather(*(post((a, b)[i % 2], chat(f"m{i}")) for i in range(16)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 10 + [429] * 6
    assert fake.calls() == 10


async def test_redis_killed_means_local_buckets_and_no_failures(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str, redis_server: RedisServer
) -> None:
    proxy = await make_proxy(env={"REDIS_URL": redis_url, "THRIFTGATE_RPM": "1000"})
    assert (await post(proxy, chat()))[0] == 200
    redis_server.kill()
    statuses = [(await post(proxy, chat(f"m{i}")))[0] for i in range(5)]
    assert statuses == [200] * 5
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/readyz") as r:
            assert (await r.json())["redis"]["status"] == "degraded"
        async with s.get(proxy.url + "/metrics") as r:
            metrics = await r.text()
    assert 'thriftgate_redis_errors_total{operation="ratelimit"}' in metrics
    assert "thriftgate_redis_up 0.0" in metrics


async def test_adaptive_hold_queues_when_the_upstream_is_nearly_spent(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    async def sleep(seconds: float) -> None:
        clock.now += seconds

    clock = Clock()
    proxy = await make_proxy(
        env={"THRIFTGATE_RATE_LIMIT_MODE": "queue"}, ratelimit_sleep=sleep, clock=clock
    )
    fake.limit_headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "2.5s",
    }
    assert (await post(proxy, chat()))[0] == 200
    fake.limit_headers = {}
    started = clock.now
    assert (await post(proxy, chat("held")))[0] == 200
    assert clock.now - started >= 2.5  # waited for the upstream's reset, at the proxy
    record = (await proxy.usage.wait(2))[-1]
    assert record["rate_limited_ms"] >= 2500
    assert (await post(proxy, chat("free")))[0] == 200  # the hold is over
    assert clock.now - started < 4


async def test_redis_settlements_ride_on_the_next_take(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str, tmp_path: Path
) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text("[ratelimit]\ntpm = 60\ntpm_burst = 100000\n")  # refills 1 token a second
    proxy = await make_proxy(env={"REDIS_URL": redis_url, "THRIFTGATE_CONFIG": str(cfg)})
    buckets = part(proxy.app, RateLimitStage).buckets
    assert isinstance(buckets, RedisBuckets)
    calls = 0
    script = buckets.script

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await script(*args, **kwargs)

    buckets.script = counted  # type: ignore[assignment]
    actual = []
    for i in range(3):
        status, _, answer = await post(proxy, chat(f"settle {i}", max_tokens=100))
        assert status == 200
        await proxy.usage.wait(i + 1)  # delivered: its settlement is pending
        actual.append(answer["usage"]["total_tokens"])
    assert calls == 3  # one script call per request: settlements rode along
    assert buckets.pending  # the last one is still waiting
    await buckets.drain()
    assert calls == 4 and not buckets.pending
    client = redis.Redis.from_url(redis_url)
    try:
        level = float(await client.hget(f"thriftgate:rl:{{key:{SCOPE}}}:tokens", "l"))
    finally:
        await client.aclose()
    assert level == pytest.approx(100000 - sum(actual), abs=5)  # (+ a few seconds of refill)


async def test_an_adaptive_hold_is_shared_by_the_fleet(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    """Replica A learns from the upstream that its limit is nearly spent; replica B, which saw
    nothing, holds its next request for that model too (the hold's time left is in Redis)."""

    async def sleep_a(seconds: float) -> None:
        clock_a.now += seconds

    async def sleep_b(seconds: float) -> None:
        clock_b.now += seconds

    env = {"REDIS_URL": redis_url, "THRIFTGATE_RATE_LIMIT_MODE": "queue"}
    clock_a, clock_b = Clock(), Clock()
    a = await make_proxy(env=env, ratelimit_sleep=sleep_a, clock=clock_a)
    b = await make_proxy(env=env, ratelimit_sleep=sleep_b, clock=clock_b)
    fake.limit_headers = {
        "x-ratelimit-limit-requests": "500",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-reset-requests": "20s",
    }
    assert (await post(a, chat("seen by A")))[0] == 200
    fake.limit_headers = {}
    client = redis.Redis.from_url(redis_url)
    try:
        await until_async(lambda: client.keys("thriftgate:rl:{hold:*"))
    finally:
        await client.aclose()
    started = clock_b.now
    assert (await post(b, chat("sent to B")))[0] == 200
    assert clock_b.now - started >= 15  # B waited for the upstream's reset, like A would
    record = (await b.usage.wait(1))[-1]
    assert record["rate_limited_ms"] >= 15_000


async def until_async(probe: Callable[[], Any], within: float = 5) -> None:
    """Poll another process's state (Redis) until ``probe`` returns something truthy."""
    async with asyncio.timeout(within):
        while not await probe():  # noqa: ASYNC110 - Redis is another process: poll it
            await asyncio.sleep(0.01)


async def test_the_stage_alone_refills_by_its_injected_clock(stage_app: Any) -> None:
    """The rate-limit stage on its own, around a stub handler: its clock, not the wall, decides
    when the bucket has room again."""
    settings = load_settings({}, env={"THRIFTGATE_RPM": "2"})
    clock = Clock()
    limiter = RateLimitStage(
        settings.ratelimit, Keys(settings), settings.model_limits, Metrics(), clock=clock
    )
    app = await stage_app(settings, limiter)
    assert [(await app.post(chat(f"m{i}"))).status for i in range(3)] == [200, 200, 429]
    assert len(app.calls) == 2  # the refused request never reached the handler
    clock.now += 29  # one request comes back every 30 s
    assert (await app.post(chat("early"))).status == 429
    clock.now += 1
    assert (await app.post(chat("on time"))).status == 200
    assert len(app.calls) == 3
