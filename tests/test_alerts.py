"""Alerts: rules fire once per cool-down, reach a webhook, and a dead webhook harms nothing."""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import NO_STORE, LogSink, MakeProxy, free_port
from conftest import post as post_to
from fake_openai import FakeOpenAI, Fault

from proxy.alerts import Alerts
from proxy.app import part
from proxy.config import AlertSettings


class Hook:
    """A webhook receiver: a real aiohttp server that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        async def post(request: web.Request) -> web.Response:
            self.received.append(await request.json())
            self.arrived.set()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", post)
        return app


post = partial(post_to, headers=NO_STORE)  # past the cache


def say(text: str) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_spend_alert_fires_once_per_cooldown_and_reaches_the_webhook(
    make_proxy: MakeProxy, fake: FakeOpenAI, aiohttp_server: Any, tmp_path: Path, app_logs: LogSink
) -> None:
    hook = Hook()
    server: TestServer = await aiohttp_server(hook.app())
    cfg = tmp_path / "a.toml"
    cfg.write_text("[alerts]\nspend_usd_per_hour = 0.0000001\ncooldown_s = 600\n")
    clock = Clock()
    proxy = await make_proxy(
        env={
            "THRIFTGATE_CONFIG": str(cfg),
            "THRIFTGATE_ALERT_WEBHOOK": str(server.make_url("/hook")),
        },
        wall_clock=clock,
    )
    alerts = part(proxy.app, Alerts)
    before = len(app_logs.lines())
    for i in range(3):
        assert (await post(proxy, say(f"spend {i}"))).status == 200
    await proxy.usage.wait(3)
    await asyncio.wait_for(hook.arrived.wait(), 5)
    assert [a["alert"] for a in alerts.sent] == ["spend_per_hour"]  # once, not three times
    assert hook.received[0]["text"].startswith("thriftgate: $")
    assert "over the alert threshold" in hook.received[0]["text"]
    events = [r for r in app_logs.lines()[before:] if r["event"] == "alert"]
    assert len(events) == 1 and events[0]["alert"] == "spend_per_hour"
    clock.now += 601  # the cool-down is over; same UTC hour, spend still over the threshold
    hook.arrived.clear()
    assert (await post(proxy, say("spend again"))).status == 200
    await proxy.usage.wait(4)
    await asyncio.wait_for(hook.arrived.wait(), 5)
    assert len(alerts.sent) == 2 and len(hook.received) == 2


async def test_a_dead_webhook_never_affects_traffic(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path, app_logs: LogSink
) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[alerts]\nspend_usd_per_hour = 0.0000001\n")
    dead = f"http://127.0.0.1:{free_port()}/T000/secret-path"  # nothing listens there
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg), "THRIFTGATE_ALERT_WEBHOOK": dead})
    before = len(app_logs.lines())
    statuses = [(await post(proxy, say(f"m{i}"))).status for i in range(5)]
    assert statuses == [200] * 5
    alerts = part(proxy.app, Alerts)
    await asyncio.wait_for(alerts.tasks.drain(), 10)
    failures = [r for r in app_logs.lines()[before:] if r["event"] == "alert_webhook_failed"]
    assert len(failures) == 1 and "secret-path" not in str(failures[0])  # the URL is not logged


async def test_budget_warning_then_refused_then_spent(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "2500"})
    alerts = part(proxy.app, Alerts)
    long = "word " * 1100  # ~1100 prompt tokens + 1024 reserved for the answer: 85% of 2500
    assert (await post(proxy, say(long))).status == 200
    assert [a["alert"] for a in alerts.sent] == ["budget_warning"]
    assert alerts.sent[0]["fraction"] >= 0.8
    await proxy.usage.wait(1)
    # settled to the answer's usage (about 1,400 tokens): the next estimate does not fit what is
    # left, but the budget is not spent, and the alert says so
    assert (await post(proxy, say(long))).status == 429
    assert [a["alert"] for a in alerts.sent] == ["budget_warning", "budget_refused"]
    assert 0.5 < alerts.sent[1]["fraction"] < 1
    assert (await post(proxy, say(long))).status == 429
    assert len(alerts.sent) == 2  # cooled down: not again


async def test_budget_spent_fires_when_the_budget_is_used_up(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "20"})
    alerts = part(proxy.app, Alerts)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    statuses = []
    for i in range(3):  # each reserves 9 tokens and is settled to the fake's 10
        answer = await post(proxy, body)
        statuses.append(answer.status)
        message = answer.data.get("error", {}).get("message", "")
        await proxy.usage.wait(i + 1)
    assert statuses == [200, 200, 429]
    assert "is spent (20 of 20 tokens used, 0 left" in message
    assert [a["alert"] for a in alerts.sent][-1] == "budget_spent"
    assert alerts.sent[-1]["fraction"] == 1.0


async def test_upstream_error_rate(make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[alerts]\nerror_rate = 0.5\nmin_requests = 4\n")
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    alerts = part(proxy.app, Alerts)
    fake.fail_next(*[Fault(status=503)] * 3)
    statuses = [
        (
            await post(proxy, say(f"m{i}"), headers={**NO_STORE, "x-thriftgate-max-retries": "0"})
        ).status
        for i in range(4)
    ]
    assert statuses == [503, 503, 503, 200]
    await proxy.usage.wait(4)
    assert [a["alert"] for a in alerts.sent] == ["upstream_error_rate"]
    assert alerts.sent[0]["error_rate"] == 0.75


def test_window_rules_and_key_spend() -> None:
    clock = Clock()
    alerts = Alerts(
        AlertSettings(
            cache_hit_rate_below=0.5, min_requests=4, window_s=60, key_spend_usd_per_day=1.0
        ),
        clock=clock,
    )
    for _ in range(3):
        alerts.observe({"status": 200, "cache": "miss"})
    assert alerts.sent == []  # not enough requests yet
    alerts.observe({"status": 200, "cache": "hit"})
    assert [a["alert"] for a in alerts.sent] == ["cache_hit_rate"]
    clock.now += 61  # the window has moved on: the old requests no longer count
    alerts.observe({"status": 200, "cache": "hit"})
    alerts.observe({"status": 200, "key": "abc", "cost_usd": 0.6})
    alerts.observe({"status": 200, "key_alias": "ci", "key": "def", "cost_usd": 0.6})
    alerts.observe({"status": 200, "key": "abc", "cost_usd": 0.6})
    assert alerts.sent[-1]["alert"] == "key_spend_per_day" and alerts.sent[-1]["key"] == "abc"


def test_key_spend_per_hour() -> None:
    clock = Clock()
    alerts = Alerts(AlertSettings(key_spend_usd_per_hour=1.0), clock=clock)
    alerts.observe({"status": 200, "key": "abc", "cost_usd": 0.6})
    clock.now += 3600  # the next UTC hour: spend starts again
    alerts.observe({"status": 200, "key": "abc", "cost_usd": 0.6})
    assert alerts.sent == []
    alerts.observe({"status": 200, "key": "abc", "cost_usd": 0.6})
    assert alerts.sent[-1]["alert"] == "key_spend_per_hour"
    assert "this hour (UTC)" in alerts.sent[-1]["text"]
