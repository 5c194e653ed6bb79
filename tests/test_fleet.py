"""A fleet of thriftgate processes on a real Redis Cluster (three primaries), on a primary found
through Sentinel (killed mid-load), and on a TLS-only Redis with ACL credentials."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import API_KEY
from fake_openai import FakeOpenAI
from redis_fleet import Cluster, SentinelSetup, TLSServer
from test_budget import chat, reservation
from test_cli import Served, start

AUTH = {"Authorization": f"Bearer {API_KEY}", "x-thriftgate-max-retries": "0"}
# exactness tests: a slow Redis call on a loaded machine would fall back to local state (by
# design); a generous timeout keeps these about the shared state
EXACT = {"THRIFTGATE_REDIS_TIMEOUT_S": "2"}
CACHE_KEYS = "return #redis.call('KEYS', 'thriftgate:cache:*')"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.start()
    yield c
    c.stop()


@pytest.fixture
async def fleet_of(tmp_path: Path, upstream: TestServer) -> AsyncIterator[Any]:
    started: list[Served] = []

    async def make(n: int, env: dict[str, str]) -> list[Served]:
        servers = [
            start(tmp_path, "--upstream", str(upstream.make_url("/v1")), env=env) for _ in range(n)
        ]
        started.extend(servers)
        await asyncio.gather(*(s.ready() for s in servers))
        return servers

    yield make
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


async def send(url: str, body: dict[str, Any], s: aiohttp.ClientSession) -> tuple[int, Any]:
    async with s.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        await r.read()
        return r.status, r.headers


async def readyz(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(url + "/readyz") as r:
        return await r.json()


# -- Redis Cluster ---------------------------------------------------------------------------------


async def test_a_cluster_node_url_is_recognised_and_shares_the_cache(
    cluster: Cluster, fleet_of: Any, fake: FakeOpenAI
) -> None:
    cluster.flush()
    env = {"REDIS_URL": cluster.url, "THRIFTGATE_USAGE_REDIS_STREAM": "thriftgate:usage"}
    a, b, c = await fleet_of(3, env)
    assert (await readyz(a.url))["redis"]["kind"] == "cluster"
    async with aiohttp.ClientSession() as s:
        for i in range(24):  # answers stored by A, spread over the cluster's slots
            status, headers = await send(a.url, chat("gpt-4o", 3, user=f"u{i}"), s)
            assert status == 200 and headers["x-thriftgate-cache"] == "MISS"
        status, headers = await send(b.url, chat("gpt-4o", 3, user="u5"), s)
        assert status == 200 and headers["x-thriftgate-cache"] == "HIT"  # stored by A
        status, headers = await send(c.url, chat("gpt-4o", 3, user="u6"), s)
        assert headers["x-thriftgate-cache"] == "HIT"
    assert fake.calls("/v1/chat/completions") == 24
    spread = cluster.keys_per_node("thriftgate:cache:*")
    assert sum(spread) == 24 and all(n > 0 for n in spread), spread  # on all three primaries
    # every replica's usage records reach the one stream, wherever its slot is
    from redis.asyncio.cluster import RedisCluster

    client = RedisCluster.from_url(cluster.url)
    try:
        async with asyncio.timeout(10):
            while await client.xlen("thriftgate:usage") < 26:  # noqa: ASYNC110 - Redis: poll
                await asyncio.sleep(0.05)
        assert await client.xlen("thriftgate:usage") == 26
    finally:
        await client.aclose()


async def test_one_rpm_limit_is_exact_across_the_fleet(
    cluster: Cluster, fleet_of: Any, fake: FakeOpenAI
) -> None:
    cluster.flush()
    fleet = await fleet_of(3, {**EXACT, "REDIS_URL": cluster.url, "THRIFTGATE_RPM": "20"})
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(
            *(send(fleet[i % 3].url, chat("gpt-4o", 2, user=f"r{i}"), s) for i in range(25))
        )
    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * 20 + [429] * 5
    assert fake.calls("/v1/chat/completions") == 20


async def test_one_budget_is_exact_across_the_fleet_under_concurrent_load(
    cluster: Cluster, fleet_of: Any, fake: FakeOpenAI
) -> None:
    cluster.flush()
    body = chat("gpt-4o", 20, max_tokens=50)
    per_request = reservation(body)
    limit = 10 * per_request + per_request // 2
    fleet = await fleet_of(
        3,
        {
            **EXACT,
            "REDIS_URL": cluster.url,
            "THRIFTGATE_TOKENS_PER_DAY": str(limit),
            "THRIFTGATE_CACHE": "false",
            "THRIFTGATE_RPM": "1000",  # a rate limit too: per-key and per-model buckets
        },
    )
    fake.hold = asyncio.Event()  # every admitted request stays in flight until released
    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(send(fleet[i % 3].url, body, s)) for i in range(30)]
        try:
            async with asyncio.timeout(20):
                while sum(t.done() for t in tasks) < 20:
                    await asyncio.wait(
                        [t for t in tasks if not t.done()], return_when="FIRST_COMPLETED"
                    )
            await asyncio.wait_for(fake.held.wait(), 10)
        finally:
            fake.hold.set()
        results = await asyncio.gather(*tasks)
    assert sorted(status for status, _ in results) == [200] * 10 + [429] * 20
    assert fake.calls("/v1/chat/completions") == 10


# -- Sentinel --------------------------------------------------------------------------------------


@pytest.fixture
def sentinel() -> Iterator[SentinelSetup]:
    setup = SentinelSetup()
    setup.start()
    yield setup
    setup.stop()


async def test_the_primary_killed_mid_load_fails_no_request(
    sentinel: SentinelSetup, fleet_of: Any, fake: FakeOpenAI
) -> None:
    fleet = await fleet_of(
        3,
        {
            "REDIS_URL": sentinel.url,
            "THRIFTGATE_RPM": "100000",
            "THRIFTGATE_REDIS_TIMEOUT_S": "0.25",
        },
    )
    assert (await readyz(fleet[0].url))["redis"]["kind"] == "sentinel"
    statuses: list[int] = []
    stop = asyncio.Event()

    async def load(i: int) -> None:
        n = 0
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                status, _ = await send(fleet[i].url, chat("gpt-4o", 2, user=f"s{i}-{n}"), s)
                statuses.append(status)
                n += 1

    workers = [asyncio.create_task(load(i)) for i in range(3)]
    try:
        async with asyncio.timeout(10):
            while len(statuses) < 30:  # noqa: ASYNC110 - the load's own progress: poll it
                await asyncio.sleep(0.01)
        old = sentinel.primary_port
        sentinel.primary.kill()  # the primary dies under load
        async with asyncio.timeout(30):
            while sentinel.primary_now() in (old, 0):  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.1)
        assert sentinel.primary_now() == sentinel.replica_port  # promoted
        async with asyncio.timeout(30):  # every replica finds the new primary by itself
            while True:
                states = [(await readyz(served.url))["redis"]["status"] for served in fleet]
                if states == ["ok"] * 3 and len(statuses) >= 200:
                    break
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*workers)
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    from redis_fleet import cli

    def cached() -> int:
        return int(cli(sentinel.replica_port, "EVAL", CACHE_KEYS, "0") or 0)

    async with aiohttp.ClientSession() as s:  # state lands on the new primary again
        before = cached()
        assert (await send(fleet[0].url, chat("gpt-4o", 2, user="after"), s))[0] == 200
        async with asyncio.timeout(10):  # A stores its answer in the background
            while cached() == before:  # noqa: ASYNC110 - another process (Redis): poll it
                await asyncio.sleep(0.05)
        status, headers = await send(fleet[1].url, chat("gpt-4o", 2, user="after"), s)
        assert status == 200 and headers["x-thriftgate-cache"] == "HIT"  # stored by A


# -- TLS -------------------------------------------------------------------------------------------


async def test_tls_redis_with_a_test_ca_and_a_password(
    fleet_of: Any, fake: FakeOpenAI, tmp_path: Path
) -> None:
    server = TLSServer()
    server.start()
    try:
        a, b = await fleet_of(
            2, {"REDIS_URL": server.url, "THRIFTGATE_REDIS_CA_FILE": str(server.ca)}
        )
        assert (await readyz(a.url))["redis"]["status"] == "ok"
        async with aiohttp.ClientSession() as s:
            await send(a.url, chat("gpt-4o", 2), s)
            async with asyncio.timeout(10):  # A stores its answer in the background
                while server.count("thriftgate:cache:*") == 0:  # noqa: ASYNC110 - Redis: poll
                    await asyncio.sleep(0.05)
            status, headers = await send(b.url, chat("gpt-4o", 2), s)
        assert status == 200 and headers["x-thriftgate-cache"] == "HIT"  # through TLS Redis
        for served in (a, b):
            assert server.password not in served.log.read_text()  # never logged
    finally:
        server.stop()


# -- fleet-wide alerts -----------------------------------------------------------------------------


async def test_a_spend_alert_fires_once_for_the_fleet_from_shared_counters(
    cluster: Cluster, fleet_of: Any, fake: FakeOpenAI, aiohttp_server: Any
) -> None:
    import signal

    from aiohttp import web

    hooks: list[dict[str, Any]] = []
    arrived = asyncio.Event()

    async def webhook(request: web.Request) -> web.Response:
        hooks.append(await request.json())
        arrived.set()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", webhook)
    receiver = await aiohttp_server(app)
    cluster.flush()
    fleet = await fleet_of(
        3,
        {
            "REDIS_URL": cluster.url,
            "THRIFTGATE_ALERT_WEBHOOK": str(receiver.make_url("/hook")),
            # each request costs about $0.00007: two per replica stay under it, six do not
            "THRIFTGATE_ALERT_SPEND_USD_PER_DAY": "0.0002",
        },
    )
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            assert (await send(fleet[i % 3].url, chat("gpt-4o", 3, user=f"a{i}"), s))[0] == 200
    await asyncio.wait_for(arrived.wait(), 15)  # within a second or two of the spend
    for served in fleet:  # shutdown sends what each replica still holds, and waits for it
        served.proc.send_signal(signal.SIGTERM)
    assert [await served.wait() for served in fleet] == [0, 0, 0]
    assert len(hooks) == 1, hooks  # one webhook for the fleet, not one per replica
    assert "spent this day" in hooks[0]["text"]
    logs = [served.log.read_text() for served in fleet]
    assert sum(text.count('"event":"alert"') for text in logs) == 1


async def test_doctor_recognises_the_cluster_and_the_sentinels(
    cluster: Cluster, sentinel: SentinelSetup
) -> None:
    from proxy.doctor import OK, run_checks

    for url, kind in ((cluster.url, "a cluster of 3 primaries"), (sentinel.url, "redis 7")):
        checks = await run_checks({"port": 0}, None, None, env={"REDIS_URL": url})
        redis = next(c for c in checks if c.name == "redis")
        assert redis.result == OK and kind in redis.detail, redis.detail


async def test_settlements_kept_through_an_outage_reach_the_cluster_slot_by_slot(
    cluster: Cluster,
) -> None:
    """Settlements of many keys, merged while Redis was away, are sent once it is back: on a
    cluster, one script call per key's slot (one call for all would be refused: CROSSSLOT)."""
    import time

    from proxy.budget import Charge, MemoryCounters, RedisCounters, counter_name
    from proxy.config import RedisSettings
    from proxy.metrics import Metrics
    from proxy.store import RedisGuard, close_client, open_client

    cluster.flush()
    settings = RedisSettings(url=cluster.url, timeout_s=2.0)
    client = open_client(settings, cluster=True)
    try:
        counters = RedisCounters(RedisGuard(client, settings, Metrics()), MemoryCounters())
        far = time.time() + 86400
        charges = [
            Charge(counter_name("thriftgate:budget:", f"key-{i}", "tokens", "d1"), 0, 10 + i, far)
            for i in range(6)
        ]
        counters.keep(charges)  # as the guard does when Redis did not take them
        await counters.drain()
        assert not counters.unsent
        assert [int(await client.get(c.counter)) for c in charges] == [10 + i for i in range(6)]
        assert sum(cluster.keys_per_node("thriftgate:budget:*")) == 6
    finally:
        await close_client(client)
