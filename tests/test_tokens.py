"""The tiktoken encodings ship inside the package and load without any network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as public

from proxy import tokens

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
