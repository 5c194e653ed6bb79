"""Property-based fuzzing (issue 12): generated bodies, headers and paths against the real app in
front of the fake upstream, sent as raw bytes (so nothing a client library would refuse to send is
out of reach). Seeded (derandomised) and bounded, so CI runs the same examples in seconds.

Invariants, for every example:
- no 5xx made by the proxy (its own errors carry ``x-thriftgate-error``);
- every error answer is OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``;
- the process still serves (``/healthz``) and the next request is unaffected;
- exactly one usage line per /v1 request that reached the app;
- what the proxy forwards, the upstream receives byte for byte.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import orjson
import pytest
from conftest import API_KEY, FUZZ, MakeProxy, Proxy, raw_http
from fake_openai import FakeOpenAI
from hypothesis import given
from hypothesis import strategies as st

from proxy.keys import fingerprint

BUDGETED_KEY = "sk-fuzz-budgeted-0123456789"
ENDPOINTS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/images/generations",
    "/v1/audio/speech",
]
CONTROL = [
    "x-thriftgate-cache-ttl",
    "x-thriftgate-max-retries",
    "x-thriftgate-trim",
    "x-thriftgate-tags",
    "x-thriftgate-unknown",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
odd_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
) | st.sampled_from(["", "<|endoftext|>", "\u202e", "\x00", "🙂" * 20, "a" * 5000])
parts = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "file", "weird"])},
    optional={"text": odd_text | json_values, "image_url": json_values},
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"])},
        optional={"content": odd_text | st.lists(parts, max_size=3) | json_values},
    ),
    max_size=5,
)
tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function")},
        optional={
            "function": st.fixed_dictionaries(
                {"name": st.text(max_size=10)},
                optional={
                    "parameters": json_values
                    | st.fixed_dictionaries({}, optional={"properties": json_values})
                },
            )
            | json_values
        },
    ),
    max_size=3,
)


def deep(depth: int) -> Any:
    value: Any = 1
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["gpt-4o", "gpt-4o-mini", "text-embedding-3-small", "o3"])
        | json_values,
        "messages": messages | json_values,
        "input": odd_text
        | st.lists(odd_text, max_size=3)
        | st.lists(st.integers(0, 10**6))
        | json_values,
        "prompt": odd_text | json_values,
        "tools": tools | json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": st.integers(-5, 10**9) | json_values,
        "stream_options": json_values,
        "user": odd_text | json_values,
        "metadata": st.integers(1, 1200).map(deep),
    },
)


def encode(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # deeper than orjson writes
        return json.dumps(body).encode()


def request(
    method: str,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
    *,
    keep_alive: bool = False,
) -> bytes:
    """Kept alive, a request that arrives whole is the express lane's first (proxy.express)."""
    lines = [f"{method} ".encode() + path.encode("latin-1") + b" HTTP/1.1", b"Host: proxy"]
    if not keep_alive:
        lines.append(b"Connection: close")
    lines += [k + b": " + v for k, v in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"", b""]
    return b"\r\n".join(lines) + body


async def check(proxy: Proxy, fake: FakeOpenAI, raw: bytes, sent_body: bytes, *, v1: bool) -> None:
    lines_before = len(proxy.usage.records())
    upstream_before = len(fake.requests)
    status, headers, body = await raw_http(proxy.url, raw)
    made_by_proxy = "x-thriftgate-error" in headers
    assert not (status >= 500 and made_by_proxy), (status, body[:300])
    if status >= 400:
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, body[:300]
        assert isinstance(error["message"], str) and "Traceback" not in error["message"]
    parsed = headers.get("x-thriftgate-error") != "bad_http_request"
    expected = 1 if v1 and parsed else 0
    records = await proxy.usage.wait(lines_before + expected) if expected else proxy.usage.records()
    assert len(records) == lines_before + expected
    rewritten = expected and records[-1].get("optimized") is not None
    for seen in fake.requests[upstream_before:]:
        if seen.method == "POST" and not rewritten and seen.path != "/v1/files":
            assert seen.body == sent_body
    ok, _, _ = await raw_http(
        proxy.url, b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    assert ok == 200


@pytest.fixture
async def fuzz_proxy(make_proxy: MakeProxy, tmp_path: Any) -> Proxy:
    cfg = tmp_path / "fuzz.toml"
    cfg.write_text(
        f'[keys."budgeted"]\nfingerprint = "{fingerprint(BUDGETED_KEY)}"\n'
        "tokens_per_day = 100000000\nrpm = 100000\n"
    )
    return await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})


@FUZZ
@given(
    endpoint=st.sampled_from(ENDPOINTS),
    body=bodies,
    key=st.sampled_from([API_KEY, BUDGETED_KEY, "", "x"]),
    gzipped=st.booleans(),
    keep_alive=st.booleans(),
)
async def test_fuzzed_bodies(
    fuzz_proxy: Proxy,
    fake: FakeOpenAI,
    endpoint: str,
    body: Any,
    key: str,
    gzipped: bool,
    keep_alive: bool,
) -> None:
    data = encode(body)
    headers = [(b"Content-Type", b"application/json")]
    if key:
        headers.append((b"Authorization", f"Bearer {key}".encode()))
    if gzipped:
        data = gzip.compress(data)
        headers.append((b"Content-Encoding", b"gzip"))
    raw = request("POST", endpoint, headers, data, keep_alive=keep_alive)
    await check(fuzz_proxy, fake, raw, data, v1=True)


header_bytes = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@FUZZ
@given(
    control=st.lists(
        st.tuples(st.sampled_from(CONTROL), header_bytes | st.text(max_size=20).map(str.encode)),
        max_size=4,
    ),
    other=st.lists(
        st.tuples(
            st.sampled_from(["Authorization", "OpenAI-Organization", "OpenAI-Project", "X-Any"]),
            header_bytes,
        ),
        max_size=3,
    ),
    endpoint=st.sampled_from([*ENDPOINTS, "/v1/models"]),
    keep_alive=st.booleans(),
)
async def test_fuzzed_headers(
    fuzz_proxy: Proxy,
    fake: FakeOpenAI,
    control: list[tuple[str, bytes]],
    other: list[tuple[str, bytes]],
    endpoint: str,
    keep_alive: bool,
) -> None:
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "a"}] * 3, "input": "a"}
    )
    headers = [(k.encode(), v) for k, v in (*control, *other)]
    if not any(k == "Authorization" for k, _ in other):
        headers.append((b"Authorization", f"Bearer {API_KEY}".encode()))
    method = "GET" if endpoint == "/v1/models" else "POST"
    data = body if method == "POST" else b""
    raw = request(method, endpoint, headers, data, keep_alive=keep_alive)
    await check(fuzz_proxy, fake, raw, data, v1=True)


path_chars = st.sampled_from(
    [*"abz09-_.~/%\\?&=:;@!$'()*+,", "%2e", "%2E", "%2f", "%5c", "%00", "%ff", "..", "%252e"]
)


@FUZZ
@given(
    tail=st.lists(path_chars, max_size=12).map("".join),
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS"]),
)
async def test_fuzzed_paths(fuzz_proxy: Proxy, fake: FakeOpenAI, tail: str, method: str) -> None:
    path = "/v1/" + tail
    headers = [(b"Authorization", f"Bearer {API_KEY}".encode())]
    before = len(fake.requests)
    await check(fuzz_proxy, fake, request(method, path, headers), b"", v1=True)
    for seen in fake.requests[before:]:  # what went upstream stayed under the base
        assert seen.path.startswith("/v1/")
        assert ".." not in seen.path.split("?")[0].split("/")


DASHBOARD_TOKEN = "fuzz-admin-token-0123456789"


@pytest.fixture
async def admin_proxy(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy(env={"THRIFTGATE_ADMIN_TOKEN": DASHBOARD_TOKEN})


@FUZZ
@given(
    form=st.binary(max_size=300)
    | st.dictionaries(st.sampled_from(["token", "username", "x"]), odd_text, max_size=3).map(
        lambda d: "&".join(f"{k}={v}" for k, v in d.items()).encode("utf-8", "surrogatepass")
    ),
    content_type=st.sampled_from(
        [b"application/x-www-form-urlencoded", b"multipart/form-data", b"text/plain", b"\xff"]
    ),
    cookie=st.binary(max_size=120),
)
async def test_fuzzed_dashboard_logins(
    admin_proxy: Proxy, form: bytes, content_type: bytes, cookie: bytes
) -> None:
    """A login form or a session cookie that is not the admin token's never opens the dashboard,
    never sets a session, and never makes the proxy fail."""
    raw = request("POST", "/dashboard/login", [(b"Content-Type", content_type)], form)
    status, headers, body = await raw_http(admin_proxy.url, raw)
    assert status == 401 and "set-cookie" not in headers, (status, body[:200])
    raw = request("GET", "/dashboard", [(b"Cookie", b"thriftgate_dashboard=" + cookie)])
    status, _, body = await raw_http(admin_proxy.url, raw)
    assert status in (400, 401) and b"data-k" not in body, (status, body[:200])
