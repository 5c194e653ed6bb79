"""/metrics: Prometheus text that prometheus-client's own parser reads, matching the usage log."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
from conftest import API_KEY, MakeProxy, Proxy
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import MAX_MODELS, Metrics


async def scrape(proxy: Proxy, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics", headers=headers) as r:
        return r.status, await r.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_tokens_cost_and_latency(proxy: Proxy) -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "meter me"}]}
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        await client.chat.completions.create(**chat)
        await client.chat.completions.create(**chat)  # a cache hit
        stream = await client.chat.completions.create(
            **{**chat, "messages": [{"role": "user", "content": "stream"}]},
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in stream:
            pass
    records = await proxy.usage.wait(3)
    status, text = await scrape(proxy)
    assert status == 200
    found = samples(text)
    ep = "/v1/chat/completions"

    def requests(cache: str) -> float:
        return value(
            found,
            "thriftgate_requests_total",
            endpoint=ep,
            model="gpt-4o-mini",
            status="200",
            cache=cache,
        )

    assert requests("miss") == 2
    assert requests("hit") == 1
    prompt = sum(r["prompt_tokens"] for r in records)
    completion = sum(r["completion_tokens"] for r in records)
    assert value(found, "thriftgate_tokens_total", model="gpt-4o-mini", kind="prompt") == prompt
    assert value(found, "thriftgate_tokens_total", model="gpt-4o-mini", kind="completion") == (
        completion
    )
    cost = sum(r["cost_usd"] for r in records)
    assert abs(value(found, "thriftgate_cost_usd_total", model="gpt-4o-mini") - cost) < 1e-12
    assert (
        value(found, "thriftgate_saved_usd_total", model="gpt-4o-mini") == records[1]["saved_usd"]
    )
    assert value(found, "thriftgate_request_duration_seconds_count", endpoint=ep) == 3
    assert value(found, "thriftgate_request_duration_seconds_bucket", endpoint=ep, le="+Inf") == 3
    assert value(found, "thriftgate_ttft_seconds_count", endpoint=ep) == 1
    assert value(found, "thriftgate_cache_events_total", event="hit") == 1


async def test_admin_token_protects_metrics(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_ADMIN_TOKEN": "s3cret"})
    status, text = await scrape(proxy)
    assert status == 401 and '"code":"invalid_admin_token"' in text
    assert (await scrape(proxy, {"Authorization": "Bearer wrong"}))[0] == 401
    status, text = await scrape(proxy, {"Authorization": "Bearer s3cret"})
    assert status == 200 and "thriftgate_requests_total" in text


def test_model_labels_are_bounded() -> None:
    m = Metrics()
    for i in range(MAX_MODELS + 50):
        m.observe_request({"endpoint": "/v1/chat/completions", "model": f"m{i}", "status": 200})
    assert len({key[1] for key in m.requests}) == MAX_MODELS + 1
    assert m.requests[("/v1/chat/completions", "other", "200", "")] == 50
