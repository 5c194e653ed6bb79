"""Several upstreams: spread by weight, failover on retryable failures, circuit breakers."""

from __future__ import annotations

import asyncio
import random
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import AUTH_NO_STORE as AUTH
from conftest import NO_STORE, MakeProxy, free_port
from conftest import post as post_to
from fake_openai import FakeOpenAI, Fault

from proxy.config import ConfigError, UpstreamSettings, UpstreamTarget, load_settings
from proxy.metrics import Metrics
from proxy.pool import CLOSED, HALF_OPEN, OPEN, Pool

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "which one?"}]}


@pytest.fixture
def fake2() -> FakeOpenAI:
    return FakeOpenAI()


@pytest.fixture
async def upstream2(fake2: FakeOpenAI, aiohttp_server: Any) -> TestServer:
    return await aiohttp_server(fake2.app())


def config(tmp_path: Path, *targets: str, extra: str = "") -> str:
    path = tmp_path / "upstreams.toml"
    path.write_text(extra + "".join(targets))
    return str(path)


def target(url: str, name: str, weight: float = 1, key: str | None = None) -> str:
    line = f'\n[[upstreams]]\nurl = "{url}"\nname = "{name}"\nweight = {weight}\n'
    return line + (f'api_key = "{key}"\n' if key else "")


post = partial(post_to, body=CHAT, headers=NO_STORE)


async def test_failover_to_the_second_upstream(
    make_proxy: MakeProxy,
    fake: FakeOpenAI,
    fake2: FakeOpenAI,
    upstream: TestServer,
    upstream2: TestServer,
    tmp_path: Path,
) -> None:
    cfg = config(
        tmp_path,
        target(str(upstream.make_url("/v1")), "a", weight=10_000, key="sk-a"),  # tried first
        target(str(upstream2.make_url("/v1")), "b", key="sk-b"),
    )
    # a seeded choice of upstream: "a" first every time (by weight, 9,999 times in 10,000)
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": cfg}, rng=random.Random(1))
    fake.fail_next(*[Fault(status=503)] * 100)  # "a" is failing
    for _ in range(4):  # (fewer than the 5 failures that would take "a" out of the rotation)
        status, headers, _ = await post(proxy)
        assert status == 200 and headers["x-thriftgate-attempts"] == "2"
    assert fake.calls() == fake2.calls() == 4  # each request: "a", then "b"
    assert {r.headers["Authorization"] for r in fake.requests} == {"Bearer sk-a"}
    assert {r.headers["Authorization"] for r in fake2.requests} == {"Bearer sk-b"}
    assert [r["upstream"] for r in await proxy.usage.wait(4)] == ["b"] * 4


async def test_requests_spread_by_weight(
    make_proxy: MakeProxy,
    fake: FakeOpenAI,
    fake2: FakeOpenAI,
    upstream: TestServer,
    upstream2: TestServer,
    tmp_path: Path,
) -> None:
    cfg = config(
        tmp_path,
        target(str(upstream.make_url("/v1")), "heavy", weight=3),
        target(str(upstream2.make_url("/v1")), "light", weight=1),
    )
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": cfg}, rng=random.Random(1))
    await asyncio.gather(*(post(proxy) for _ in range(200)))
    assert fake.calls() + fake2.calls() == 200
    assert 110 <= fake.calls() <= 185  # 150 expected; far outside this is not chance


async def test_breaker_opens_and_lets_a_probe_through_after_the_cooldown(
    make_proxy: MakeProxy,
    fake: FakeOpenAI,
    fake2: FakeOpenAI,
    upstream: TestServer,
    upstream2: TestServer,
    tmp_path: Path,
) -> None:
    cfg = config(
        tmp_path,
        target(str(upstream.make_url("/v1")), "flaky"),
        target(str(upstream2.make_url("/v1")), "steady"),
        extra="[upstream]\nbreaker_failures = 2\nbreaker_cooldown_s = 30\n",
    )
    now = [1000.0]
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": cfg}, clock=lambda: now[0])
    pool = proxy.app[_pool_key()]
    fake.fail_next(*[Fault(status=500)] * 100)  # "flaky" is down
    flaky = pool.targets[0]
    for _ in range(100):  # picks are random (weighted): until "flaky" has failed twice
        assert (await post(proxy))[0] == 200
        if flaky.state == OPEN:
            break
    for _ in range(10):
        assert (await post(proxy))[0] == 200
    assert flaky.state == OPEN
    assert fake.calls() == 2  # after two failures no request was sent to it
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/readyz") as r:
        states = {u["name"]: u["state"] for u in (await r.json())["upstreams"]}
    assert states == {"flaky": "open", "steady": "closed"}
    now[0] += 31  # the cooldown is over: one probe goes to "flaky"
    fake.faults.clear()  # ... and it has recovered
    for _ in range(100):
        await post(proxy)
        if flaky.state == CLOSED and fake.calls() > 3:
            break
    assert flaky.state == CLOSED
    assert fake.calls() > 3
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        text = await r.text()
    assert 'thriftgate_upstream_breaker_transitions_total{to="open",upstream="flaky"} 1.0' in text
    assert 'thriftgate_upstream_state{state="closed",upstream="flaky"} 1.0' in text


def test_breaker_states_unit() -> None:
    settings = UpstreamSettings(breaker_failures=3, breaker_cooldown_s=10)
    now = [0.0]
    pool = Pool(
        [UpstreamTarget("http://a/v1", name="a"), UpstreamTarget("http://b/v1", name="b")],
        settings,
        Metrics(),
        clock=lambda: now[0],
        rng=random.Random(7),
    )
    a, b = pool.targets
    for _ in range(2):
        a.failed(now[0])
    assert a.state == CLOSED
    a.succeeded()  # consecutive failures only
    for _ in range(3):
        a.failed(now[0])
    assert a.state == OPEN
    assert all(pool.pick() is b for _ in range(20))
    now[0] = 10
    assert pool.pick(tried=("b",)) is a and a.state == HALF_OPEN  # the probe
    assert all(pool.pick(tried=("b",)) is b for _ in range(5))  # one probe at a time
    a.failed(now[0])
    assert a.state == OPEN  # the probe failed: out again
    b.failed(now[0])
    b.failed(now[0])
    b.failed(now[0])
    assert pool.pick() is a  # both out: the one that left first is tried anyway


def test_upstreams_config_errors(tmp_path: Path) -> None:
    for text, message in [
        ('[[upstreams]]\nname = "x"\n', "url is required"),
        ('[[upstreams]]\nurl = "ftp://x"\n', "is not an http(s) URL"),
        ('[[upstreams]]\nurl = "http://x/v1"\nweight = 0\n', "must be positive"),
        ('[[upstreams]]\nurl = "http://x/v1"\nspeed = 1\n', "unknown setting speed"),
        ('[[upstreams]]\nurl = "http://x/v1"\n[[upstreams]]\nurl = "http://x/v2"\n', "distinct"),
    ]:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=None) as caught:
            load_settings(env={}, config_file=str(cfg))
        assert message in str(caught.value)


async def test_idle_gap_timeout_ends_a_silent_stream(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_IDLE_TIMEOUT_S": "0.3"})
    fake.gate = asyncio.Event()  # one chunk, then silence
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                proxy.url + "/v1/chat/completions", json={**CHAT, "stream": True}, headers=AUTH
            ) as r,
        ):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(10):
                    await r.read()
    finally:
        fake.gate.set()
    assert (await proxy.usage.wait(1))[-1]["error"] == "upstream_timeout"


async def test_unreachable_upstream_is_failed_over(
    make_proxy: MakeProxy, fake: FakeOpenAI, upstream: TestServer, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path,
        target(f"http://127.0.0.1:{free_port()}/v1", "gone"),
        target(str(upstream.make_url("/v1")), "here"),
    )
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": cfg})
    for _ in range(5):
        assert (await post(proxy))[0] == 200
    assert fake.calls() == 5


def _pool_key() -> Any:
    from proxy.forward import POOL

    return POOL
