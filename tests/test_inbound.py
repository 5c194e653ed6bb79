"""Hostile input (issue 12): wrong types, odd bytes, control headers, request encodings, paths.

The rule under test: what the proxy cannot read is never a 5xx. It goes upstream unchanged (cache
BYPASS, no count: the upstream's answer is the truth), or, where a stage needs what it cannot read
(a key with a budget or a rate limit), it is a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import API_KEY, MakeProxy, Proxy, raw_http
from conftest import AUTH_JSON as AUTH
from fake_openai import FakeOpenAI

from proxy.inbound import decode_body, path_problem

CHAT = "/v1/chat/completions"


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def msgs(text: str = "hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


WRONG_TYPES: list[tuple[dict[str, Any], str]] = [
    ({"model": 123, "messages": msgs()}, "model"),
    ({"model": ["gpt-4o"], "messages": msgs()}, "model"),
    ({"model": "gpt-4o", "messages": 5}, "messages"),
    ({"model": "gpt-4o", "messages": True}, "messages"),
    ({"model": "gpt-4o", "messages": 1.5}, "messages"),
    ({"model": "gpt-4o", "messages": ["hi"]}, "messages"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    (
        {
            "model": "gpt-4o",
            "messages": msgs(),
            "tools": [{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}],
        },
        "tools[0].function.parameters",
    ),
    (
        {
            "model": "gpt-4o",
            "messages": msgs(),
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"properties": "nope"}},
                }
            ],
        },
        "tools[0].function.parameters.properties",
    ),
    ({"model": "gpt-4o", "messages": msgs(), "tools": "all of them"}, "tools"),
    (
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": [{"type": "text", "text": nested(300)}]}],
        },
        "body",
    ),
    (
        {"model": "gpt-4o", "messages": [{"role": "user", "content": nested(300)}]},
        "messages[0].content",
    ),
    ({"model": "gpt-4o", "messages": msgs(), "metadata": nested(300)}, "body"),
]


async def send(
    proxy: Proxy, data: bytes, headers: dict[str, str] | None = None, path: str = CHAT
) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(proxy.url + path, data=data, headers=headers or AUTH) as r,
    ):
        return r.status, r.headers, await r.read()


@pytest.mark.parametrize(("body", "field"), WRONG_TYPES)
async def test_what_the_proxy_cannot_read_goes_upstream_unchanged(
    proxy: Proxy, fake: FakeOpenAI, body: dict[str, Any], field: str
) -> None:
    raw = json.dumps(body).encode()  # orjson will not write JSON nested 300 deep
    status, headers, _ = await send(proxy, raw)
    assert status < 500 or headers.get("x-thriftgate-error") is None  # never the proxy's 5xx
    assert headers["x-thriftgate-cache"] == "BYPASS"
    assert fake.requests[-1].body == raw  # exactly the client's bytes
    record = (await proxy.usage.wait(1))[-1]
    assert record["status"] == status and record["cache"] == "bypass"


async def test_json_deeper_than_the_parser_reads_is_forwarded(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    raw = b'{"model": "gpt-4o", "messages": [], "x": ' + b"[" * 1100 + b"]" * 1100 + b"}"
    _, headers, _ = await send(proxy, raw)
    assert headers["x-thriftgate-cache"] == "BYPASS"
    assert fake.requests[-1].body == raw
    assert "x-thriftgate-error" not in headers  # whatever it is, the upstream's answer


@pytest.mark.parametrize(("body", "field"), WRONG_TYPES[:8])
async def test_a_budgeted_key_gets_a_400_naming_the_field(
    make_proxy: MakeProxy, fake: FakeOpenAI, body: dict[str, Any], field: str
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_TOKENS_PER_DAY": "100000"})
    status, _, raw = await send(proxy, json.dumps(body).encode())
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["param"] == field and error["code"] == "invalid_request_shape"
    assert fake.calls(CHAT) == 0


async def test_a_rate_limited_key_gets_a_400_naming_the_field(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "100"})
    status, _, raw = await send(proxy, orjson.dumps({"model": 5, "messages": msgs()}))
    assert status == 400 and orjson.loads(raw)["error"]["param"] == "model"
    assert fake.calls(CHAT) == 0


# -- header bytes --------------------------------------------------------------------------------


def request_bytes(path: str, headers: list[tuple[bytes, bytes]], body: bytes = b"") -> bytes:
    lines = [b"POST " + path.encode() + b" HTTP/1.1", b"Host: proxy", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    lines += [b"Content-Length: " + str(len(body)).encode(), b"", b""]
    return b"\r\n".join(lines) + body


CHAT_BODY = orjson.dumps({"model": "gpt-4o", "messages": msgs()})


@pytest.mark.parametrize(
    "header",
    [b"Authorization", b"OpenAI-Organization", b"OpenAI-Project", b"X-Thriftgate-Tags", b"X-Other"],
)
async def test_non_utf8_header_bytes_are_a_400_naming_the_header(
    proxy: Proxy, fake: FakeOpenAI, header: bytes
) -> None:
    auth = (b"Authorization", f"Bearer {API_KEY}".encode())
    headers = [auth] if header != b"Authorization" else []
    headers.append((header, b"Bearer sk-\xff\xfe-caf\xe9"))
    status, _, body = await raw_http(proxy.url, request_bytes(CHAT, headers, CHAT_BODY))
    assert status == 400
    error = orjson.loads(body)["error"]
    assert error["param"].lower() == header.decode().lower()
    assert error["code"] == "invalid_header"
    assert fake.calls() == 0
    record = (await proxy.usage.wait(1))[-1]
    assert record["status"] == 400  # the request still has its one usage line


async def test_non_utf8_authorization_on_metrics_is_refused_not_crashed(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_ADMIN_TOKEN": "admin-secret-1"})
    raw = (
        b"GET /metrics HTTP/1.1\r\nHost: p\r\nConnection: close\r\nAuthorization: \xff\xfe\r\n\r\n"
    )
    status, _, body = await raw_http(proxy.url, raw)
    assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_admin_token"


async def test_utf8_tags_and_paths_reach_the_usage_log_as_valid_text(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    headers = [
        (b"Authorization", f"Bearer {API_KEY}".encode()),
        (b"X-Thriftgate-Tags", "é,日本".encode()),
    ]
    status, _, _ = await raw_http(proxy.url, request_bytes(CHAT, headers, CHAT_BODY))
    assert status == 200
    status, _, _ = await raw_http(proxy.url, request_bytes("/v1/x%ff%fe", headers[:1]))
    records = await proxy.usage.wait(2)
    assert records[0]["tags"] == ["é", "日本"]
    assert records[1]["endpoint"].startswith("/v1/x")  # the line is valid UTF-8 (it parsed)


# -- control headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "code"),
    [
        ("x-thriftgate-max-retries", "banana", "invalid_max_retries"),
        ("x-thriftgate-max-retries", "²", "invalid_max_retries"),
        ("x-thriftgate-max-retries", "11", "invalid_max_retries"),
        ("x-thriftgate-cache-ttl", "1e16", "invalid_cache_ttl"),
        ("x-thriftgate-cache-ttl", "1e308", "invalid_cache_ttl"),
        ("x-thriftgate-cache-ttl", "-1", "invalid_cache_ttl"),
        ("x-thriftgate-cache-ttl", "2592001", "invalid_cache_ttl"),
        ("x-thriftgate-cache-ttl", "nan", "invalid_cache_ttl"),
        ("x-thriftgate-trim", "last-0", "invalid_header"),
    ],
)
async def test_bad_control_headers_are_400_on_a_hit_as_on_a_miss(
    proxy: Proxy, fake: FakeOpenAI, header: str, value: str, code: str
) -> None:
    ok, _, _ = await send(proxy, CHAT_BODY)  # now the answer is cached
    assert ok == 200
    status, _, raw = await send(proxy, CHAT_BODY, {**AUTH, header: value})
    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["param"] == header and error["code"] == code
    assert fake.calls(CHAT) == 1


async def test_control_headers_are_never_forwarded_known_or_not(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    headers = {
        **AUTH,
        "x-thriftgate-max-retries": "2",
        "X-Thriftgate-Cache-Ttl": "60",
        "x-thriftgate-whatever": "secret-ish",
        "X-THRIFTGATE-TAGS": "a,b",
    }
    assert (await send(proxy, CHAT_BODY, headers))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(proxy.base_url + "/models", headers=headers):
        pass
    for seen in fake.requests:
        assert not [k for k in seen.headers if k.lower().startswith("x-thriftgate-")]


async def test_the_largest_ttl_is_accepted_and_stored(proxy: Proxy, fake: FakeOpenAI) -> None:
    headers = {**AUTH, "x-thriftgate-cache-ttl": "2592000"}
    assert (await send(proxy, CHAT_BODY, headers))[0] == 200
    _, resp_headers, _ = await send(proxy, CHAT_BODY)
    assert resp_headers["x-thriftgate-cache"] == "HIT"


# -- request encodings ---------------------------------------------------------------------------


async def test_a_gzip_body_is_forwarded_as_sent_and_read_by_the_stages(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    packed = gzip.compress(CHAT_BODY)
    headers = {**AUTH, "Content-Encoding": "gzip"}
    status, first, _ = await send(proxy, packed, headers)
    assert status == 200
    upstream = fake.requests[-1]
    assert upstream.headers["Content-Encoding"] == "gzip"
    assert upstream.body == packed  # byte for byte: the upstream decides
    assert int(first["x-thriftgate-prompt-tokens"]) > 0  # the stages read the decoded copy
    assert first["x-thriftgate-cache"] == "MISS"
    assert (await send(proxy, packed, headers))[1]["x-thriftgate-cache"] == "HIT"


async def test_a_gzip_body_rewritten_by_a_stage_goes_as_plain_json(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    body = {"model": "gpt-4o", "messages": [*msgs("a"), *msgs("b"), *msgs("c")]}
    headers = {**AUTH, "Content-Encoding": "gzip", "x-thriftgate-trim": "last-1"}
    assert (await send(proxy, gzip.compress(orjson.dumps(body)), headers))[0] == 200
    upstream = fake.requests[-1]
    assert "Content-Encoding" not in upstream.headers
    assert orjson.loads(upstream.body)["messages"] == msgs("c")


async def test_a_gzip_upload_streams_through_with_its_own_length(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", b'{"a": 1}\n' * 50, filename="in.jsonl")
    plain = form()
    data = b"".join([chunk async for chunk in _payload_bytes(plain)])
    packed = gzip.compress(data)
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": plain.content_type,
        "Content-Encoding": "gzip",
    }
    async with asyncio.timeout(10):
        status, _, _ = await send(proxy, packed, headers, path="/v1/files")
    assert status < 500
    upstream = fake.requests[-1]
    assert upstream.path == "/v1/files"
    assert upstream.headers["Content-Encoding"] == "gzip"
    assert upstream.headers["Content-Length"] == str(len(packed))
    assert upstream.body == packed


async def _payload_bytes(payload: Any) -> Any:
    class Sink:
        def __init__(self) -> None:
            self.parts: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.parts.append(bytes(data))

    sink = Sink()
    await payload.write(sink)
    for part in sink.parts:
        yield part


async def test_a_gzip_bomb_is_a_413(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_MAX_BODY_BYTES": "100000"})
    bomb = gzip.compress(b'{"model": "gpt-4o", "x": "' + b"a" * 5_000_000 + b'"}')
    assert len(bomb) < 100_000
    status, _, raw = await send(proxy, bomb, {**AUTH, "Content-Encoding": "gzip"})
    assert status == 413 and orjson.loads(raw)["error"]["code"] == "payload_too_large"
    assert fake.calls() == 0


async def test_an_encoding_the_proxy_cannot_undo_is_forwarded_untouched(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    status, headers, _ = await send(
        proxy, b"\x28\xb5\x2f\xfd...", {**AUTH, "Content-Encoding": "zstd"}
    )
    assert headers["x-thriftgate-cache"] == "BYPASS"
    assert fake.requests[-1].body == b"\x28\xb5\x2f\xfd..."
    assert fake.requests[-1].headers["Content-Encoding"] == "zstd"
    assert status == 400  # the fake cannot read it either; its answer is the truth


async def test_a_chunked_body_is_read_and_forwarded(proxy: Proxy, fake: FakeOpenAI) -> None:
    async def chunks() -> Any:
        for i in range(0, len(CHAT_BODY), 7):
            yield CHAT_BODY[i : i + 7]

    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + CHAT, data=chunks(), headers=AUTH) as r,
    ):
        assert r.status == 200
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
    assert fake.requests[-1].body == CHAT_BODY


def test_decode_body_bounds_and_formats() -> None:
    assert decode_body(b"abc", None, 10) == b"abc"
    assert decode_body(gzip.compress(b"abc"), "gzip", 10) == b"abc"
    assert decode_body(zlib.compress(b"abc"), "deflate", 10) == b"abc"
    raw_deflate = zlib.compressobj(wbits=-15)
    assert decode_body(raw_deflate.compress(b"abc") + raw_deflate.flush(), "deflate", 10) == b"abc"
    assert decode_body(gzip.compress(gzip.compress(b"abc")), "gzip, gzip", 100) == b"abc"
    assert decode_body(gzip.compress(b"abc")[:-4], "gzip", 10) is None  # cut short
    assert decode_body(b"not gzip", "gzip", 10) is None
    assert decode_body(b"abc", "zstd", 10) is None


def test_decode_body_brotli_when_installed() -> None:
    brotli = pytest.importorskip("brotli")
    assert decode_body(brotli.compress(b"abc"), "br", 10) == b"abc"
    with pytest.raises(Exception, match="larger"):
        decode_body(brotli.compress(b"a" * 1000), "br", 10)


# -- paths ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/v1/../../x",
        "/v1/%2e%2e/%2E%2E/x",
        "/v1/..%2f..%2fx",
        "/v1/..%2F..%2Fx",
        "/v1/%252e%252e/x",
        "/v1/a/./b",
        "/v1/a/%2e/b",
        "/v1/a%5cb",
        "/v1/a\\..\\b",
        "/v1/models/%00",
        "/v1/files/..",
    ],
)
async def test_paths_that_could_leave_the_upstream_base_are_refused(
    make_proxy: MakeProxy, fake: FakeOpenAI, path: str
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_UPSTREAM_API_KEY": "sk-sidecar-secret-000111"})
    raw = f"GET {path} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n".encode()
    status, _, body = await raw_http(proxy.url, raw)
    assert status in (400, 404)
    error = orjson.loads(body)["error"]
    assert error["code"] in ("invalid_path", "not_found")
    assert fake.calls() == 0


def test_ordinary_paths_pass() -> None:
    for path in (
        "/v1/chat/completions",
        "/v1/models/gpt-4o.1",
        "/v1/files/file-abc/content?x=../y",
        "/v1/a..b/c.d",
        "/v1/models/ft%3Agpt-4o%3Aorg",
    ):
        assert path_problem(path) is None, path


# -- aiohttp's own refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n",
        b"GET /v1/models HTTP/1.1\r\nBad Header\r\n\r\n",
    ],
)
async def test_framing_errors_answer_in_openais_envelope(proxy: Proxy, raw: bytes) -> None:
    status, headers, body = await raw_http(proxy.url, raw)
    assert 400 <= status < 500
    assert headers.get("content-type", "").startswith("application/json")
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert "Traceback" not in error["message"]


async def test_a_request_whose_headers_trickle_in_is_cut_with_a_408(
    make_proxy: MakeProxy,
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_HEADER_TIMEOUT_S": "0.3"})
    host, port = proxy.server.host, proxy.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: p\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read()  # the proxy answers and closes; the client never finished
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer
    # a connection that sends its headers in time is served as usual
    status, _, _ = await raw_http(
        proxy.url, b"GET /healthz HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
