"""Secrets (issue 12): nothing configured or sent as a secret shows anywhere; scopes are keyed
hashes, so a fingerprint collision shares nothing."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import API_KEY, LogSink, MakeProxy, RedisServer
from fake_openai import FakeOpenAI, Fault

from proxy import keys
from proxy.config import redact_url

CLIENT_KEY = "sk-proj-ClientSecret0123456789abcdef"
SECRETS = {
    "client key": CLIENT_KEY,
    "upstream key": "sk-upstream-UpstreamSecret98765",
    "url password": "UrlPassw0rdSecret",
    "url query key": "QueryKeySecret4242",
    "admin token": "admin-Token-Secret-77",
    "redis password": "RedisPassSecret55",
    "webhook token": "HookTokenSecret31",
    "scope secret": "ScopeSecretValue19",
}


@pytest.fixture
def locked_redis() -> Iterator[RedisServer]:
    server = RedisServer(password=SECRETS["redis password"])
    server.start()
    yield server
    server.kill()


def test_redact_url() -> None:
    shown = redact_url("http://user:PASSWORD@host:81/v1?api-key=SECRET&api-version=2024-10-21")
    assert shown == "http://***@host:81/v1?api-key=***&api-version=2024-10-21"
    assert redact_url("https://api.openai.com/v1") == "https://api.openai.com/v1"
    assert "tk1" not in redact_url("http://h/hook?token=tk1&sig=tk1")
    assert "pw" not in redact_url("redis://default:pw@127.0.0.1:6379/0")


async def test_no_configured_secret_appears_in_any_log_header_metric_or_redis(
    make_proxy: MakeProxy,
    upstream: TestServer,
    fake: FakeOpenAI,
    app_logs: LogSink,
    locked_redis: RedisServer,
) -> None:
    base = upstream.make_url("/v1")
    url = (
        f"http://someone:{SECRETS['url password']}@{base.host}:{base.port}/v1"
        f"?api-key={SECRETS['url query key']}"
    )
    proxy = await make_proxy(
        env={
            "THRIFTGATE_UPSTREAM_URL": url,
            "THRIFTGATE_UPSTREAM_API_KEY": SECRETS["upstream key"],
            "THRIFTGATE_ADMIN_TOKEN": SECRETS["admin token"],
            "REDIS_URL": locked_redis.url,
            "THRIFTGATE_ALERT_WEBHOOK": f"http://127.0.0.1:9/hook?token={SECRETS['webhook token']}",
            "THRIFTGATE_ALERT_SPEND_USD_PER_DAY": "0.0000001",
            "THRIFTGATE_SCOPE_SECRET": SECRETS["scope secret"],
            "THRIFTGATE_TOKENS_PER_DAY": "5000",
            "THRIFTGATE_RPM": "100",
            "THRIFTGATE_USAGE_REDIS_STREAM": "thriftgate:usage",
        }
    )
    before = len(app_logs.getvalue())
    seen: list[bytes] = []
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as c:
        messages: Any = [{"role": "user", "content": "hello"}]
        for _ in range(2):  # a miss, then a hit
            raw = await c.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=messages
            )
            seen += [str(raw.headers).encode(), raw.content]
        stream = await c.chat.completions.create(model="gpt-4o", messages=messages, stream=True)
        async for chunk in stream:
            seen.append(chunk.model_dump_json().encode())
        await c.embeddings.create(model="text-embedding-3-small", input="a")
        fake.fail_next(Fault(status=500), Fault(status=500), Fault(status=500))
        with pytest.raises(openai.InternalServerError):
            await c.chat.completions.create(model="gpt-4o-mini", messages=messages)
    admin = {"Authorization": f"Bearer {SECRETS['admin token']}"}
    async with aiohttp.ClientSession() as s:
        for path, headers in (
            ("/metrics", admin),
            ("/readyz", admin),
            ("/readyz", {}),
            ("/v1/nowhere", {"Authorization": f"Bearer {CLIENT_KEY}"}),
        ):
            async with s.get(proxy.url + path, headers=headers) as r:
                seen += [str(r.headers).encode(), await r.read()]
        async with s.get(proxy.url + "/readyz", headers=admin) as r:
            report = await r.json()
    assert report["redis"]["status"] == "ok"  # the password worked...
    assert report["upstreams"][0]["url"].startswith("http://***@")  # ...and is shown redacted
    await proxy.server.close()  # the parts stopped: settlements and usage stream drained
    client = aioredis.Redis.from_url(locked_redis.url)
    try:
        stored = []
        async for name in client.scan_iter():
            stored.append(name)
            kind = (await client.type(name)).decode()
            if kind == "string":
                stored.append(await client.get(name) or b"")
            elif kind == "hash":
                stored += [k + v for k, v in (await client.hgetall(name)).items()]
            elif kind == "stream":
                stored += [str(e).encode() for e in await client.xrange(name)]
    finally:
        await client.aclose()
    assert any(b"thriftgate:budget:" in k for k in stored)  # Redis was really used
    assert any(k == b"thriftgate:usage" for k in stored)
    upstream_auth = {r.headers.get("Authorization") for r in fake.requests}
    assert upstream_auth == {f"Bearer {SECRETS['upstream key']}"}  # the sidecar's key went...
    assert all(f"api-key={SECRETS['url query key']}" in r.path for r in fake.requests)
    everything = b"\n".join([proxy.usage.getvalue(), app_logs.getvalue()[before:], *seen, *stored])
    for what, secret in SECRETS.items():
        assert secret.encode() not in everything, what
    assert CLIENT_KEY[8:].encode() not in everything  # not even without its prefix


async def test_readyz_details_need_the_admin_token(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_ADMIN_TOKEN": "admin-1"})
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/readyz") as r:
            assert r.status == 200 and await r.json() == {"status": "ready"}
        async with s.get(proxy.url + "/readyz", headers={"Authorization": "Bearer nope"}) as r:
            assert await r.json() == {"status": "ready"}
        async with s.get(proxy.url + "/readyz", headers={"Authorization": "Bearer admin-1"}) as r:
            report = await r.json()
    assert report["status"] == "ready" and "upstreams" in report and "redis" in report


def colliding_keys(hex_digits: int) -> tuple[str, str]:
    """Two API keys whose SHA-256 share their first ``hex_digits`` hex digits."""
    seen: dict[str, str] = {}
    for i in itertools.count():
        key = f"sk-collide-{i:08d}"
        prefix = hashlib.sha256(key.encode()).hexdigest()[:hex_digits]
        if prefix in seen:
            return seen[prefix], key
        seen[prefix] = key
    raise AssertionError  # pragma: no cover


async def test_a_fingerprint_collision_shares_no_cached_answer_budget_or_bucket(
    make_proxy: MakeProxy, fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 12-hex collision took 60 s on one core; with 4 hex digits one is found at once, and the
    # display fingerprint is made as short to collide too. The scopes must still differ.
    monkeypatch.setattr(keys, "FINGERPRINT_HEX", 4)
    first, second = colliding_keys(4)
    assert keys.fingerprint(first) == keys.fingerprint(second)
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000", "THRIFTGATE_RPM": "1"})
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "private question"}]}
    async with aiohttp.ClientSession() as s:
        for key in (first, second):
            headers = {"Authorization": f"Bearer {key}"}
            async with s.post(
                proxy.base_url + "/chat/completions", json=body, headers=headers
            ) as r:
                assert r.status == 200  # RPM 1 each: a shared bucket would refuse the second
                assert r.headers["x-thriftgate-cache"] == "MISS"  # never the other key's answer
    assert fake.calls("/v1/chat/completions") == 2
    records = await proxy.usage.wait(2)
    assert records[0]["key"] == records[1]["key"]  # the same display fingerprint...
    secret = proxy.settings.server.scope_secret.encode()
    scopes = [hmac.new(secret, k.encode(), hashlib.sha256).hexdigest() for k in (first, second)]
    assert scopes[0] != scopes[1] and all(len(s) == 64 for s in scopes)  # ...two scopes


async def test_a_keys_table_may_name_the_whole_digest(make_proxy: MakeProxy, tmp_path: Any) -> None:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'[keys."full"]\nfingerprint = "{digest}"\nrpm = 7\n')
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    async with aiohttp.ClientSession() as s:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with s.post(proxy.base_url + "/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
    assert (await proxy.usage.wait(1))[0]["key_alias"] == "full"


async def test_url_user_info_is_basic_auth_only_when_nothing_else_authorises(
    make_proxy: MakeProxy, upstream: TestServer, fake: FakeOpenAI
) -> None:
    base = upstream.make_url("/v1")
    proxy = await make_proxy(
        env={"THRIFTGATE_UPSTREAM_URL": f"http://gw:pw@{base.host}:{base.port}/v1?api-version=1"}
    )
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy.base_url + "/models?limit=2"):
            pass
        async with s.get(proxy.base_url + "/models", headers={"Authorization": "Bearer sk-x-1234"}):
            pass
    first, second = fake.requests[-2:]
    assert first.headers["Authorization"] == "Basic Z3c6cHc="  # gw:pw
    assert first.path == "/v1/models?api-version=1&limit=2"
    assert second.headers["Authorization"] == "Bearer sk-x-1234"
    assert second.path == "/v1/models?api-version=1"
