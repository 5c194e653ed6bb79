"""Embeddings micro-batching: concurrent requests merged upstream, each answer its own."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import aiohttp
import openai
import orjson
from conftest import API_KEY, MakeProxy, Proxy
from conftest import AUTH_NO_STORE as AUTH
from fake_openai import FakeOpenAI, Fault

from proxy.app import part
from proxy.microbatch import EmbeddingsBatcher, flatten, shares

ON = {"THRIFTGATE_EMBEDDINGS_MICROBATCH": "1", "THRIFTGATE_MICROBATCH_WINDOW_MS": "50"}


async def embed(proxy: Proxy, body: dict[str, Any], key: str = API_KEY) -> tuple[int, Any]:
    headers = {**AUTH, "Authorization": f"Bearer {key}", "x-thriftgate-max-retries": "0"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/embeddings", json=body, headers=headers) as r,
    ):
        return r.status, orjson.loads(await r.read())


def body(value: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "text-embedding-3-small", "input": value, **extra}


def test_flatten_and_shares() -> None:
    assert flatten("a") == ("text", ["a"])
    assert flatten(["a", "b"]) == ("text", ["a", "b"])
    assert flatten([1, 2, 3]) == ("tokens", [[1, 2, 3]])
    assert flatten([[1], [2, 3]]) == ("tokens", [[1], [2, 3]])
    assert flatten([]) is None and flatten(["a", 1]) is None and flatten(None) is None
    assert shares(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(shares(1001, [7, 13, 2, 9])) == 1001
    assert shares(0, [3, 4]) == [0, 0]
    assert shares(5, [0, 0]) == [3, 2]


async def test_concurrent_requests_make_far_fewer_upstream_calls(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    plain = await make_proxy()
    texts = [f"sentence number {i}" for i in range(30)]
    unbatched = [await embed(plain, body(t)) for t in texts]
    assert fake.embedding_calls == 30
    fake.embedding_calls = 0
    proxy = await make_proxy(env=ON)
    batched = await asyncio.gather(*(embed(proxy, body(t)) for t in texts))
    assert fake.embedding_calls < 5  # 30 requests in a 50 ms window: one or a few calls
    for (s1, one), (s2, merged) in zip(unbatched, batched, strict=True):
        assert s1 == s2 == 200
        assert merged["data"] == one["data"]  # same vector, index 0, as if sent alone
        assert merged["model"] == one["model"]
    upstream_total = sum(
        max(1, len(t) // 4) for t in texts
    )  # the fake's own usage rule, summed over the merged calls
    assert sum(m["usage"]["prompt_tokens"] for _, m in batched) == upstream_total
    records = await proxy.usage.wait(30)
    merged = [r for r in records if "microbatch" in r]
    assert merged and all(r["microbatch"]["merged_requests"] > 1 for r in merged)
    assert part(proxy.app, EmbeddingsBatcher).merged_requests == len(merged)


async def test_each_client_keeps_its_order_and_format(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    plain = await make_proxy()
    proxy = await make_proxy(env=ON)
    requests = [
        body(["x one", "x two", "x three"]),
        body("y alone"),
        body(["z a", "z b"]),
    ]
    alone = [await embed(plain, r) for r in requests]
    fake.embedding_calls = 0
    together = await asyncio.gather(*(embed(proxy, r) for r in requests))
    assert fake.embedding_calls == 1
    for (_, a), (_, b) in zip(alone, together, strict=True):
        assert b["data"] == a["data"]
        assert [d["index"] for d in b["data"]] == list(range(len(a["data"])))
    # base64 and token-id inputs only merge with their own kind
    fake.embedding_calls = 0
    kinds = [
        body("b64 one", encoding_format="base64"),
        body("b64 two", encoding_format="base64"),
        body([101, 102, 103]),
        body([[7, 8], [9]]),
    ]
    results = await asyncio.gather(*(embed(proxy, r) for r in kinds))
    assert fake.embedding_calls == 2
    assert all(status == 200 for status, _ in results)
    vec = base64.b64decode(results[0][1]["data"][0]["embedding"])
    assert len(vec) == 64 * 4
    assert [len(r["data"]) for _, r in results] == [1, 1, 1, 2]


async def test_keys_are_never_merged_together(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env=ON)
    await asyncio.gather(
        embed(proxy, body("for a"), key="sk-key-aaaa"),
        embed(proxy, body("for b"), key="sk-key-bbbb"),
    )
    assert fake.embedding_calls == 2  # one each, each alone in its window: bytes untouched
    assert [r.headers["Authorization"] for r in fake.requests] in (
        ["Bearer sk-key-aaaa", "Bearer sk-key-bbbb"],
        ["Bearer sk-key-bbbb", "Bearer sk-key-aaaa"],
    )


async def test_a_failed_merged_call_is_retried_per_client(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env=ON)
    fake.fail_next(Fault(status=500))  # the merged call fails
    results = await asyncio.gather(*(embed(proxy, body(f"t{i}")) for i in range(4)))
    assert [status for status, _ in results] == [200] * 4
    assert fake.embedding_calls == 4  # the merged call (failed, uncounted) then one each
    assert fake.calls("/v1/embeddings") == 5


async def test_the_sdk_gets_its_vectors(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env=ON)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        answers = await asyncio.gather(
            *(
                client.embeddings.create(model="text-embedding-3-small", input=f"s{i}")
                for i in range(8)
            )
        )
    assert fake.embedding_calls < 8
    assert all(len(a.data) == 1 and len(a.data[0].embedding) == 64 for a in answers)
