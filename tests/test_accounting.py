"""Money and state (issue 13): no budget bypass, every delivered token paid for, bounded state,
Redis errors classified, slow clients, honest start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from conftest import API_KEY, AUTH, MakeProxy, Proxy, RedisServer, free_port, post, scope_of
from fake_openai import FakeOpenAI, Fault
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.app import part
from proxy.budget import BudgetStage, MemoryCounters, RedisCounters, period_of
from proxy.config import RedisSettings
from proxy.metrics import Metrics
from proxy.ratelimit import Bucket, MemoryBuckets, RateLimitStage
from proxy.store import REDIS, RedisGuard, open_client

CHAT = "/v1/chat/completions"
SCOPE = scope_of(API_KEY)
ROOT = Path(__file__).resolve().parent.parent


def chat(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def tokens_spent(proxy: Proxy) -> int:
    stage = part(proxy.app, BudgetStage)
    label, _ = period_of(stage.clock(), "day")
    counters = stage.counters
    memory = counters if isinstance(counters, MemoryCounters) else counters.local  # type: ignore[attr-defined]
    return memory.value(f"thriftgate:budget:{{{SCOPE}}}:tokens:{label}")


# -- Redis errors: one operation, not an outage ---------------------------------------------------


async def test_a_command_error_fails_one_operation_and_redis_stays_up(
    redis_url: str,
) -> None:
    metrics = Metrics()
    settings = RedisSettings(url=redis_url)
    client = open_client(settings)
    guard = RedisGuard(client, settings, metrics)
    try:

        async def refused(_: Any) -> None:
            raise ResponseError("ERR invalid expire time in 'set' command")

        assert await guard.call("cache_set", refused, "skipped") == "skipped"
        assert guard.up and metrics.redis_up == 1  # not an outage
        assert metrics.redis_errors == {"cache_set": 1}
        assert await guard.call("ping", lambda r: r.ping(), False) is True  # still used

        async def unreachable(_: Any) -> None:
            raise RedisConnectionError("Connection refused")

        assert await guard.call("budget", unreachable, None) is None
        assert not guard.up and metrics.redis_up == 0  # that is one

        async def loading(_: Any) -> None:
            raise ResponseError("LOADING Redis is loading the dataset in memory")

        guard2 = RedisGuard(client, settings, Metrics())
        await guard2.call("budget", loading, None)
        assert not guard2.up
    finally:
        await client.aclose()


async def test_a_ttl_header_cannot_reset_a_shared_budget(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str
) -> None:
    proxy = await make_proxy(env={"REDIS_URL": redis_url, "THRIFTGATE_TOKENS_PER_DAY": "1000"})
    assert (await post(proxy, chat(max_tokens=10)))[0] == 200
    assert (await post(proxy, chat("more", max_tokens=1000)))[0] == 429  # spent
    for ttl in ("1e16", "1e308", "99999999999"):
        status, _, _ = await post(
            proxy, chat("x", max_tokens=10), headers={"x-thriftgate-cache-ttl": ttl}
        )
        assert status == 400
    assert proxy.app[REDIS].up  # nothing a client sent flipped the store to "down"
    assert (await post(proxy, chat("more", max_tokens=1000)))[0] == 429  # still spent
    assert fake.calls(CHAT) == 1


async def test_closed_mode_refuses_budgeted_requests_while_redis_is_down(
    make_proxy: MakeProxy, fake: FakeOpenAI, redis_url: str, redis_server: RedisServer
) -> None:
    env = {"REDIS_URL": redis_url, "THRIFTGATE_TOKENS_PER_DAY": "100000"}
    closed = await make_proxy(env={**env, "THRIFTGATE_REDIS_ON_FAILURE": "closed"})
    local = await make_proxy(env=env)
    assert (await post(closed, chat()))[0] == 200
    redis_server.kill()
    status, headers, raw = await post(closed, chat("again"))
    assert status == 503 and headers["retry-after"] == "1"
    assert raw["error"]["code"] == "service_unavailable"
    assert (await post(local, chat("again")))[0] == 200  # local: served, counted in memory
    unbudgeted = await make_proxy(
        env={"REDIS_URL": redis_url, "THRIFTGATE_REDIS_ON_FAILURE": "closed"}
    )
    assert (await post(unbudgeted, chat("free")))[0] == 200  # no budget: nothing to refuse


async def test_settlements_that_miss_redis_are_sent_when_it_is_back(
    redis_url: str, redis_server: RedisServer
) -> None:
    settings = RedisSettings(url=redis_url, retry_after_s=0.01)
    client = open_client(settings)
    guard = RedisGuard(client, settings, Metrics())
    counters = RedisCounters(guard, MemoryCounters())
    try:
        from proxy.budget import Charge

        far = time.time() + 3600
        _, refused, _ = await counters.take([Charge("t:c", 0, 10, far)])
        assert refused is None
        redis_server.kill()
        counters.add([Charge("t:c", 0, 5, far)])  # an answer longer than its reservation
        await counters.drain()
        assert counters.unsent["t:c"].amount == 5  # kept, not lost
        redis_server.start()  # a fresh Redis: it kept nothing (no persistence here)
        await asyncio.sleep(0.02)  # past retry_after_s (the guard's own back-off)
        await counters.drain()
        assert int(await client.get("t:c")) == 5  # the settlement Redis missed arrived
        assert counters.unsent == {}
    finally:
        await client.aclose()


# -- every delivered token is paid for -----------------------------------------------------------


async def read_then_leave(proxy: Proxy, body: dict[str, Any], events: int) -> int:
    """Read ``events`` SSE events of a stream, then drop the connection; the content seen."""
    seen = 0
    session = aiohttp.ClientSession()
    try:
        r = await session.post(proxy.url + CHAT, json=body, headers=AUTH)
        buf = b""
        while buf.count(b"\n\n") < events:
            buf += await r.content.readany()
        seen = buf.count(b'"content":"') - 1
        r.close()  # the connection is dropped, not returned to the pool
    finally:
        await session.close()
    return seen


async def test_an_abandoned_stream_is_charged_what_it_delivered(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    fake.gate, fake.gate_after = asyncio.Event(), 6  # holds the stream before its usage chunk
    words = " ".join(f"w{i}" for i in range(40))
    body = chat(words, stream=True, stream_options={"include_usage": True}, max_tokens=500)
    try:
        seen = await read_then_leave(proxy, body, 6)
        record = (await proxy.usage.wait(1))[-1]
    finally:
        fake.gate.set()
    assert seen >= 4
    assert record["error"] == "client_disconnected"
    assert record["tokens_source"] == "estimated"
    assert record["completion_tokens"] >= seen  # the text that went out, counted
    assert record["prompt_tokens"] == record["prompt_tokens_estimate"]
    assert tokens_spent(proxy) == record["total_tokens"]  # settled to it, not to the prompt alone
    assert record["cost_usd"] > 0


async def test_a_stream_cut_upstream_is_charged_what_it_delivered(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    fake.fail_next(Fault(cut_after=8))
    body = chat(" ".join("abcdefghij"), stream=True, stream_options={"include_usage": True})
    async with aiohttp.ClientSession() as s, s.post(proxy.url + CHAT, json=body, headers=AUTH) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    record = (await proxy.usage.wait(1))[-1]
    assert record["error"] == "upstream_disconnected"
    assert record["completion_tokens"] > 0 and record["tokens_source"] == "estimated"
    assert tokens_spent(proxy) == record["total_tokens"]


async def test_paid_endpoints_are_charged_after_the_fact_and_refused_once_spent(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "1100"})
    body = {"model": "gpt-4o", "input": "hi " * 40, "max_output_tokens": 16}
    status, _, raw = await post(proxy, body, "/v1/responses")
    assert status == 200
    used = raw["usage"]["total_tokens"]
    assert tokens_spent(proxy) == used
    status, _, raw = await post(
        proxy, {"model": "gpt-image-1", "prompt": "a cat"}, "/v1/images/generations"
    )
    assert status == 200
    used += raw["usage"]["total_tokens"]
    assert tokens_spent(proxy) == used > 1100
    status, headers, raw = await post(
        proxy, {"model": "gpt-image-1", "prompt": "a dog"}, "/v1/images/generations"
    )
    assert status == 429 and headers["x-should-retry"] == "false"
    assert raw["error"]["code"] == "insufficient_quota"
    assert fake.calls("/v1/images/generations") == 1
    async with aiohttp.ClientSession() as s, s.get(proxy.base_url + "/models", headers=AUTH) as r:
        assert r.status == 200  # reading is free


async def test_a_usd_budget_covers_the_responses_api(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_USD_PER_DAY": "0.002"})
    body = {"model": "gpt-4o", "input": "word " * 200, "max_output_tokens": 16}
    assert (await post(proxy, body, "/v1/responses"))[0] == 200  # reserves ~$0.0007
    record = (await proxy.usage.wait(1))[-1]
    assert record["cost_usd"] > 0.002  # the answer went past it (the fake ignores the limit)
    status, _, _ = await post(proxy, {**body, "input": "other"}, "/v1/responses")
    assert status == 429
    assert fake.calls("/v1/responses") == 1


# -- bounded state -------------------------------------------------------------------------------


async def test_random_keys_and_paths_leave_bounded_state(
    make_proxy: MakeProxy, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    import proxy.budget
    import proxy.ratelimit

    monkeypatch.setattr(proxy.ratelimit, "MAX_BUCKETS", 64)
    monkeypatch.setattr(proxy.ratelimit, "MAX_HOLDS", 16)
    monkeypatch.setattr(proxy.budget, "MAX_LOCAL_COUNTERS", 64)
    monkeypatch.setattr(proxy.budget.MemoryCounters.__init__, "__defaults__", (time.time, 64))
    monkeypatch.setattr(
        proxy.ratelimit.MemoryBuckets.__init__, "__defaults__", (time.monotonic, 64)
    )
    app = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000", "THRIFTGATE_RPM": "1000"})
    fake.limit_headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1ms",
    }

    async def metrics_lines() -> int:
        async with aiohttp.ClientSession() as s, s.get(app.url + "/metrics") as r:
            return len((await r.read()).splitlines())

    sizes = []
    async with aiohttp.ClientSession() as s:
        for round_ in range(3):
            for i in range(150):
                n = round_ * 150 + i
                headers = {"Authorization": f"Bearer sk-random-{n:08d}-abcdefgh"}
                body = {"model": f"model-{n}", "messages": [{"role": "user", "content": "x"}]}
                async with s.post(app.base_url + "/chat/completions", json=body, headers=headers):
                    pass
                async with s.get(f"{app.base_url}/random/{n}/path", headers=headers):
                    pass
                async with s.get(f"{app.base_url}/files/file-{n}", headers=headers):
                    pass
            sizes.append(await metrics_lines())
    limiter = part(app.app, RateLimitStage)
    assert len(limiter.buckets.state) <= 64  # type: ignore[attr-defined]
    assert len(limiter.held_until) <= 16
    assert len(part(app.app, BudgetStage).counters.values) <= 64  # type: ignore[attr-defined]
    assert sizes[1] == sizes[2]  # no new series: models past the cap, paths as families/other


async def test_keys_that_do_not_look_like_keys_share_one_anonymous_scope(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "1000"})
    async with aiohttp.ClientSession() as s:
        for junk in ("x", "a b c", "短い", "!" * 20):
            headers = {"Authorization": f"Bearer {junk}"}
            async with s.post(proxy.base_url + "/chat/completions", json=chat(), headers=headers):
                pass
    names = set(part(proxy.app, RateLimitStage).buckets.state)  # type: ignore[attr-defined]
    assert names == {"thriftgate:rl:{key:-}:requests"}


def test_a_soak_of_100k_keys_and_paths_keeps_memory_flat() -> None:
    """100k distinct keys and paths through the in-process structures and the metrics (what the
    request path adds per request), with bounds of 10k: once they are reached, memory stops
    growing (the peak over the last 50k is the peak over the 50k before)."""
    from proxy.budget import Charge

    buckets = MemoryBuckets(max_buckets=10_000)
    counters = MemoryCounters(max_counters=10_000)
    metrics = Metrics()
    far = time.time() + 86400

    def drive(start: int, stop: int) -> None:
        for n in range(start, stop):
            name = f"thriftgate:rl:{{key:{n:064x}}}:requests"
            buckets.take_now([Bucket(name, "key", "requests", 10, 1, 1)])
            counters.add([Charge(f"thriftgate:budget:{{{n:064x}}}:tokens:d1", 0, 1 + n % 2, far)])
            metrics.observe_request(
                {"endpoint": f"/v1/x/{n}", "model": f"m{n}", "status": 200, "cache": None}
            )

    tracemalloc.start()
    try:
        drive(0, 50_000)
        tracemalloc.reset_peak()
        drive(50_000, 75_000)
        middle = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        drive(75_000, 100_000)
        end = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(buckets.state) <= 10_000 and len(counters.values) <= 10_000
    assert end < middle * 1.05, (middle, end)


# -- slow clients --------------------------------------------------------------------------------


async def test_a_thousand_trickling_connections_do_not_starve_a_normal_request(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy()
    host, port = proxy.server.host, proxy.server.port
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(1000):
            _, writer = await asyncio.open_connection(host, port)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nX-Slow: ")
            writers.append(writer)
        for writer in writers[::10]:
            writer.write(b"a")  # still trickling
        started = time.monotonic()
        async with aiohttp.ClientSession() as s, s.get(proxy.url + "/healthz") as r:
            assert r.status == 200
        assert time.monotonic() - started < 1.0
    finally:
        for writer in writers:
            writer.close()


# -- start and stop ------------------------------------------------------------------------------


async def test_redis_down_at_start_is_degraded_before_any_request(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/readyz") as r:
            assert (await r.json())["redis"]["status"] == "degraded"
        async with s.get(proxy.url + "/metrics") as r:
            assert b"thriftgate_redis_up 0.0" in await r.read()


async def test_readyz_names_the_configured_upstreams(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
) -> None:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[[upstreams]]\nurl = "{upstream.make_url("/v1")}"\nname = "primary"\n')
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
        report = await r.json()
    assert [u["name"] for u in report["upstreams"]] == ["primary"]
    assert "api.openai.com" not in orjson.dumps(report).decode()


def serve(upstream_url: str, port: int, tmp: Path, **env: str) -> subprocess.Popen[bytes]:
    environ = {
        **os.environ,
        "THRIFTGATE_UPSTREAM_URL": upstream_url,
        "THRIFTGATE_PORT": str(port),
        "THRIFTGATE_USAGE_LOG": str(tmp / "usage.jsonl"),
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", "serve"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def stop(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, wait, and what it wrote to stderr that was not read yet (pipes closed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = await asyncio.to_thread(proc.communicate, timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = await asyncio.to_thread(proc.communicate)
    return err


async def wait_listening(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    assert proc.stderr is not None
    while True:
        line = await asyncio.to_thread(proc.stderr.readline)
        assert line, "the proxy exited before listening"
        event = orjson.loads(line)
        if event["event"] == "listening":
            return event


async def test_shutdown_ends_streams_at_the_grace_and_settles_them(
    upstream: TestServer, fake: FakeOpenAI, tmp_path: Path
) -> None:
    port = free_port()
    proc = serve(str(upstream.make_url("/v1")), port, tmp_path, THRIFTGATE_SHUTDOWN_GRACE_S="1.5")
    fake.gate, fake.gate_after = asyncio.Event(), 5  # the stream never finishes by itself
    try:
        listening = await wait_listening(proc)
        assert listening["port"] == port
        assert listening["upstreams"] == [str(upstream.make_url("/v1"))]
        async with aiohttp.ClientSession() as s:
            body = chat(" ".join("abcdefgh"), stream=True)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            r = await s.post(url, json=body, headers=AUTH)
            buf = b""
            while buf.count(b"\n\n") < 5:
                buf += await r.content.readany()
            stopped_at = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = b""
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async for chunk in r.content.iter_any():  # runs until the grace ends, then cut
                    rest += chunk
            code = await asyncio.to_thread(proc.wait, 10)
            took = time.monotonic() - stopped_at
            r.close()
    finally:
        fake.gate.set()
        err = await stop(proc)
    assert code == 0
    assert 1.5 <= took < 1.5 + 1.0 + 0.5  # the grace, plus the documented margin (and slack)
    assert b"[DONE]" not in rest
    records = [orjson.loads(x) for x in (tmp_path / "usage.jsonl").read_bytes().splitlines()]
    assert len(records) == 1
    assert records[0]["error"] == "shutdown"
    assert records[0]["completion_tokens"] > 0 and records[0]["tokens_source"] == "estimated"
    tail = [orjson.loads(x)["event"] for x in err.splitlines() if x.strip()]
    assert tail == ["stopping", "stopped"]


async def test_a_port_in_use_is_one_line_and_exit_2(upstream: TestServer, tmp_path: Path) -> None:
    port = free_port()
    first = serve(str(upstream.make_url("/v1")), port, tmp_path)
    try:
        await wait_listening(first)
        second = serve(str(upstream.make_url("/v1")), port, tmp_path)
        _, err = await asyncio.to_thread(second.communicate, timeout=30)  # exits by itself
    finally:
        await stop(first)
    assert second.returncode == 2
    lines = err.decode().strip().splitlines()
    assert lines == [f"thriftgate: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert first.returncode == 0


# -- the cache key is what is sent -----------------------------------------------------------------


async def test_the_cache_key_is_what_is_sent_upstream_and_its_query(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": c} for c in ("one", "two", "three")],
    }
    assert (await post(proxy, body))[1]["x-thriftgate-cache"] == "MISS"
    trimmed = await post(proxy, body, headers={"x-thriftgate-trim": "last-1"})
    assert trimmed[1]["x-thriftgate-cache"] == "MISS"  # not the untrimmed answer
    assert (await post(proxy, body, headers={"x-thriftgate-trim": "last-1"}))[1][
        "x-thriftgate-cache"
    ] == "HIT"
    last = {"model": "gpt-4o", "messages": [{"role": "user", "content": "three"}]}
    assert (await post(proxy, last))[1]["x-thriftgate-cache"] == "HIT"  # the same request sent
    assert (await post(proxy, body, CHAT + "?api-version=2024-10-21"))[1][
        "x-thriftgate-cache"
    ] == "MISS"
    assert fake.calls(CHAT) == 3
