"""The README's endpoint table, cell by cell: for each paid endpoint, whether the proxy caches,
counts, guards, budgets, rate-limits and prices it, each shown by real calls through the proxy.
The table in the README is checked against ``TABLE`` too, so the two cannot drift apart."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import MakeProxy, Proxy
from fake_openai import AUDIO_BYTES_PER_SECOND, FakeOpenAI
from test_accounting import AUTH, ROOT

# endpoint: (cache, count, guard, budget, rate limit, price) as the README says them
TABLE: dict[str, tuple[str, str, str, str, str, str]] = {
    "/v1/chat/completions": ("yes", "yes", "yes", "reserve, settle", "requests, tokens", "tokens"),
    "/v1/completions": ("yes", "yes", "yes", "reserve, settle", "requests, tokens", "tokens"),
    "/v1/embeddings": ("yes", "yes", "no", "reserve, settle", "requests, tokens", "tokens"),
    "/v1/responses": ("yes", "yes", "yes", "reserve, settle", "requests, tokens", "tokens"),
    "/v1/images/generations": ("no", "no", "no", "reserve, settle", "requests", "tokens or image"),
    "/v1/images/edits": ("no", "no", "no", "probe, settle", "requests", "tokens or image"),
    "/v1/images/variations": ("no", "no", "no", "probe, settle", "requests", "tokens or image"),
    "/v1/audio/speech": ("no", "no", "no", "reserve, settle", "requests", "characters or tokens"),
    "/v1/audio/transcriptions": (
        "no",
        "no",
        "no",
        "probe, settle",
        "requests",
        "minutes or tokens",
    ),
    "/v1/audio/translations": ("no", "no", "no", "probe, settle", "requests", "minutes or tokens"),
    "/v1/responses/input_tokens": ("no", "no", "no", "free", "no", "free"),
}
TEXT = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}
UPLOADS = {
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
}


def body_for(endpoint: str, n: int, *, big_output: bool = False) -> dict[str, Any]:
    """A request for ``endpoint``, different for each ``n`` (so no two share a cache entry)."""
    text = f"request number {n}"
    out = 500_000 if big_output else 16
    return {
        "/v1/chat/completions": {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": out,
        },
        "/v1/completions": {"model": "gpt-3.5-turbo-instruct", "prompt": text, "max_tokens": out},
        "/v1/embeddings": {"model": "text-embedding-3-small", "input": text},
        "/v1/responses": {"model": "gpt-4o", "input": text, "max_output_tokens": out},
        "/v1/images/generations": {"model": "dall-e-2", "prompt": text, "size": "256x256"},
        "/v1/audio/speech": {"model": "tts-1", "voice": "alloy", "input": text},
        "/v1/responses/input_tokens": {"model": "gpt-4o", "input": text},
    }[endpoint]


async def call(
    proxy: Proxy, endpoint: str, n: int, *, big_output: bool = False
) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as s:
        if endpoint in UPLOADS:
            form = aiohttp.FormData()
            image = endpoint.startswith("/v1/images")
            form.add_field("model", "dall-e-2" if image else "whisper-1")
            if endpoint == "/v1/images/edits":
                form.add_field("prompt", f"edit number {n}")
            data = b"\x89PNG" + bytes(n) if image else b"\0" * (AUDIO_BYTES_PER_SECOND * (n + 1))
            name = "image" if image else "file"
            form.add_field(
                name, data, filename="upload.bin", content_type="application/octet-stream"
            )
            request = s.post(proxy.url + endpoint, data=form, headers=AUTH)
        else:
            body = body_for(endpoint, n, big_output=big_output)
            request = s.post(proxy.url + endpoint, json=body, headers=AUTH)
        async with request as r:
            return r.status, r.headers, await r.read()


def upstream_calls(fake: FakeOpenAI, endpoint: str) -> int:
    return fake.calls(endpoint)


@pytest.mark.parametrize("endpoint", TABLE)
async def test_cache(proxy: Proxy, fake: FakeOpenAI, endpoint: str) -> None:
    statuses = [(await call(proxy, endpoint, 1))[:2] for _ in range(2)]
    assert [s for s, _ in statuses] == [200, 200]
    cached = TABLE[endpoint][0] == "yes"
    assert upstream_calls(fake, endpoint) == (1 if cached else 2)
    assert statuses[1][1].get("x-thriftgate-cache") == ("HIT" if cached else None)


@pytest.mark.parametrize("endpoint", TABLE)
async def test_count(proxy: Proxy, endpoint: str) -> None:
    _, headers, _ = await call(proxy, endpoint, 1)
    counted = headers.get("x-thriftgate-prompt-tokens")
    record = (await proxy.usage.wait(1))[-1]
    if TABLE[endpoint][1] == "yes":
        assert int(counted) > 0 and record["prompt_tokens_estimate"] == int(counted)
    else:
        assert counted is None and record["prompt_tokens_estimate"] is None


@pytest.mark.parametrize("endpoint", [e for e in TABLE if e in TEXT])
async def test_guard(proxy: Proxy, fake: FakeOpenAI, endpoint: str) -> None:
    status, _, raw = await call(proxy, endpoint, 1, big_output=True)
    if TABLE[endpoint][2] == "yes":
        assert status == 400
        assert orjson.loads(raw)["error"]["code"] == "context_length_exceeded"
        assert upstream_calls(fake, endpoint) == 0
    else:
        assert status == 200 and upstream_calls(fake, endpoint) == 1


@pytest.mark.parametrize("endpoint", TABLE)
async def test_budget(make_proxy: MakeProxy, fake: FakeOpenAI, endpoint: str) -> None:
    """A USD budget of 20 nano-dollars: a call whose price is known before it is refused before
    it; one known only from its answer goes through once and is refused after."""
    proxy = await make_proxy(env={"THRIFTGATE_USD_PER_DAY": "0.00000002"})
    rule = TABLE[endpoint][3]
    first, _, raw = await call(proxy, endpoint, 1)
    second, headers, raw = await call(proxy, endpoint, 2)
    if rule == "free":
        assert (first, second) == (200, 200)
        return
    if rule.startswith("reserve"):
        assert first == 429 and upstream_calls(fake, endpoint) == 0
    else:  # a probe: priced by the answer, charged after the fact
        assert first == 200 and second == 429 and upstream_calls(fake, endpoint) == 1
    assert headers["x-should-retry"] == "false"
    assert orjson.loads(raw)["error"]["code"] == "insufficient_quota"


@pytest.mark.parametrize("endpoint", TABLE)
async def test_rate_limit(make_proxy: MakeProxy, fake: FakeOpenAI, endpoint: str) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "1", "THRIFTGATE_TPM": "1000000"})
    first = (await call(proxy, endpoint, 1))[0]
    second, _, raw = await call(proxy, endpoint, 2)
    assert first == 200
    if TABLE[endpoint][4] == "no":
        assert second == 200
    else:
        assert second == 429 and orjson.loads(raw)["error"]["code"] == "rate_limit_exceeded"
        assert upstream_calls(fake, endpoint) == 1


@pytest.mark.parametrize("endpoint", TABLE)
async def test_price(proxy: Proxy, endpoint: str) -> None:
    assert (await call(proxy, endpoint, 1))[0] == 200
    record = (await proxy.usage.wait(1))[-1]
    if TABLE[endpoint][5] == "free":
        assert record["cost_usd"] is None
    else:
        assert record["cost_usd"] > 0


def test_the_readme_shows_this_table() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        found = re.match(r"^\| `(POST )(/v1/[^`]+)` \|(.+)\|$", line)
        if found and found.group(2) in TABLE:
            cells = tuple(c.strip() for c in found.group(3).split("|"))
            rows[found.group(2)] = cells[:6]
    assert rows == TABLE
