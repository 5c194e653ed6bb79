"""Token counting with tiktoken, fully offline.

The two encodings today's OpenAI models use (o200k_base, cl100k_base) ship inside the package as
gzip copies of the files tiktoken would download; they are checked against the SHA-256 tiktoken
pins, so no network is ever needed. Counting itself is built on ``encoding()``.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
from importlib import resources

import tiktoken

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# Pattern, special tokens and pinned hash of each encoding, as in tiktoken_ext/openai_public.py.
_ENCODINGS: dict[str, tuple[str, dict[str, int], str]] = {
    "o200k_base": (
        "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
        r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        {
            ENDOFTEXT: 100257,
            FIM_PREFIX: 100258,
            FIM_MIDDLE: 100259,
            FIM_SUFFIX: 100260,
            ENDOFPROMPT: 100276,
        },
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}


class EncodingDataError(RuntimeError):
    """A shipped encoding file is missing or does not match tiktoken's pinned checksum."""


def load_ranks(name: str) -> dict[bytes, int]:
    """The BPE ranks of a shipped encoding, verified against tiktoken's pinned SHA-256."""
    if name not in _ENCODINGS:
        raise KeyError(f"unknown encoding {name!r}; shipped: {', '.join(sorted(_ENCODINGS))}")
    expected = _ENCODINGS[name][2]
    try:
        packed = resources.files("proxy").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except FileNotFoundError:
        raise EncodingDataError(f"{name}.tiktoken.gz is missing from the package") from None
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != expected:
        raise EncodingDataError(f"{name}.tiktoken.gz does not match tiktoken's pinned checksum")
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    """A tiktoken Encoding built from the shipped files (cached per process, immutable)."""
    pat_str, special, _ = _ENCODINGS[name]
    return tiktoken.Encoding(
        name=name, pat_str=pat_str, mergeable_ranks=load_ranks(name), special_tokens=special
    )
