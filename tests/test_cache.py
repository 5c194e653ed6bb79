"""The response cache: exact-match hits without an upstream call, and never a wrong answer."""

from __future__ import annotations

import asyncio
import gzip
import time
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from conftest import API_KEY, AUTH, LogSink, MakeProxy, Proxy, RedisServer, post
from fake_openai import FakeOpenAI, Fault

from proxy.cache import CACHE_HEADER, CacheStage, Entry, MemoryBackend, RedisBackend, cache_key
from proxy.config import load_settings
from proxy.metrics import Metrics
from proxy.store import REDIS

BARE = ("Accept-Encoding", "User-Agent", "Accept")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "cache me"}]}
NO_RETRY = {"x-thriftgate-max-retries": "0"}


async def coalesced(proxy: Proxy, n: int) -> None:
    """Wait until n requests wait for an identical one in flight (the metric says so)."""
    async with asyncio.timeout(5):
        while metric(proxy, "thriftgate_cache_events_total", event="coalesced") < n:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def stored(proxy: Proxy, answered: int) -> None:
    """Wait until ``answered`` requests were fully delivered and their cache stores are done."""
    await proxy.usage.wait(answered)  # written after the cache's own end-of-answer callback
    await stage_of(proxy).drain()


def stage_of(proxy: Proxy) -> CacheStage:
    return next(m for m in proxy.app.middlewares if isinstance(m, CacheStage))


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    value = stage_of(proxy).metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_second_identical_request_is_a_hit(proxy: Proxy, fake: FakeOpenAI) -> None:
    status1, headers1, body1 = await post(proxy, CHAT)
    status2, headers2, body2 = await post(proxy, CHAT)
    assert (status1, status2) == (200, 200)
    assert headers1["x-thriftgate-cache"] == "MISS"
    assert headers2["x-thriftgate-cache"] == "HIT"
    assert int(headers2["age"]) >= 0
    assert body2 == body1  # the same answer, byte for byte (the fake gives every answer a new id)
    assert headers2["x-request-id"] == headers1["x-request-id"]
    assert headers2["Content-Type"] == headers1["Content-Type"]
    assert "x-ratelimit-remaining-tokens" not in headers2  # stale limits are not replayed
    assert fake.calls("/v1/chat/completions") == 1
    miss, hit = await proxy.usage.wait(2)
    assert (miss["cache"], hit["cache"]) == ("miss", "hit")
    assert hit["total_tokens"] == miss["total_tokens"] == body1["usage"]["total_tokens"]
    assert hit["upstream_request_id"] == miss["upstream_request_id"] == headers1["x-request-id"]
    assert hit["request_hash"] == miss["request_hash"] is not None
    assert metric(proxy, "thriftgate_cache_events_total", event="hit") == 1


async def test_key_order_and_whitespace_do_not_matter_values_do(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    a = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"order"}],"temperature":0}'
    b = (
        b'{ "temperature": 0,\n "messages": [ {"content": "order", "role": "user"} ],\n'
        b' "model": "gpt-4o-mini" }'
    )
    c = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"order"}],"temperature":0.5}'
    assert (await post(proxy, a))[1]["x-thriftgate-cache"] == "MISS"
    assert (await post(proxy, b))[1]["x-thriftgate-cache"] == "HIT"
    assert (await post(proxy, c))[1]["x-thriftgate-cache"] == "MISS"
    assert fake.calls("/v1/chat/completions") == 2


async def test_scope_is_the_key_unless_shared(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy()
    await post(proxy, CHAT)
    other = {"Authorization": "Bearer sk-another-tenant"}
    assert (await post(proxy, CHAT, headers=other))[1]["x-thriftgate-cache"] == "MISS"
    project = {"OpenAI-Project": "proj_other"}
    assert (await post(proxy, CHAT, headers=project))[1]["x-thriftgate-cache"] == "MISS"
    assert fake.calls("/v1/chat/completions") == 3

    shared = await make_proxy(env={"THRIFTGATE_CACHE_SCOPE": "shared"})
    await post(shared, CHAT)
    assert (await post(shared, CHAT, headers=other))[1]["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 4


async def test_cached_stream_replays_identically_to_the_sdk(proxy: Proxy, fake: FakeOpenAI) -> None:
    async def run() -> tuple[str, Any, list[str | None], str]:
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "stream me twice"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage, reasons = "", None, []
            async for chunk in raw.parse():
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reasons.append(chunk.choices[0].finish_reason)
                if chunk.usage is not None:
                    usage = chunk.usage
            return text, usage, reasons, raw.headers["x-thriftgate-cache"]

    first = await run()
    second = await run()
    assert first[3] == "MISS" and second[3] == "HIT"
    assert second[:3] == first[:3]
    assert first[0] == "You said: stream me twice"
    assert first[2][-1] == "stop"
    assert fake.calls("/v1/chat/completions") == 1
    hit = (await proxy.usage.wait(2))[-1]
    assert hit["cache"] == "hit" and hit["stream"] is True
    assert hit["total_tokens"] == first[1].total_tokens


@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(status=429), Fault(status=400), Fault(reset=True)],
    ids=["500", "429", "400", "reset"],
)
async def test_failed_answers_are_not_stored(proxy: Proxy, fake: FakeOpenAI, fault: Fault) -> None:
    fake.fail_next(fault)
    status, headers, _ = await post(proxy, CHAT, headers=NO_RETRY)
    assert status >= 400
    status, headers, _ = await post(proxy, CHAT)
    assert status == 200 and headers["x-thriftgate-cache"] == "MISS"
    assert (await post(proxy, CHAT))[1]["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 2


async def test_cut_stream_is_not_stored(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = {**CHAT, "stream": True}
    fake.fail_next(Fault(cut_after=2))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.headers["x-thriftgate-cache"] == "MISS"
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
        async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            assert r.headers["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 2


async def test_ttl_expiry_in_memory(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    now = [1_000_000.0]
    proxy = await make_proxy(wall_clock=lambda: now[0])
    assert isinstance(stage_of(proxy).backend, MemoryBackend)
    await post(proxy, CHAT)
    now[0] += 3599
    assert (await post(proxy, CHAT))[1]["x-thriftgate-cache"] == "HIT"
    now[0] += 2  # past the default 3600 s
    assert (await post(proxy, CHAT))[1]["x-thriftgate-cache"] == "MISS"
    # a per-request TTL
    await post(proxy, {**CHAT, "n": 1}, headers={"x-thriftgate-cache-ttl": "10"})
    now[0] += 9
    assert (await post(proxy, {**CHAT, "n": 1}))[1]["x-thriftgate-cache"] == "HIT"
    now[0] += 2
    assert (await post(proxy, {**CHAT, "n": 1}))[1]["x-thriftgate-cache"] == "MISS"
    assert all("x-thriftgate-cache-ttl" not in r.headers for r in fake.requests)


async def test_cache_control_no_cache_and_no_store(proxy: Proxy, fake: FakeOpenAI) -> None:
    _, h, _ = await post(proxy, CHAT, headers={"Cache-Control": "no-store"})
    assert h["x-thriftgate-cache"] == "BYPASS"
    _, h, _ = await post(proxy, CHAT)
    assert h["x-thriftgate-cache"] == "MISS"  # no-store wrote nothing
    _, h, fresh = await post(proxy, CHAT, headers={"Cache-Control": "no-cache"})
    assert h["x-thriftgate-cache"] == "MISS"  # skipped the lookup...
    _, h, again = await post(proxy, CHAT)
    assert h["x-thriftgate-cache"] == "HIT"
    assert again == fresh  # ...and stored the fresh answer
    assert fake.calls("/v1/chat/completions") == 3
    assert [r["cache"] for r in await proxy.usage.wait(4)] == ["bypass", "miss", "miss", "hit"]


@pytest.mark.parametrize("ttl", ["soon", "-1", "nan", "inf"])
async def test_bad_ttl_header_is_a_clear_400(proxy: Proxy, fake: FakeOpenAI, ttl: str) -> None:
    status, _, body = await post(proxy, CHAT, headers={"x-thriftgate-cache-ttl": ttl})
    assert status == 400
    error = body["error"]
    assert error["code"] == "invalid_cache_ttl"
    assert error["param"] == "x-thriftgate-cache-ttl"
    assert fake.requests == []


async def test_ttl_zero_means_do_not_store(proxy: Proxy, fake: FakeOpenAI) -> None:
    await post(proxy, CHAT, headers={"x-thriftgate-cache-ttl": "0"})
    assert (await post(proxy, CHAT))[1]["x-thriftgate-cache"] == "MISS"


async def test_twenty_concurrent_identical_requests_make_one_upstream_call(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.hold = asyncio.Event()  # the upstream answers only when told
    tasks = [asyncio.create_task(post(proxy, CHAT)) for _ in range(20)]
    try:
        await asyncio.wait_for(fake.held.wait(), 5)  # the first is at the upstream...
        await coalesced(proxy, 19)  # ...and 19 wait for it
        assert fake.calls("/v1/chat/completions") == 1
    finally:
        fake.hold.set()
    results = await asyncio.gather(*tasks)
    assert {status for status, _, _ in results} == {200}
    assert len({answer.raw for answer in results}) == 1
    assert sorted(h["x-thriftgate-cache"] for _, h, _ in results) == ["HIT"] * 19 + ["MISS"]
    assert fake.calls("/v1/chat/completions") == 1


async def test_followers_go_on_their_own_when_the_leader_fails(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    fake.hold = asyncio.Event()
    fake.fail_next(Fault(status=500))  # the leader's upstream call fails
    tasks = [asyncio.create_task(post(proxy, CHAT, headers=NO_RETRY)) for _ in range(5)]
    try:
        await asyncio.wait_for(fake.held.wait(), 5)
        await coalesced(proxy, 4)
    finally:
        fake.hold.set()
    statuses = sorted(status for status, _, _ in await asyncio.gather(*tasks))
    assert statuses == [200, 200, 200, 200, 500]
    assert fake.calls("/v1/chat/completions") == 5


async def test_memory_bound_is_respected(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_CACHE_MAX_BYTES": "3000"})
    backend = stage_of(proxy).backend
    assert isinstance(backend, MemoryBackend)
    for i in range(10):
        await post(proxy, {**CHAT, "messages": [{"role": "user", "content": f"fill {i}"}]})
        assert backend.bytes <= 3000
    assert 0 < len(backend) < 10
    assert metric(proxy, "thriftgate_cache_events_total", event="eviction") == 10 - len(backend)
    oldest = {**CHAT, "messages": [{"role": "user", "content": "fill 0"}]}
    newest = {**CHAT, "messages": [{"role": "user", "content": "fill 9"}]}
    assert (await post(proxy, newest))[1]["x-thriftgate-cache"] == "HIT"
    assert (await post(proxy, oldest))[1]["x-thriftgate-cache"] == "MISS"


async def test_gzip_answer_is_cached_and_served_to_any_client(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    _, h1, zipped = await post(proxy, CHAT, headers={"Accept-Encoding": "gzip"})
    assert h1["Content-Encoding"] == "gzip"
    plain = await post(proxy, CHAT)
    assert plain.headers["x-thriftgate-cache"] == "HIT"
    assert "Content-Encoding" not in plain.headers
    assert plain.raw == gzip.decompress(zipped)


async def test_embeddings_are_cached_for_the_sdk(proxy: Proxy, fake: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        first = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        second = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert [d.embedding for d in second.data] == [d.embedding for d in first.data]
    assert fake.calls("/v1/embeddings") == 1


async def test_excluded_models_and_temperature_rule_bypass(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(
        env={
            "THRIFTGATE_CACHE_EXCLUDE_MODELS": "gpt-4o-audio*,o3",
            "THRIFTGATE_CACHE_ONLY_TEMPERATURE_ZERO": "true",
        }
    )
    audio = {**CHAT, "model": "gpt-4o-audio-preview", "temperature": 0}
    assert (await post(proxy, audio))[1]["x-thriftgate-cache"] == "BYPASS"
    assert (await post(proxy, CHAT))[1]["x-thriftgate-cache"] == "BYPASS"  # temperature unset
    zero = {**CHAT, "temperature": 0}
    assert (await post(proxy, zero))[1]["x-thriftgate-cache"] == "MISS"
    assert (await post(proxy, zero))[1]["x-thriftgate-cache"] == "HIT"
    emb = {"model": "text-embedding-3-small", "input": "no temperature here"}
    await post(proxy, emb, path="/v1/embeddings")
    assert (await post(proxy, emb, path="/v1/embeddings"))[1]["x-thriftgate-cache"] == "HIT"


async def test_disabled_cache_adds_nothing(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_CACHE": "false"})
    for _ in range(2):
        _, headers, _ = await post(proxy, CHAT)
        assert "x-thriftgate-cache" not in headers
    assert fake.calls("/v1/chat/completions") == 2


def test_entry_round_trip_and_compression() -> None:
    small = Entry(200, (("Content-Type", "application/json"),), b'{"a":1}', 1234.5)
    big = Entry(200, (("x-request-id", "req_1"),), b"x" * 5000, 99.0)
    for entry in (small, big):
        data = entry.encode(compress_min=1024)
        assert Entry.decode(data) == entry
    assert len(big.encode(compress_min=1024)) < 200  # compressed
    assert big.encode(compress_min=10**9)[4:5] == b"-"
    with pytest.raises(ValueError):
        Entry.decode(b"garbage")


def test_cache_key_canonical() -> None:
    a = cache_key("/v1/embeddings", {"input": "x", "model": "m"}, "k")
    assert a == cache_key("/v1/embeddings", {"model": "m", "input": "x"}, "k")
    assert a != cache_key("/v1/embeddings", {"model": "m", "input": "x"}, "other")
    assert a != cache_key("/v1/chat/completions", {"model": "m", "input": "x"}, "k")
    assert len(a) == 64


async def test_memory_backend_lru_order() -> None:
    backend = MemoryBackend(max_bytes=300, metrics=Metrics())
    entries = {k: Entry(200, (), k.encode() * 40, 0.0) for k in "abc"}  # ~104 bytes each
    backend.store("a", entries["a"], 60)
    backend.store("b", entries["b"], 60)
    assert await backend.get("a") is not None  # a is now the most recent
    backend.store("c", entries["c"], 60)  # evicts b, the least recently used
    assert await backend.get("b") is None
    assert await backend.get("a") == entries["a"]
    assert await backend.get("c") == entries["c"]


# -- Redis ------------------------------------------------------------------------------------


async def test_two_instances_share_hits_through_redis(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    one = await make_proxy(env={"REDIS_URL": redis_url})
    two = await make_proxy(env={"REDIS_URL": redis_url})
    assert (await post(one, CHAT))[1]["x-thriftgate-cache"] == "MISS"
    await stored(one, 1)  # the store runs after the answer went out
    _, headers, _ = await post(two, CHAT)
    assert headers["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 1
    keys = await _redis_keys(redis_url)
    assert len(keys) == 1 and keys[0].startswith(b"thriftgate:cache:")
    client = aioredis.Redis.from_url(redis_url)
    ttl_ms = await client.pttl(keys[0])
    await client.aclose()
    assert 3_500_000 < ttl_ms <= 3_600_000


async def test_redis_down_then_back(
    make_proxy: MakeProxy,
    fake: FakeOpenAI,
    redis_server: RedisServer,
    redis_url: str,
    app_logs: LogSink,
) -> None:
    now = [0.0]
    proxy = await make_proxy(env={"REDIS_URL": redis_url}, clock=lambda: now[0])
    guard = proxy.app[REDIS]
    assert guard is not None
    warnings_before = _count(app_logs, "redis_unavailable")

    await post(proxy, CHAT)
    await stored(proxy, 1)
    assert await _redis_keys(redis_url)
    redis_server.kill()
    try:
        for i in range(3):  # every request still succeeds, straight from the upstream
            status, headers, _ = await post(proxy, {**CHAT, "n": i + 2})
            assert status == 200 and headers["x-thriftgate-cache"] == "MISS"
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
            assert r.status == 200
            report = await r.json()
        assert report["redis"]["status"] == "degraded"
        assert _count(app_logs, "redis_unavailable") == warnings_before + 1  # one per outage
        assert metric(proxy, "thriftgate_redis_up") == 0
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
            assert "thriftgate_redis_up 0.0" in await r.text()
    finally:
        redis_server.start()
    now[0] += 10  # past retry_after_s: the guard tries Redis again
    fresh = {**CHAT, "messages": [{"role": "user", "content": "after the outage"}]}
    assert (await post(proxy, fresh))[1]["x-thriftgate-cache"] == "MISS"
    await stored(proxy, 5)
    assert len(await _redis_keys(redis_url)) == 1  # written to Redis again
    assert (await post(proxy, fresh))[1]["x-thriftgate-cache"] == "HIT"
    assert guard.up and metric(proxy, "thriftgate_redis_up") == 1
    assert _count(app_logs, "redis_recovered") >= 1


async def test_redis_down_at_start_up_is_not_fatal(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    from conftest import free_port

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    proxy = await make_proxy(env={"REDIS_URL": nowhere, "THRIFTGATE_CACHE_LOCAL_MAX_BYTES": "0"})
    for _ in range(2):
        status, headers, _ = await post(proxy, CHAT)
        assert status == 200 and headers["x-thriftgate-cache"] == "MISS"
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
        assert (await r.json())["redis"]["status"] == "degraded"
    # with the in-process copy (the default), hot answers keep being served without Redis
    local = await make_proxy(env={"REDIS_URL": nowhere})
    assert (await post(local, CHAT))[1]["x-thriftgate-cache"] == "MISS"
    assert (await post(local, CHAT))[1]["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 3


async def test_local_copy_in_front_of_redis_keeps_the_entry_expiry(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    now: list[float | None] = [None]  # the real time until the test moves it
    one = await make_proxy(env={"REDIS_URL": redis_url})
    two = await make_proxy(env={"REDIS_URL": redis_url}, wall_clock=lambda: now[0] or time.time())
    await post(one, CHAT, headers={"x-thriftgate-cache-ttl": "100"})
    await stored(one, 1)
    assert (await post(two, CHAT))[1]["x-thriftgate-cache"] == "HIT"  # from Redis...
    backend = stage_of(two).backend
    assert isinstance(backend, RedisBackend) and backend.local is not None
    (key,) = backend.local.keys()
    entry = await backend.local.get(key)  # ...now kept locally
    assert entry is not None and entry.expires_at - entry.stored_at == pytest.approx(100)
    three = stage_of(await make_proxy(env={"REDIS_URL": redis_url})).backend
    assert isinstance(three, RedisBackend)
    fetched = await three.get(key)  # from Redis: kept locally as fetched, not made again
    assert fetched == entry and three.peek(key) is fetched
    now[0] = entry.expires_at - 1
    assert (await post(two, CHAT))[1]["x-thriftgate-cache"] == "HIT"
    now[0] += 2  # past the answer's own expiry, the local copy is not served
    assert await backend.local.get(key) is None


async def _redis_keys(url: str) -> list[bytes]:
    client = aioredis.Redis.from_url(url)
    try:
        return [k async for k in client.scan_iter("thriftgate:cache:*")]
    finally:
        await client.aclose()


def _count(logs: LogSink, event: str) -> int:
    return sum(1 for line in logs.lines() if line.get("event") == event)


async def test_the_stage_alone_serves_a_hit_until_its_clock_says_expired(
    stage_app: Any,
) -> None:
    settings = load_settings({}, env={})
    now = [1_000_000.0]
    cache = CacheStage(settings.cache, Metrics(), follower_wait_s=5, clock=lambda: now[0])
    app = await stage_app(settings, cache)
    first = await app.post(CHAT)
    assert first.headers[CACHE_HEADER] == "MISS"
    await app.usage.wait(1)  # delivered: stored
    hit = await app.post(CHAT)
    assert hit.headers[CACHE_HEADER] == "HIT" and hit.raw == first.raw
    assert hit.headers["age"] == "0"
    now[0] += 3599
    assert (await app.post(CHAT)).headers["age"] == "3599"
    now[0] += 2  # past the default TTL
    assert (await app.post(CHAT)).headers[CACHE_HEADER] == "MISS"
    assert len(app.calls) == 2


async def test_memory_entries_are_compact_until_hit_and_their_sizes_add_up() -> None:
    """An answer nobody asks for again is kept as one bytes object; its first hit makes the
    entry the later hits share. Expiry, LRU order and the byte count hold for both forms."""
    now = [1000.0]
    backend = MemoryBackend(max_bytes=700, metrics=Metrics(), clock=lambda: now[0])
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    made = {
        k: Entry(
            200,
            (("Content-Type", "application/json"), ("x-request-id", f"req_{k}")),
            k.encode() * 200,
            999.5,
            usage,
            2000.0,
        )
        for k in "abcd"
    }
    backend.store("a", made["a"], 60)
    backend.store("b", made["b"], 60)
    assert backend.bytes == made["a"].size + made["b"].size
    first = backend.peek("a")
    assert first == made["a"] and first is not made["a"]  # made again from its compact form
    assert backend.peek("a") is first  # the later hits share it
    backend.store("c", made["c"], 60)  # evicts b, the least recently used (still compact)
    assert backend.keys() == ["a", "c"]
    assert backend.bytes == made["a"].size + made["c"].size
    backend.store("d", made["d"], 60)  # evicts a (the entry a hit made)
    assert backend.keys() == ["c", "d"]
    assert backend.bytes == made["c"].size + made["d"].size
    now[0] += 61  # both expire: compact entries and hit ones alike
    assert backend.peek("c") is None and backend.peek("d") is None
    assert backend.bytes == 0 and len(backend) == 0


async def test_every_hit_on_one_answer_replays_the_same_headers_and_accounting(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hit me often"}]}
    _, first, answer = await post(proxy, body)
    hits = [await post(proxy, body) for _ in range(3)]
    assert fake.calls("/v1/chat/completions") == 1
    miss, *hit_lines = await proxy.usage.wait(4)
    for _, headers, replayed in hits:
        assert replayed == answer
        assert headers[CACHE_HEADER] == "HIT" and int(headers["age"]) >= 0
        assert headers["x-request-id"] == first["x-request-id"]
        assert headers["Content-Type"] == first["Content-Type"]
    for line in hit_lines:
        assert line["cache"] == "hit" and line["cost_usd"] == 0.0
        assert line["saved_usd"] == pytest.approx(miss["cost_usd"]) and miss["cost_usd"] > 0
        assert line["upstream_request_id"] == miss["upstream_request_id"]
        assert line["request_hash"] == miss["request_hash"]
        for field in ("prompt_tokens", "completion_tokens", "total_tokens", "tokens_source"):
            assert line[field] == miss[field], field
