"""Counting cost: thriftgate's request counting against tiktoken's raw encode, in the same run.

    python bench/tokens.py [--repeat 20]

Measures a 100k-token prompt (tokens per second) and a typical 1k-token chat (per request), each
counted by ``proxy.tokens.count_request`` (the recipe: per-message overhead, names, parts) and by
a bare ``encoding.encode`` of the same text. The chat is counted twice: at first sight (every
text new: the memo of counts emptied before each count) and seen before (the memo holds its texts,
as for a conversation's next turn or a shared system prompt). Prints the overhead of the recipe
over raw encode, and of the admission and budget stages (counting, context guard, a per-key
budget reserved and settled in memory) over raw encode.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy import tokens
from proxy.admission import AdmissionStage
from proxy.budget import BudgetStage
from proxy.config import load_settings
from proxy.context import CTX, RequestContext
from proxy.keys import Keys
from proxy.metrics import Metrics
from proxy.outcome import conclude
from proxy.pricing import PriceTable

WORDS = [
    "the",
    "proxy",
    "counts",
    "tokens",
    "before",
    "each",
    "call",
    "so",
    "budgets",
    "and",
    "context",
    "limits",
    "hold",
    "while",
    "streams",
    "pass",
    "through",
    "untouched",
    "and",
    "cached",
    "answers",
    "come",
    "back",
    "byte",
    "for",
    "byte",
]


def text(n_words: int, seed: int) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n_words))


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    enc = tokens.encoding("o200k_base")

    big = text(100_000, 1)
    big_body = {"model": "gpt-4o", "messages": [{"role": "user", "content": big}]}
    n_big = len(enc.encode(big))
    raw_big = best(lambda: enc.encode(big), args.repeat)
    ours_big = best(lambda: tokens.count_request("/v1/chat/completions", big_body), args.repeat)

    chat = [
        {"role": "system", "content": text(60, 2)},
        *[
            {"role": "user" if i % 2 == 0 else "assistant", "content": text(70, 10 + i)}
            for i in range(12)
        ],
    ]
    chat_body = {"model": "gpt-4o", "messages": chat}
    joined = [m["content"] for m in chat]
    n_chat = tokens.count_request("/v1/chat/completions", chat_body).tokens
    loops = 200
    raw_chat = best(lambda: [enc.encode(t) for _ in range(loops) for t in joined], 5) / loops

    def first_sight() -> None:
        for _ in range(loops):
            tokens.text_counts.cache_clear()  # a new, empty memo
            tokens.count_request("/v1/chat/completions", chat_body)

    ours_chat = best(first_sight, 5) / loops
    seen = (
        best(
            lambda: [tokens.count_request("/v1/chat/completions", chat_body) for _ in range(loops)],
            5,
        )
        / loops
    )

    stage_chat = asyncio.run(stage_per_request(chat_body, loops))

    print(
        f"100k-token prompt ({n_big} tokens): raw encode {n_big / raw_big:,.0f} tokens/s, "
        f"count_request {n_big / ours_big:,.0f} tokens/s, overhead "
        f"{(ours_big / raw_big - 1) * 100:+.1f}%"
    )
    print(
        f"typical chat ({n_chat} tokens, {len(chat)} messages): raw encode "
        f"{raw_chat * 1e6:.0f} us, count_request at first sight {ours_chat * 1e6:.0f} us "
        f"(overhead {(ours_chat / raw_chat - 1) * 100:+.1f}%), seen before {seen * 1e6:.1f} us "
        f"({raw_chat / seen:.0f}x faster than raw encode)"
    )
    print(
        f"admission and budget stages per chat request, texts seen before (count, guard, "
        f"reserve, settle): "
        f"{stage_chat * 1e6:.0f} us, "
        f"overhead over raw encode {(stage_chat / raw_chat - 1) * 100:+.1f}%"
    )
    return 0


async def stage_per_request(body: dict[str, object], loops: int) -> float:
    """The admission and budget stages' own work for one request, a budget configured, the
    answer instant."""
    settings = load_settings(env={"THRIFTGATE_TOKENS_PER_DAY": str(10**15)})
    prices = PriceTable()
    admission = AdmissionStage(tokens.Catalogue())
    budget = BudgetStage(Keys(settings), prices, settings.budget, Metrics())
    answer = web.Response(body=b"{}")

    async def inner(request: web.Request) -> web.StreamResponse:
        return answer

    async def handler(request: web.Request) -> web.StreamResponse:
        return await budget(request, inner)

    stage = admission

    raw = repr(body).encode()
    request = make_mocked_request("POST", "/v1/chat/completions")

    async def once() -> None:
        ctx = RequestContext("id", 0.0, "POST", "/v1/chat/completions", "0123456789ab")
        ctx.optimised, ctx.raw, ctx.body, ctx.model = True, raw, body, "gpt-4o"
        request[CTX] = ctx
        await stage(request, handler)
        outcome = conclude(ctx, prices, status=200, error=None, latency_ms=1.0)
        for settle in ctx.settlers:
            settle(outcome)

    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(loops):
            await once()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times)


if __name__ == "__main__":
    raise SystemExit(main())
