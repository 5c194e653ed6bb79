"""What a client sent, checked once, before any stage acts on it.

- **Paths**: a dot-segment (``.``, ``..``, percent-encoded in any case, even twice) or an encoded
  slash, backslash or NUL anywhere in a /v1 path is refused with 400: nothing may move a request
  outside the upstream's base URL.
- **Header bytes**: a header value that is not valid UTF-8 is refused with 400 naming the header
  (aiohttp's client would drop the bad bytes silently; forwarding them is impossible).
- **Control headers** (``x-thriftgate-*``): parsed and range-checked here, on every path (cache hits
  included), into one ``Control``; a bad value is 400 naming the header and its allowed range.
  None is ever forwarded upstream (``upstream.request_headers`` drops the whole prefix).
- **Request encodings**: a ``Content-Encoding`` body is forwarded as the client sent it; the stages
  read a decoded copy whose size is bounded by ``max_body_bytes`` (a gzip bomb is a 413).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from proxy.errors import InvalidRequest, PayloadTooLarge

PREFIX = "x-thriftgate-"
CACHE_TTL = "x-thriftgate-cache-ttl"
MAX_RETRIES = "x-thriftgate-max-retries"
TRIM = "x-thriftgate-trim"
TAGS = "x-thriftgate-tags"
KNOWN = frozenset({CACHE_TTL, MAX_RETRIES, TRIM, TAGS})

MAX_CACHE_TTL_S = 30 * 86400  # x-thriftgate-cache-ttl: at most 30 days
MAX_RETRIES_ALLOWED = 10
MAX_TRIM_KEEP = 9999
MAX_TAGS, MAX_TAG_CHARS = 20, 100

_NUMBER = re.compile(r"^[0-9]+(\.[0-9]+)?$")
_TRIM = re.compile(r"^last-([0-9]{1,4})$")


@dataclass(frozen=True, slots=True)
class Control:
    """The request's own instructions to the proxy (None: not given)."""

    cache_ttl_s: float | None = None
    max_retries: int | None = None
    trim_keep: int | None = None  # keep the last N messages
    trim_off: bool = False  # x-thriftgate-trim: off (trimming configured, but not for this one)
    tags: list[str] | None = None
    names: tuple[str, ...] = ()  # every x-thriftgate-* header the request had, known or not


NO_CONTROL = Control()


def _bad(header: str, value: str, allowed: str, code: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid {header} header {safe_text(value)[:80]!r}: {allowed}.",
        param=header,
        code=code,
    )


def safe_text(value: str) -> str:
    """A header value as valid text: bytes that were not UTF-8 (kept by aiohttp as surrogates)
    become U+FFFD, so logs and usage lines stay valid UTF-8."""
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def secret_bytes(value: str) -> bytes:
    """A header value's bytes exactly as received (for hashing and comparisons)."""
    return value.encode("utf-8", "surrogateescape")


def read_headers(headers: CIMultiDictProxy[str]) -> Control:
    """Check every header's bytes and read the control headers."""
    # the common case, checked in C: every value ASCII, no x-thriftgate-* name
    if "".join(headers.values()).isascii() and (
        "\n" + PREFIX not in "\n" + "\n".join(headers.keys()).lower()
    ):
        return NO_CONTROL
    found: dict[str, str] | None = None
    names: list[str] | None = None
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(
                    f"The {name} header is not valid UTF-8; send it as UTF-8 (or ASCII).",
                    param=name,
                    code="invalid_header",
                ) from None
        if len(name) > 13 and name[:13].lower() == PREFIX:
            if names is None:
                names = []
            names.append(name)
            lower = name.lower()
            if lower in KNOWN:
                if found is None:
                    found = {}
                if lower in found:
                    raise _bad(name, value, "give it once", "invalid_header")
                found[lower] = value
    if names is None:
        return NO_CONTROL
    found = found or {}
    return Control(
        names=tuple(names),
        cache_ttl_s=_ttl(found[CACHE_TTL]) if CACHE_TTL in found else None,
        max_retries=_retries(found[MAX_RETRIES]) if MAX_RETRIES in found else None,
        tags=_tags(found[TAGS]) if TAGS in found else None,
        **_trim(found.get(TRIM)),
    )


def _ttl(raw: str) -> float:
    value = raw.strip()
    if not value.isascii() or not _NUMBER.match(value) or float(value) > MAX_CACHE_TTL_S:
        raise _bad(
            CACHE_TTL,
            raw,
            f"a number of seconds from 0 to {MAX_CACHE_TTL_S} (30 days)",
            "invalid_cache_ttl",
        )
    return float(value)


def _retries(raw: str) -> int:
    value = raw.strip()
    if not value.isascii() or not value.isdigit() or int(value) > MAX_RETRIES_ALLOWED:
        raise _bad(
            MAX_RETRIES,
            raw,
            f"a whole number of retries from 0 to {MAX_RETRIES_ALLOWED}",
            "invalid_max_retries",
        )
    return int(value)


def _trim(raw: str | None) -> dict[str, object]:
    if raw is None:
        return {}
    value = raw.strip().lower()
    if value in {"off", "none", "no", "0"}:
        return {"trim_off": True}
    match = _TRIM.match(value) if value.isascii() else None
    if match is None or int(match.group(1)) < 1:
        raise _bad(
            TRIM, raw, f"use last-N with N from 1 to {MAX_TRIM_KEEP}, or off", "invalid_header"
        )
    return {"trim_keep": int(match.group(1))}


def _tags(raw: str) -> list[str] | None:
    tags = [safe_text(t.strip())[:MAX_TAG_CHARS] for t in raw.split(",") if t.strip()]
    return tags[:MAX_TAGS] or None


# -- paths ---------------------------------------------------------------------------------------

_DOTS = frozenset({".", ".."})


def path_problem(raw_path: str) -> str | None:
    """Why a raw request path could leave the upstream's base, or None when it cannot."""
    path = raw_path.partition("?")[0]
    if "\\" in path:
        return "a backslash"
    for segment in path.split("/"):
        seen = segment
        for _ in range(3):  # decoded up to three times: %252e%252e is .. to a double decoder
            if seen in _DOTS:
                return "a dot-segment (. or ..)"
            lowered = seen.lower()
            if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
                return "an encoded slash, backslash or NUL"
            if "%" not in seen:
                break
            seen = unquote(seen)
            if "/" in seen or "\\" in seen or "\x00" in seen:
                return "an encoded slash, backslash or NUL"
        if seen in _DOTS:
            return "a dot-segment (. or ..)"
    return None


def check_path(raw_path: str) -> None:
    path = raw_path.partition("?")[0]
    if "%" not in path and "." not in path and "\\" not in path:
        return  # the common case: nothing to decode, no dot
    why = path_problem(path)
    if why is not None:
        raise InvalidRequest(
            f"The request path contains {why}; thriftgate forwards only paths that stay under "
            "the upstream's base URL.",
            code="invalid_path",
        )


# -- request bodies ------------------------------------------------------------------------------


def decode_body(raw: bytes, encoding: str | None, limit: int) -> bytes | None:
    """The body the stages read: ``raw`` decoded from its Content-Encoding, at most ``limit``
    bytes once decoded (more: 413). None when it cannot be decoded here (an encoding this process
    does not know, or corrupt data): the stages then leave the body alone."""
    if not encoding:
        return raw
    codings = [c.strip().lower() for c in encoding.split(",") if c.strip()]
    data = raw
    for coding in reversed(codings):  # the last coding applied is undone first
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            decoder = zlib.decompressobj(zlib.MAX_WBITS if data[:1] == b"x" else -zlib.MAX_WBITS)
        elif coding == "br":
            return _brotli(data, limit)
        else:
            return None
        try:
            out = decoder.decompress(data, limit + 1)
        except zlib.error:
            return None
        if len(out) > limit:
            raise PayloadTooLarge(
                f"The request body is larger than this proxy's limit of {limit} bytes once "
                "decompressed"
            )
        if not decoder.eof:
            return None  # cut short
        data = out
    return data


def _brotli(data: bytes, limit: int) -> bytes | None:
    try:
        import brotli  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        decoder = brotli.Decompressor()
        out = decoder.process(data, output_buffer_limit=limit + 1)
    except TypeError:  # an older brotli without output_buffer_limit
        return None
    except brotli.error:
        return None
    if len(out) > limit:
        raise PayloadTooLarge(
            f"The request body is larger than this proxy's limit of {limit} bytes once decompressed"
        )
    return out
