"""Token counting with tiktoken, fully offline.

The two encodings today's OpenAI models use (o200k_base, cl100k_base) ship inside the package as
gzip copies of the files tiktoken would download; they are checked against the SHA-256 tiktoken
pins, so no network is ever needed. Counting follows OpenAI's published recipes (the cookbook's
"How to count tokens with tiktoken").
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import hashlib
import json
import math
import threading
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tiktoken
import tiktoken.model
from aiohttp import web

from proxy.config import ModelInfo, parse_models
from proxy.endpoints import RESPONSES
from proxy.types import Part, PrefixTable

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


# Texts of these lengths (in characters) have their counts remembered: shorter ones cost about
# as much to look up as to encode; longer ones are rarely sent again whole.
MEMO_MIN_CHARS, MEMO_MAX_CHARS = 256, 64 * 1024
MEMO_CHARS = 4 * 1024 * 1024  # a memo's bound: the characters it holds (at most 16 MiB of text)


class TextCounts:
    """Token counts of long texts already seen, for one encoding: a system prompt comes with every
    request, and a conversation sends all its earlier messages again with each turn, so only the
    new text is encoded. Bounded by the characters it holds (least recently used out first);
    thread-safe (large bodies are counted in a worker thread)."""

    def __init__(self, enc: tiktoken.Encoding, limit: int = MEMO_CHARS) -> None:
        self.enc = enc
        self.limit = limit
        self.chars = 0
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._counts)

    def __call__(self, text: str) -> int:
        size = len(text)
        if size < MEMO_MIN_CHARS or size > MEMO_MAX_CHARS:
            return len(self.enc.encode_ordinary(text))
        counts = self._counts
        with self._lock:
            known = counts.pop(text, None)
            if known is not None:
                counts[text] = known  # now the most recently used
                return known
        tokens = len(self.enc.encode_ordinary(text))
        with self._lock:
            if text not in counts:
                counts[text] = tokens
                self.chars += size
                while self.chars > self.limit:
                    oldest = next(iter(counts))
                    self.chars -= len(oldest)
                    del counts[oldest]
        return tokens


@functools.cache
def text_counts(name: str) -> TextCounts:
    """The memo of ``name``'s counts (one per encoding and process, like the encoding itself)."""
    return TextCounts(encoding(name))


def preload_encodings() -> None:
    """Load every shipped encoding now (each is cached for the life of the process)."""
    for name in _ENCODINGS:
        encoding(name)


class Encodings(Part):
    """The tiktoken encodings, loaded (off the event loop) before the port is bound: the first
    request is not the one that waits for them."""

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        await asyncio.to_thread(preload_encodings)
        yield


# -- counting ------------------------------------------------------------------------------------

# Above this many bytes of request body, counting runs in a worker thread, off the event loop.
OFF_LOOP_BYTES = 64 * 1024

# OpenAI's image rule: 85 tokens for "detail": "low"; otherwise 85 + 170 per 512 px tile of the
# image scaled to fit 2048x2048 and then to a shortest side of 768. The size of an image given by
# URL is unknown before the call: it is counted as 1024x1024 (4 tiles, 765 tokens).
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
DEFAULT_IMAGE_SIZE = (1024, 1024)

# The cookbook's per-function constants for tool definitions ("How to count tokens with tiktoken").
_TOOL_CONSTANTS = {
    "o200k_base": {"func_init": 7, "prop_init": 3, "prop_key": 3, "enum_init": -3, "enum_item": 3},
    "cl100k_base": {
        "func_init": 10,
        "prop_init": 3,
        "prop_key": 3,
        "enum_init": -3,
        "enum_item": 3,
    },
}
_FUNC_END = 12


@dataclass(frozen=True, slots=True)
class Count:
    tokens: int
    encoding: str
    approximate: bool  # the model is unknown (o200k_base assumed), or parts were estimated
    parts_estimated: bool = False  # images (size unknown) or audio/files: not countable exactly
    # a Responses request built on earlier state (``previous_response_id``, ``conversation``,
    # item references): only what it sends is counted, a lower bound of its prompt
    partial: bool = False
    # the tokens of each chat message (each Responses ``input`` item) of a long conversation
    # (more than SIZES_FROM of them; else empty): what trimming it would save (``proxy.whatif``)
    sizes: tuple[int, ...] = ()

    @property
    def source(self) -> str:
        """How far the count can be trusted: exact, approximate, or partial (a lower bound)."""
        return "partial" if self.partial else "approximate" if self.approximate else "exact"


@functools.lru_cache(maxsize=1024)
def encoding_name_for(model: str | None) -> tuple[str, bool]:
    """tiktoken's own model table (exact name, then prefix); an unknown model, or one whose
    encoding is not shipped, falls back to o200k_base and is flagged approximate."""
    name = None
    if model:
        name = tiktoken.model.MODEL_TO_ENCODING.get(model)
        if name is None:
            for prefix, enc in tiktoken.model.MODEL_PREFIX_TO_ENCODING.items():
                if model.startswith(prefix):
                    name = enc
                    break
    if name in _ENCODINGS:
        return name, False
    return "o200k_base", True


def image_tokens(part: dict[str, Any]) -> int:
    image = part.get("image_url")
    detail = image.get("detail", "auto") if isinstance(image, dict) else part.get("detail", "auto")
    if detail == "low":
        return IMAGE_BASE_TOKENS
    width, height = DEFAULT_IMAGE_SIZE
    scale = min(1.0, 2048 / max(width, height))
    width, height = width * scale, height * scale
    scale = 768 / min(width, height)
    width, height = width * scale, height * scale
    tiles = math.ceil(width / 512) * math.ceil(height / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


# Each of these is one token in both encodings (checked in the tests).
ONE_TOKEN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "function"})


def _text(enc: tiktoken.Encoding, value: Any) -> int:
    """Tokens of a value as the model sees it (special-token text counts as ordinary text)."""
    if isinstance(value, str):
        return text_counts(enc.name)(value)
    if value is None:
        return 0
    return len(enc.encode_ordinary(json.dumps(value, separators=(",", ":"))))


SIZES_FROM = 5  # a conversation longer than this has its messages' sizes kept (``Count.sizes``)


def count_messages(
    enc: tiktoken.Encoding, messages: list[Any], sizes: list[int] | None = None
) -> tuple[int, bool]:
    """OpenAI's recipe: 3 tokens per message, 1 per name, 3 to prime the reply. ``sizes``: each
    message's tokens are appended to it (0 for what is not a message)."""
    total, approximate = 3, False
    for message in messages:
        if sizes is not None:
            sizes.append(total)  # turned into this message's own tokens by _own_sizes
        if not isinstance(message, dict):
            continue
        total += 3
        for key, value in message.items():
            if key == "content" and isinstance(value, list):
                for part in value:
                    if not isinstance(part, dict):
                        continue
                    kind = part.get("type")
                    if kind in ("text", "input_text", "output_text", "refusal"):
                        total += _text(enc, part.get("text", part.get("refusal")))
                    elif kind in ("image_url", "input_image"):
                        total += image_tokens(part)
                        approximate = True
                    else:  # audio, files: not countable from the request
                        approximate = True
            elif key == "role" and value in ONE_TOKEN_ROLES:
                total += 1
            else:
                total += _text(enc, value)
            if key == "name":
                total += 1
    _own_sizes(sizes, total)
    return total, approximate


def _own_sizes(sizes: list[int] | None, total: int) -> None:
    """``sizes`` holds the running total before each element: make it each element's own."""
    if sizes is not None:
        ends = [*sizes[1:], total]
        sizes[:] = [end - start for start, end in zip(sizes, ends, strict=True)]


def count_tools(enc: tiktoken.Encoding, tools: list[Any]) -> int:
    """Tool (function) definitions, with the cookbook's per-function constants."""
    c = _TOOL_CONSTANTS[enc.name]
    total = 0
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict):
            continue
        total += c["func_init"]
        desc = str(fn.get("description", "")).removesuffix(".")
        total += _text(enc, f"{fn.get('name', '')}:{desc}")
        properties = (fn.get("parameters") or {}).get("properties") or {}
        if properties:
            total += c["prop_init"]
            for key, prop in properties.items():
                total += c["prop_key"]
                prop = prop if isinstance(prop, dict) else {}
                if "enum" in prop:
                    total += c["enum_init"]
                    for item in prop["enum"]:
                        total += c["enum_item"] + _text(enc, str(item))
                p_desc = str(prop.get("description", "")).removesuffix(".")
                total += _text(enc, f"{key}:{prop.get('type', '')}:{p_desc}")
    return total + (_FUNC_END if tools else 0)


# Responses input items that carry no text of their own but point at stored state
_REFERENCE_ITEMS = frozenset({"item_reference"})


def count_items(
    enc: tiktoken.Encoding, items: list[Any], sizes: list[int] | None = None
) -> tuple[int, bool, bool]:
    """A Responses ``input`` list: messages are counted as chat messages (3 tokens each, 1 for the
    role, their parts); function calls by name and arguments, their outputs by text, any other
    item by its JSON (approximate). Returns (tokens, parts estimated, partial). ``sizes``: each
    item's tokens are appended to it."""
    total, estimated, partial = 0, False, False
    for item in items:
        if sizes is not None:
            sizes.append(total)
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" or (kind is None and "role" in item):
            tokens, approx = count_messages(enc, [{k: v for k, v in item.items() if k in _MSG}])
            total += tokens - 3  # count_messages primes a reply: once per request here
            estimated |= approx
        elif kind == "function_call":
            total += 3 + _text(enc, item.get("name")) + _text(enc, item.get("arguments"))
        elif kind == "function_call_output":
            output = item.get("output")
            if isinstance(output, list):
                tokens, approx = count_messages(enc, [{"content": output}])
                total += tokens - 3
                estimated |= approx
            else:
                total += 3 + _text(enc, output)
        elif kind in _REFERENCE_ITEMS:
            partial = True
        else:  # reasoning, tool calls of built-in tools, ...: their JSON, as an estimate
            total += 3 + _text(enc, {k: v for k, v in item.items() if k != "id"})
            estimated = True
    _own_sizes(sizes, total)
    return total, estimated, partial


_MSG = frozenset({"role", "content", "name"})


def count_responses(
    enc: tiktoken.Encoding, body: dict[str, Any], sizes: list[int] | None = None
) -> tuple[int, bool, bool]:
    """A Responses request: ``instructions`` as a system message, ``input`` (a string is one user
    message; a list is items), the tools, the structured-output schema, 3 tokens to prime the
    reply. (tokens, parts estimated, partial)."""
    total, estimated = 3, False
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += 4 + _text(enc, instructions)
    value = body.get("input")
    if isinstance(value, str):
        total += 4 + _text(enc, value)
    partial = isinstance(body.get("previous_response_id"), str) or body.get("conversation") not in (
        None,
        "",
    )
    for items in (instructions, value):
        if isinstance(items, list):
            tokens, approx, refers = count_items(enc, items, sizes if items is value else None)
            total += tokens
            estimated |= approx
            partial |= refers
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        functions, others = [], []
        for tool in tools:
            if isinstance(tool, dict):
                function = tool.get("type", "function") == "function"
                (functions if function else others).append(tool)
        if functions:
            total += count_tools(enc, functions)
        if others:  # built-in tools (web search, file search, MCP, ...): their JSON, estimated
            total += _text(enc, others)
            estimated = True
    text = body.get("text")
    fmt = text.get("format") if isinstance(text, dict) else None
    if isinstance(fmt, dict) and fmt.get("schema") is not None:
        total += _text(enc, fmt.get("schema"))
    return total, estimated, partial


def count_embeddings_input(enc: tiktoken.Encoding, value: Any) -> int:
    """A string, a list of strings, a token-id array (its length), or a list of those."""
    if isinstance(value, str):
        return _text(enc, value)
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(count_embeddings_input(enc, v) for v in value)
    return 0


def _dicts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def _tool_problem(tools: Any, field: str) -> str | None:
    if not _dicts(tools):
        return field
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if not isinstance(fn, dict):
            return f"{field}[{i}].function"
        params = fn.get("parameters")
        if params is None:
            continue
        if not isinstance(params, dict):
            return f"{field}[{i}].function.parameters"
        props = params.get("properties")
        if props is not None and not isinstance(props, dict):
            return f"{field}[{i}].function.parameters.properties"
        for name, prop in (props or {}).items():
            if isinstance(prop, dict) and "enum" in prop and not isinstance(prop["enum"], list):
                return f"{field}[{i}].function.parameters.properties.{name}.enum"
    return None


def _items_problem(items: Any, field: str) -> str | None:
    if not _dicts(items):
        return field
    for i, item in enumerate(items):
        content = item.get("content")
        if content is not None and not isinstance(content, str) and not _dicts(content):
            return f"{field}[{i}].content"
        output = item.get("output")
        is_output = item.get("type") == "function_call_output" and output is not None
        if is_output and not isinstance(output, str) and not _dicts(output):
            return f"{field}[{i}].output"
    return None


def unreadable_field(endpoint: str, body: dict[str, Any]) -> str | None:
    """The first field of a request body the counter cannot read as OpenAI defines it (a wrong
    type), or None. OpenAI refuses such a body itself; the proxy only needs to know not to act
    on it."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        return "model"
    if endpoint == RESPONSES:
        for field in ("instructions", "input"):
            value = body.get(field)
            if value is None or isinstance(value, str):
                continue
            problem = _items_problem(value, field)
            if problem is not None:
                return problem
        tools = body.get("tools")
        if tools is not None:
            if not _dicts(tools):
                return "tools"
            functions = [t for t in tools if t.get("type", "function") == "function"]
            return _tool_problem(functions, "tools")
        return None
    if endpoint.endswith("/embeddings"):
        value = body.get("input")
        return None if value is None or isinstance(value, str | list) else "input"
    if endpoint.endswith("/completions") and "messages" not in body:
        value = body.get("prompt")
        return None if value is None or isinstance(value, str | list) else "prompt"
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list):
            return "messages"
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                return "messages"
            content = message.get("content")
            if content is not None and not isinstance(content, str) and not _dicts(content):
                return f"messages[{i}].content"
    for field in ("tools", "functions"):
        tools = body.get(field)
        if tools is not None:
            problem = _tool_problem(tools, field)
            if problem is not None:
                return problem
    return None


class Uncountable(ValueError):
    """A body the counter cannot read (``param``: the field, or "body")."""

    def __init__(self, param: str) -> None:
        super().__init__(param)
        self.param = param


def count_request(endpoint: str, body: dict[str, Any], model: str | None = None) -> Count:
    """The prompt tokens of a request body for ``endpoint`` (chat, embeddings, completions,
    Responses)."""
    if model is None:
        named = body.get("model")
        model = named if isinstance(named, str) else None
    name, approximate = encoding_name_for(model)
    enc = encoding(name)
    estimated = False
    partial = False
    listed = body.get("input" if endpoint == RESPONSES else "messages")
    sizes: list[int] | None = [] if isinstance(listed, list) and len(listed) > SIZES_FROM else None
    if endpoint == RESPONSES:
        tokens, estimated, partial = count_responses(enc, body, sizes)
    elif endpoint.endswith("/embeddings"):
        tokens = count_embeddings_input(enc, body.get("input"))
    elif endpoint.endswith("/completions") and "messages" not in body:
        tokens = count_embeddings_input(enc, body.get("prompt", ""))
    else:
        tokens, estimated = count_messages(enc, body.get("messages") or [], sizes)
        tools = body.get("tools") or body.get("functions") or []
        if isinstance(tools, list) and tools:
            tokens += count_tools(enc, tools)
    return Count(
        tokens, name, approximate or estimated, estimated, partial, tuple(sizes) if sizes else ()
    )


_UNCOUNTABLE = (TypeError, ValueError, AttributeError, RecursionError, KeyError)


async def count_request_async(
    endpoint: str, body: dict[str, Any], size: int, model: str | None = None
) -> Count:
    """``count_request``, in a worker thread when the body is large, so no request stalls;
    ``Uncountable`` when the body's shape defeats the counter (a shape ``unreadable_field``
    does not look into)."""
    try:
        if size > OFF_LOOP_BYTES:
            return await asyncio.to_thread(count_request, endpoint, body, model)
        return count_request(endpoint, body, model)
    except _UNCOUNTABLE:
        raise Uncountable("body") from None


# -- the model catalogue -------------------------------------------------------------------------


class Catalogue:
    """Each model's context window and output limit: the shipped table (``data/models.toml``, a
    copy of ``config/models.toml``) with the config's ``[models."name"]`` entries on top. A name
    matches exactly, else by the longest listed prefix (``gpt-4o-2024-08-06`` → ``gpt-4o``)."""

    def __init__(self, overrides: tuple[ModelInfo, ...] = ()) -> None:
        data = tomllib.loads(resources.files("proxy").joinpath("data", "models.toml").read_text())
        models = {m.name: m for m in parse_models("models.toml", data.get("models", {}))}
        models.update({m.name: m for m in overrides})
        self.models = models
        self.lookup = PrefixTable(models).lookup
