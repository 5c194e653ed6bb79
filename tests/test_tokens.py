"""The tiktoken encodings ship inside the package and load without any network."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import tiktoken_ext.openai_public as public

from proxy import tokens
from proxy.keys import fingerprint

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken"


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_shipped_encoding_matches_tiktokens_own_definition(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pat_str, special, expected_hash = tokens._ENCODINGS[name]
    pinned: list[str | None] = []

    def offline(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        pinned.append(expected_hash)  # instead of downloading, answer with the shipped ranks
        return tokens.load_ranks(name)

    monkeypatch.setattr(public, "load_tiktoken_bpe", offline)
    theirs = getattr(public, name)()
    assert pinned == [expected_hash]
    assert theirs["pat_str"] == pat_str
    assert theirs["special_tokens"] == special
    enc = tokens.encoding(name)
    assert enc.name == name
    assert enc.decode(enc.encode("Hello, world! 123 — ünïcode")) == "Hello, world! 123 — ünïcode"
    assert enc.encode("<|endoftext|>", allowed_special="all") == [special["<|endoftext|>"]]


def test_known_token_ids() -> None:
    # ids published in OpenAI's cookbook and in tiktoken's own test vectors
    assert tokens.encoding("cl100k_base").encode("tiktoken is great!") == [
        83,
        1609,
        5963,
        374,
        2294,
        0,
    ]
    assert tokens.encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert tokens.encoding("o200k_base").encode("hello world") == [24912, 2375]
    assert tokens.encoding("o200k_base").encode(" 日本語とEnglish 12345!\n") == [
        17428,
        40909,
        5330,
        28881,
        220,
        7633,
        2548,
        4175,
    ]


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/tiktoken is not beside the checkout")
@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_shipped_copy_is_byte_identical_to_shared(name: str) -> None:
    ranks = tokens.load_ranks(name)
    raw = (SHARED / f"{name}.tiktoken").read_bytes()
    assert len(ranks) == len(raw.splitlines())
    assert hashlib.sha256(raw).hexdigest() == tokens._ENCODINGS[name][2]


def test_unknown_encoding() -> None:
    with pytest.raises(KeyError):
        tokens.load_ranks("p50k_base")


# -- counting: OpenAI's recipes, the cookbook's worked examples ---------------------------------

JARGON = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
WEATHER = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.mark.parametrize(
    ("model", "expected"),
    [("gpt-4", 129), ("gpt-3.5-turbo", 129), ("gpt-4o", 124), ("gpt-4o-mini", 124)],
)
def test_cookbook_messages_example(model: str, expected: int) -> None:
    count = tokens.count_request("/v1/chat/completions", {"model": model, "messages": JARGON})
    assert count.tokens == expected
    assert not count.approximate


@pytest.mark.parametrize(("model", "expected"), [("gpt-4", 105), ("gpt-4o", 101)])
def test_cookbook_tools_example(model: str, expected: int) -> None:
    body = {"model": model, "messages": WEATHER, "tools": WEATHER_TOOLS}
    assert tokens.count_request("/v1/chat/completions", body).tokens == expected


def test_model_table_prefixes_and_unknown_models() -> None:
    assert tokens.encoding_name_for("gpt-4o-2024-08-06") == ("o200k_base", False)
    assert tokens.encoding_name_for("gpt-4-0613") == ("cl100k_base", False)
    assert tokens.encoding_name_for("gpt-5-mini") == ("o200k_base", False)
    assert tokens.encoding_name_for("text-embedding-3-small") == ("cl100k_base", False)
    assert tokens.encoding_name_for("my-local-llama") == ("o200k_base", True)
    assert tokens.encoding_name_for(None) == ("o200k_base", True)
    count = tokens.count_request(
        "/v1/chat/completions", {"model": "mystery", "messages": [{"role": "user", "content": "x"}]}
    )
    assert count.approximate


def test_content_parts_and_images() -> None:
    def parts(*content: dict[str, object]) -> int:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": list(content)}]}
        return tokens.count_request("/v1/chat/completions", body).tokens

    text_only = parts({"type": "text", "text": "What is in this image?"})
    plain = tokens.count_request(
        "/v1/chat/completions",
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "What is in this image?"}]},
    ).tokens
    assert text_only == plain
    low = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    high = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert parts({"type": "text", "text": "What is in this image?"}, low) == text_only + 85
    assert parts({"type": "text", "text": "What is in this image?"}, high) == text_only + 765


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([15339, 1917, 0], 3),
        ([[1, 2], [3, 4, 5]], 5),
    ],
)
def test_embeddings_input_shapes(value: object, expected: int) -> None:
    body = {"model": "text-embedding-3-small", "input": value}
    assert tokens.count_request("/v1/embeddings", body).tokens == expected


async def test_large_prompts_are_counted_off_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 40_000}]}
    seen: list[str] = []
    original = tokens.count_request

    def spy(*args: Any) -> tokens.Count:
        seen.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(tokens, "count_request", spy)
    big = await tokens.count_request_async("/v1/chat/completions", body, size=200_000)
    small = await tokens.count_request_async("/v1/chat/completions", body, size=100)
    assert big == small and big.tokens > 40_000
    assert seen[0] != threading.current_thread().name  # a worker thread
    assert seen[1] == threading.current_thread().name  # small: counted in place


def test_tokens_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    request = tmp_path / "req.json"
    request.write_text(json.dumps({"model": "gpt-4", "messages": JARGON}))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request)], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout.startswith("129 prompt tokens: /v1/chat/completions, gpt-4, cl100k_base")
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request), "--model", "gpt-4o"],
        capture_output=True,
        text=True,
    )
    assert out.stdout.startswith("124 prompt tokens")
    # gpt-4o: $2.50 per 1M input tokens, $10 per 1M output
    assert "estimated input cost: $0.000310" in out.stdout
    request.write_text(json.dumps({"model": "gpt-4o", "messages": JARGON, "max_tokens": 1000}))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request)], capture_output=True, text=True
    )
    assert "at most $0.010310 with 1000 output tokens" in out.stdout
    responses = {"model": "gpt-4o", "input": "hello", "previous_response_id": "resp_1"}
    request.write_text(json.dumps(responses))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request)], capture_output=True, text=True
    )
    expected = tokens.count_request("/v1/responses", responses).tokens
    assert out.stdout.startswith(
        f"{expected} prompt tokens (partial: earlier state is not counted): /v1/responses, gpt-4o"
    )
    request.write_text(json.dumps({"model": "text-embedding-3-small", "input": "hello"}))
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request)], capture_output=True, text=True
    )
    assert "/v1/embeddings" in out.stdout
    request.write_text("[1, 2]")
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "tokens", str(request)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "must hold a JSON object" in bad.stderr


def test_fingerprint_cli() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "proxy", "fingerprint"],
        input="Bearer sk-test-0123456789abcdef\n",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert out.stdout.strip() == fingerprint("sk-test-0123456789abcdef")
    assert "sk-test" not in out.stdout + out.stderr


def test_one_token_roles() -> None:
    for name in ("o200k_base", "cl100k_base"):
        enc = tokens.encoding(name)
        for role in tokens.ONE_TOKEN_ROLES:
            assert len(enc.encode(role)) == 1, (name, role)


def _prose(n: int, seed: int) -> str:
    import random

    words = ["the", "proxy", "counts", "tokens", "of", "every", "long", "système", "prompt", "😀"]
    rnd = random.Random(seed)
    return " ".join(rnd.choice(words) for _ in range(n))


def test_a_conversation_counted_again_encodes_only_its_new_text() -> None:
    enc = tokens.encoding("o200k_base")
    memo = tokens.text_counts("o200k_base")
    system = _prose(400, 1)  # a long system prompt, sent with every turn
    turns = [_prose(120, seed) for seed in range(2, 8)]
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "system", "content": system}]}
    for i, turn in enumerate(turns):
        body["messages"].append({"role": "user" if i % 2 == 0 else "assistant", "content": turn})
        held = len(memo)
        count = tokens.count_request("/v1/chat/completions", body)
        texts = [m["content"] for m in body["messages"]]
        # the recipe's count, as if every text were encoded afresh
        fresh = 3 + sum(3 + 1 + len(enc.encode_ordinary(t)) for t in texts)
        assert count.tokens == fresh
        assert len(memo) == held + (2 if i == 0 else 1)  # only the new message was encoded


def test_the_count_memo_is_bounded_and_keeps_the_most_recent() -> None:
    enc = tokens.encoding("cl100k_base")
    memo = tokens.TextCounts(enc, limit=3 * 1000)
    texts = [_prose(200, seed) for seed in range(20)]  # each well over MEMO_MIN_CHARS
    for text in texts:
        assert len(text) >= tokens.MEMO_MIN_CHARS
        assert memo(text) == len(enc.encode_ordinary(text))
    assert memo.chars <= 3 * 1000
    assert 1 <= len(memo) <= 3
    assert memo(texts[-1]) == len(enc.encode_ordinary(texts[-1]))  # the newest is still held
    assert memo.chars == sum(len(t) for t in texts[-len(memo) :])
    held = len(memo)
    short = "a short text"
    assert memo(short) == len(enc.encode_ordinary(short))
    assert len(memo) == held  # not remembered: cheaper to encode than to look up
