"""A fake OpenAI API: a real aiohttp server speaking OpenAI's wire format, told to fail on demand.

It is the one fake the test suite allows (the real API is out of reach). It answers like the real
service: chat completions as JSON or SSE (with ``stream_options.include_usage``), embeddings as
floats or base64 float32, models, file uploads, OpenAI's error envelope, the usual headers
(``x-request-id``, ``openai-processing-ms``, ``x-ratelimit-*``, a Cloudflare cookie) and gzip when
the client accepts it. Every answer has a fresh id, so a test can tell a fresh answer from a
replayed one. ``fail_next`` queues faults: a status with an error body, a connection reset, a
delay, a stream cut after N chunks; ``gate`` holds a stream after its first chunk.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import math
import random
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3", "text-embedding-3-small"]


@dataclass
class Fault:
    status: int | None = None  # answer with this status and an OpenAI error body (or ``body``)
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    code: str | None = None  # the error body's code
    type: str | None = None  # the error body's type
    reset: bool = False  # drop the connection without answering
    delay: float = 0.0  # wait this long before answering
    cut_after: int | None = None  # streams: drop the connection after this many chunks


# uploads the fake reads part by part as they arrive (its middleware does not read them first)
STREAMED_UPLOADS = frozenset(
    {
        "/v1/files",
        "/v1/images/edits",
        "/v1/images/variations",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)

FAULT: web.RequestKey[Fault | None] = web.RequestKey("fault")


@dataclass
class Sent:
    status: int
    headers: CIMultiDict[str]  # final headers, as written on the wire
    body: bytes | None  # None for streams


@dataclass
class Recorded:
    method: str
    path: str  # raw path with query string, as received
    headers: CIMultiDict[str]
    body: bytes
    peer: Any = None  # the proxy's end of the connection (host, port): which connection it came on


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def vector(text: str, dims: int) -> list[float]:
    """A deterministic unit-ish vector for ``text``, exactly representable as float32."""
    rnd = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rnd.uniform(-1, 1) for _ in range(dims)]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *values)))


def answer_for(messages: list[dict[str, Any]]) -> str:
    last = messages[-1].get("content") if messages else ""
    if isinstance(last, list):
        last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
    return f"You said: {last}" if last else "Hello! How can I help you today?"


def embeddings_payload(req: dict[str, Any]) -> dict[str, Any]:
    """The answer to an embeddings request body (deterministic vectors, usage by a simple rule)."""
    raw = req.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    else:
        inputs = list(raw or [])
    dims = int(req.get("dimensions") or 64)
    fmt = req.get("encoding_format", "float")
    data = []
    tokens = 0
    for i, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(map(str, item))
        tokens += len(item) if isinstance(item, list) else max(1, len(item) // 4)
        vec = vector(text, dims)
        emb: Any = (
            base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode() if fmt == "base64" else vec
        )
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": req["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def chat_payload(req: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming chat completion for a request body (the batch API's answers)."""
    messages = req.get("messages") or []
    text = answer_for(messages)
    prompt = max(1, len(orjson.dumps(messages)) // 4)
    completion = len(text.split(" "))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def responses_text(req: dict[str, Any]) -> str:
    """What the fake answers a Responses request: it echoes the last user text."""
    value = req.get("input")
    if isinstance(value, list):
        texts = []
        for item in value:
            if isinstance(item, dict) and item.get("role") == "user":
                content = item.get("content")
                if isinstance(content, list):
                    content = " ".join(
                        str(p.get("text", "")) for p in content if isinstance(p, dict)
                    )
                texts = [str(content)]
        value = texts[-1] if texts else ""
    return answer_for([{"role": "user", "content": str(value or "")}])


def responses_usage(req: dict[str, Any], output_tokens: int) -> dict[str, Any]:
    """Usage by the fake's simple rule: a quarter token per byte of input and instructions, and
    20 tokens of stored state for a request on a previous response."""
    sent = len(orjson.dumps(req.get("input"))) + len(str(req.get("instructions") or ""))
    input_tokens = max(1, sent // 4) + (20 if req.get("previous_response_id") else 0)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    req: dict[str, Any], ident: str, status: str, output: list[Any], usage: Any
) -> dict[str, Any]:
    """A Response object with every field OpenAI returns."""
    return {
        "id": ident,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "background": bool(req.get("background")),
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": f"{req.get('model')}-2024-08-06",
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": req.get("store", True),
        "temperature": req.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": req.get("tools", []),
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": req.get("user"),
        "metadata": req.get("metadata") or {},
    }


def responses_payload(req: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming Response for a request body (the batch API's answers)."""
    text = responses_text(req)
    item = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }
    usage = responses_usage(req, len(text.split(" ")))
    return response_object(req, f"resp_{uuid.uuid4().hex}", "completed", [item], usage)


AUDIO_BYTES_PER_SECOND = 16_000  # the fake's idea of an upload's duration


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.sent: list[Sent] = []  # every answer, as the fake wrote it
        self.faults: deque[Fault] = deque()
        self.gate: asyncio.Event | None = None  # streams wait on it after their first chunk...
        self.gate_after = 1  # ...or after this many
        self.hold: asyncio.Event | None = None  # JSON chat answers wait on it before answering
        self.held = asyncio.Event()  # set once an answer waits on ``hold``
        self.limit_headers: dict[str, str] = {}  # overrides of the x-ratelimit-* headers sent
        self.first_chunk_sent = asyncio.Event()
        self.disconnected = asyncio.Event()  # a client went away mid-answer
        self.files: dict[str, bytes] = {}
        self.compress_streams = False
        self.embedding_calls = 0
        self.embedding_inputs: list[Any] = []
        # the Batch API: off to play an upstream without one (404)
        self.batch_api = True
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_polls_to_finish = 3  # GETs of a batch before it completes
        self.in_flight = 0  # requests being answered now, and the most at once
        self.max_in_flight = 0
        self.slow: asyncio.Event | None = None  # every POST waits on it (to measure overlap)
        self.responses_made: dict[str, dict[str, Any]] = {}  # stored responses (store: true)
        self.form_seen = asyncio.Event()  # an upload's first form part has arrived
        self.uploads: list[dict[str, Any]] = []  # each upload's form fields and file sizes

    # -- control -----------------------------------------------------------------------------
    def fail_next(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def calls(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path.split("?")[0] == path)

    def app(self) -> web.Application:
        # request bodies recorded as they arrived (a gzip body stays gzip); handlers read them
        # decoded, as OpenAI's front end would
        app = web.Application(client_max_size=1024**3, handler_args={"auto_decompress": False})
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_post("/v1/responses/input_tokens", self.input_tokens)
        app.router.add_get("/v1/responses/{response_id}", self.get_response)
        app.router.add_post("/v1/images/generations", self.images)
        app.router.add_post("/v1/images/edits", self.image_upload)
        app.router.add_post("/v1/images/variations", self.image_upload)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_post("/v1/audio/transcriptions", self.transcription)
        app.router.add_post("/v1/audio/translations", self.transcription)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_delete("/v1/models/{model}", self.delete_model)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_route("*", "/{tail:.*}", self.unknown)
        app.middlewares.append(self._middleware)
        app.on_response_prepare.append(self._record_answer)
        return app

    async def _record_answer(self, request: web.Request, resp: web.StreamResponse) -> None:
        body = resp.body if isinstance(resp, web.Response) else None
        self.sent.append(
            Sent(resp.status, CIMultiDict(resp.headers), bytes(body) if body is not None else None)
        )

    # -- plumbing ----------------------------------------------------------------------------
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = await request.read() if request.path not in STREAMED_UPLOADS else b""
        self.requests.append(
            Recorded(
                request.method,
                request.raw_path,
                CIMultiDict(request.headers),
                body,
                request.transport.get_extra_info("peername") if request.transport else None,
            )
        )
        encoding = request.headers.get("Content-Encoding", "").lower()
        if body and encoding:
            try:
                request._read_bytes = gzip.decompress(body) if encoding == "gzip" else None
            except (OSError, EOFError):
                request._read_bytes = None
            if request._read_bytes is None:
                return self._bad(f"Unsupported or corrupt Content-Encoding: {encoding}")
        fault = self.faults.popleft() if self.faults else None
        request[FAULT] = fault
        if fault is not None:
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if fault.reset:
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
            if fault.status is not None:
                return self._error(fault)
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.Response(
                status=401,
                body=error_body(
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                    "invalid_request_error",
                    None,
                ),
                content_type="application/json",
                headers=self._headers(),
            )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.slow is not None and request.method == "POST":
                await asyncio.sleep(0)  # let the other requests of a burst arrive
                await self.slow.wait()
            try:
                return await handler(request)
            except (web.HTTPException, asyncio.CancelledError, ConnectionError):
                raise
            except Exception:  # a body of the wrong shape: OpenAI answers 400, in its envelope
                return self._bad("Invalid request: the body is not of the expected shape.")
        finally:
            self.in_flight -= 1

    _middleware.__middleware_version__ = 1  # type: ignore[attr-defined]  # new-style (aiohttp 3)

    def _error(self, fault: Fault) -> web.Response:
        status = fault.status or 500
        defaults = {
            429: ("Rate limit reached for requests", "requests", "rate_limit_exceeded"),
            500: (
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            ),
            503: (
                "The engine is currently overloaded, please try again later",
                "server_error",
                None,
            ),
        }
        message, type_, code = defaults.get(status, ("Bad request", "invalid_request_error", None))
        body = fault.body or error_body(message, fault.type or type_, fault.code or code)
        headers = self._headers()
        headers.update(fault.headers)
        return web.Response(
            status=status, body=body, content_type="application/json", headers=headers
        )

    def _headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_{uuid.uuid4().hex}",
            "openai-processing-ms": str(random.randint(80, 900)),
            "openai-organization": "user-fake",
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-remaining-tokens": "29999950",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "0s",
            "strict-transport-security": "max-age=31536000; includeSubDomains; preload",
            "set-cookie": f"__cf_bm={uuid.uuid4().hex}; path=/; HttpOnly; Secure; SameSite=None",
            "cf-cache-status": "DYNAMIC",
            **self.limit_headers,
        }

    def _json(self, request: web.Request, payload: Any) -> web.Response:
        body = orjson.dumps(payload)
        headers = self._headers()
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return web.Response(body=body, content_type="application/json", headers=headers)

    @staticmethod
    def _bad(message: str, param: str | None = None) -> web.Response:
        return web.Response(
            status=400,
            body=error_body(message, "invalid_request_error", None, param),
            content_type="application/json",
        )

    # -- endpoints ---------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._bad("We could not parse the JSON body of your request.")
        messages = req.get("messages")
        if not isinstance(messages, list) or not req.get("model"):
            return self._bad("Missing required parameter: 'messages'.", "messages")
        text = answer_for(messages)
        prompt_tokens = max(1, len(orjson.dumps(messages)) // 4)
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1].rstrip()
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        ident = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        base = {
            "id": ident,
            "created": int(time.time()),
            "model": req["model"],
            "service_tier": "default",
            "system_fingerprint": "fp_fake0001",
        }
        if self.hold is not None and not req.get("stream"):
            self.held.set()
            await self.hold.wait()
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            return await self._stream(request, base, pieces, usage if include_usage else None)
        payload = {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": text,
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
        return self._json(request, payload)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: JSON, or the event stream (``response.created`` ...
        ``response.output_text.delta`` ... ``response.completed``); ``background`` answers a
        queued response without usage."""
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._bad("We could not parse the JSON body of your request.")
        if not isinstance(req, dict) or not req.get("model"):
            return self._bad("Missing required parameter: 'model'.", "model")
        value = req.get("input")
        if value is not None and not isinstance(value, str | list):
            return self._bad("Invalid type for 'input': expected a string or an array.", "input")
        previous = req.get("previous_response_id")
        if previous is not None and previous not in self.responses_made:
            return web.Response(
                status=404,
                body=error_body(
                    f"Previous response with id '{previous}' not found.",
                    "invalid_request_error",
                    "previous_response_not_found",
                    "previous_response_id",
                ),
                content_type="application/json",
                headers=self._headers(),
            )
        text = responses_text(req)
        pieces = [w + " " for w in text.split(" ")]
        pieces[-1] = pieces[-1].rstrip()
        usage = responses_usage(req, len(pieces))
        ident = f"resp_{uuid.uuid4().hex}"
        item_id = f"msg_{uuid.uuid4().hex}"
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
        if req.get("background"):
            payload = response_object(req, ident, "queued", [], None)
            return self._json(request, payload)
        final = response_object(req, ident, "completed", [item], usage)
        if req.get("store", True):
            self.responses_made[ident] = final
        if not req.get("stream"):
            return self._json(request, final)
        seq = iter(range(10**6))

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(seq), **fields}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

        started = response_object(req, ident, "in_progress", [], None)
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}
        events = [
            event("response.created", response=started),
            event("response.in_progress", response=started),
            event(
                "response.output_item.added",
                output_index=0,
                item={**item, "status": "in_progress", "content": []},
            ),
            event("response.content_part.added", **where, part={**part, "text": ""}),
            *[event("response.output_text.delta", **where, delta=p, logprobs=[]) for p in pieces],
            event("response.output_text.done", **where, text=text, logprobs=[]),
            event("response.content_part.done", **where, part=part),
            event("response.output_item.done", output_index=0, item=item),
            event("response.completed", response=final),
        ]
        return await self._write_events(request, events)

    async def input_tokens(self, request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        usage = responses_usage(req, 0)
        return self._json(
            request, {"object": "response.input_tokens", "input_tokens": usage["input_tokens"]}
        )

    async def get_response(self, request: web.Request) -> web.Response:
        found = self.responses_made.get(request.match_info["response_id"])
        if found is None:
            return self._bad("No response found with that id.", "response_id")
        return self._json(request, found)

    async def images(self, request: web.Request) -> web.Response:
        """Image generation: GPT image models report token usage, size and quality; DALL·E
        models answer the images alone."""
        req = orjson.loads(await request.read())
        return self._json(request, self._images(req, str(req.get("prompt", "")), 0))

    def _images(self, req: dict[str, Any], prompt: str, image_tokens: int) -> dict[str, Any]:
        model = str(req.get("model") or "dall-e-2")
        n = int(req.get("n") or 1)
        size = str(req.get("size") or "1024x1024")
        item = (
            {"b64_json": base64.b64encode(b"\x89PNG fake").decode()}
            if req.get("response_format") == "b64_json" or model.startswith("gpt-image")
            else {"url": f"https://images.example/{uuid.uuid4().hex}.png"}
        )
        payload: dict[str, Any] = {"created": int(time.time()), "data": [item] * n}
        if model.startswith("gpt-image"):
            quality = str(req.get("quality") or "auto")
            quality = "medium" if quality == "auto" else quality
            size = "1024x1024" if size == "auto" else size
            text_tokens = max(1, len(prompt) // 4)
            output = {"low": 272, "medium": 1056, "high": 4160}.get(quality, 1056) * n
            payload.update(
                background="opaque",
                output_format="png",
                quality=quality,
                size=size,
                usage={
                    "input_tokens": text_tokens + image_tokens,
                    "input_tokens_details": {
                        "image_tokens": image_tokens,
                        "text_tokens": text_tokens,
                    },
                    "output_tokens": output,
                    "total_tokens": text_tokens + image_tokens + output,
                },
            )
        return payload

    async def _form(self, request: web.Request) -> tuple[dict[str, str], dict[str, int]]:
        """A multipart upload read part by part as it arrives: its fields and file sizes."""
        fields: dict[str, str] = {}
        files: dict[str, int] = {}
        reader = await request.multipart()
        async for part in reader:
            if part.filename is not None:  # type: ignore[union-attr]
                size = 0
                while chunk := await part.read_chunk():  # type: ignore[union-attr]
                    size += len(chunk)
                    self.form_seen.set()
                files[str(part.name)] = files.get(str(part.name), 0) + size
            else:
                fields[str(part.name)] = (await part.read()).decode()  # type: ignore[union-attr]
                self.form_seen.set()
        self.uploads.append({"fields": fields, "files": files})
        self.requests[-1].body = orjson.dumps({"fields": fields, "files": files})
        return fields, files

    async def image_upload(self, request: web.Request) -> web.Response:
        """Image edits and variations (multipart): images in, priced like generation."""
        fields, files = await self._form(request)
        if not files:
            return self._bad("Missing required parameter: 'image'.", "image")
        image_tokens = 0
        if fields.get("model", "").startswith("gpt-image"):
            image_tokens = 323 * len(files)
        return self._json(request, self._images(fields, fields.get("prompt", ""), image_tokens))

    async def speech(self, request: web.Request) -> web.StreamResponse:
        """Text to speech: the audio's bytes, or with ``stream_format: sse`` audio delta events
        and a done event with token usage."""
        req = orjson.loads(await request.read())
        text = req.get("input")
        if not isinstance(text, str) or not text:
            return self._bad("Missing required parameter: 'input'.", "input")
        audio = hashlib.sha256(text.encode()).digest() * max(1, len(text) // 8)
        if req.get("stream_format") == "sse":
            usage = {
                "input_tokens": max(1, len(text) // 4),
                "output_tokens": len(audio) // 32,
                "total_tokens": max(1, len(text) // 4) + len(audio) // 32,
            }
            events = [
                b"data: "
                + orjson.dumps(
                    {
                        "type": "speech.audio.delta",
                        "audio": base64.b64encode(audio[i : i + 96]).decode(),
                    }
                )
                + b"\n\n"
                for i in range(0, len(audio), 96)
            ]
            events.append(
                b"data: " + orjson.dumps({"type": "speech.audio.done", "usage": usage}) + b"\n\n"
            )
            return await self._write_events(request, events)
        return web.Response(body=audio, content_type="audio/mpeg", headers=self._headers())

    async def transcription(self, request: web.Request) -> web.StreamResponse:
        """Transcriptions and translations (multipart): ``json`` (with usage: duration for
        whisper-1, tokens for the GPT transcribe models), ``verbose_json`` (with the duration),
        or plain ``text``."""
        fields, files = await self._form(request)
        if "file" not in files:
            return self._bad("Missing required parameter: 'file'.", "file")
        model = fields.get("model", "")
        seconds = round(files["file"] / AUDIO_BYTES_PER_SECOND, 2)
        text = f"A recording of {seconds} seconds."
        fmt = fields.get("response_format", "json")
        if fmt == "text":
            return web.Response(
                text=text + "\n", content_type="text/plain", headers=self._headers()
            )
        if model.startswith("gpt-"):
            audio_tokens = max(1, int(seconds * 10))
            usage: dict[str, Any] = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": len(text.split()),
                "total_tokens": audio_tokens + len(text.split()),
            }
        else:
            usage = {"type": "duration", "seconds": math.ceil(seconds)}
        payload: dict[str, Any] = {"text": text, "usage": usage}
        if fmt == "verbose_json":
            payload = {
                "task": "transcribe",
                "language": "english",
                "duration": seconds,
                "text": text,
                "segments": [],
                "usage": usage,
            }
        return self._json(request, payload)

    async def _stream(
        self,
        request: web.Request,
        base: dict[str, Any],
        pieces: list[str],
        usage: dict[str, Any] | None,
    ) -> web.StreamResponse:
        def chunk(choices: list[dict[str, Any]], with_usage: Any = ...) -> bytes:
            event: dict[str, Any] = {**base, "object": "chat.completion.chunk", "choices": choices}
            if usage is not None:
                event["usage"] = None if with_usage is ... else with_usage
            return b"data: " + orjson.dumps(event) + b"\n\n"

        events = [
            chunk(
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            ),
            *[
                chunk(
                    [{"index": 0, "delta": {"content": p}, "logprobs": None, "finish_reason": None}]
                )
                for p in pieces
            ],
            chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]),
        ]
        if usage is not None:
            events.append(chunk([], usage))
        events.append(b"data: [DONE]\n\n")
        return await self._write_events(request, events)

    async def _write_events(
        self,
        request: web.Request,
        events: list[bytes],
    ) -> web.StreamResponse:
        """Send SSE events one write each, honouring the faults (``cut_after``) and the gate."""
        fault = request[FAULT]
        headers = self._headers()
        compressor = None
        if self.compress_streams:
            headers["Content-Encoding"] = "gzip"
            compressor = gzip_stream()
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)
        try:
            for n, event in enumerate(events):
                if fault is not None and fault.cut_after is not None and n >= fault.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                data = compressor.send(event) if compressor is not None else event
                await resp.write(data)
                if n == 0:
                    self.first_chunk_sent.set()
                if n == self.gate_after - 1 and self.gate is not None:
                    await self.gate.wait()
            if compressor is not None:
                await resp.write(compressor.send(None))
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self.disconnected.set()
            raise
        return resp

    async def completions(self, request: web.Request) -> web.Response:
        req = orjson.loads(await request.read())
        prompt = req.get("prompt", "")
        text = f" echo {prompt}"
        return self._json(
            request,
            {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": req.get("model"),
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            },
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        try:
            req = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self._bad("We could not parse the JSON body of your request.")
        if req.get("input") is None or not req.get("model"):
            return self._bad("'input' is a required property", "input")
        self.embedding_calls += 1
        self.embedding_inputs.append(req["input"])
        return self._json(request, embeddings_payload(req))

    async def models(self, request: web.Request) -> web.Response:
        return self._json(
            request,
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
                    for m in MODELS
                ],
            },
        )

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in MODELS:
            return web.Response(
                status=404,
                body=error_body(
                    f"The model '{name}' does not exist", "invalid_request_error", "model_not_found"
                ),
                content_type="application/json",
                headers=self._headers(),
            )
        return self._json(
            request, {"id": name, "object": "model", "created": 1715367049, "owned_by": "system"}
        )

    async def delete_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        return self._json(request, {"id": name, "object": "model", "deleted": True})

    async def upload(self, request: web.Request) -> web.Response:
        if request.headers.get("Content-Encoding"):  # kept as received, then refused
            self.requests[-1].body = await request.read()
            return self._bad("Uploads must not be compressed.")
        reader = await request.multipart()
        purpose = None
        content = b""
        filename = None
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.read()).decode()
            elif part.name == "file":
                filename = part.filename
                content = bytes(await part.read())
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = content
        return self._json(
            request,
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
                "sha256": hashlib.sha256(content).hexdigest(),
            },
        )

    async def file_content(self, request: web.Request) -> web.Response:
        content = self.files.get(request.match_info["file_id"])
        if content is None:
            return web.Response(
                status=404,
                body=error_body("No such File object", "invalid_request_error", None),
                content_type="application/json",
            )
        return web.Response(
            body=content, content_type="application/octet-stream", headers=self._headers()
        )

    # -- the Batch API -----------------------------------------------------------------------
    def _no_batch_api(self) -> web.Response | None:
        if self.batch_api:
            return None
        return web.Response(
            status=404,
            body=error_body("Invalid URL (POST /v1/batches)", "invalid_request_error", None),
            content_type="application/json",
        )

    async def create_batch(self, request: web.Request) -> web.Response:
        if (missing := self._no_batch_api()) is not None:
            return missing
        req = orjson.loads(await request.read())
        content = self.files.get(req.get("input_file_id", ""))
        if content is None:
            return self._bad("No such File object", "input_file_id")
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}",
            "object": "batch",
            "endpoint": req.get("endpoint"),
            "errors": None,
            "input_file_id": req["input_file_id"],
            "completion_window": req.get("completion_window"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "completed_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": req.get("metadata"),
        }
        lines = [line for line in content.splitlines() if line.strip()]
        errors = []
        for n, line in enumerate(lines, 1):
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                errors.append({"code": "invalid_json_line", "message": "not JSON", "line": n})
                continue
            if (item.get("body") or {}).get("model") == "reject-batch":
                errors.append({"code": "invalid_model", "message": "model not allowed", "line": n})
                continue
            if item.get("url") != req.get("endpoint"):
                errors.append(
                    {
                        "code": "mismatched_endpoint",
                        "message": f"The url {item.get('url')} does not match the batch endpoint",
                        "line": n,
                    }
                )
        if errors:
            batch["status"] = "failed"
            batch["errors"] = {"object": "list", "data": errors}
        batch["request_counts"]["total"] = len(lines)
        batch["_lines"] = lines
        batch["_polls"] = 0
        self.batches[batch["id"]] = batch
        return self._json(request, _public(batch))

    def _batch(self, request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
        """The batch a request names, or the answer to give instead (no Batch API, no batch)."""
        if (missing := self._no_batch_api()) is not None:
            return None, missing
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return None, web.Response(
                status=404,
                body=error_body("No batch found", "invalid_request_error", None),
                content_type="application/json",
            )
        return batch, None

    async def get_batch(self, request: web.Request) -> web.Response:
        batch, missing = self._batch(request)
        if batch is None:
            assert missing is not None
            return missing
        batch["_polls"] += 1
        if batch["status"] == "validating":
            batch["status"] = "in_progress"
        elif batch["status"] == "cancelling":
            batch["status"] = "cancelled"
        elif batch["status"] == "in_progress" and batch["_polls"] >= self.batch_polls_to_finish:
            self._finish_batch(batch)
        return self._json(request, _public(batch))

    async def cancel_batch(self, request: web.Request) -> web.Response:
        batch, missing = self._batch(request)
        if batch is None:
            assert missing is not None
            return missing
        if batch["status"] in {"validating", "in_progress"}:
            batch["status"] = "cancelling"
        return self._json(request, _public(batch))

    def _finish_batch(self, batch: dict[str, Any]) -> None:
        """Answer every line (a body with model "fail-me" fails); the output file is written in
        reverse order, as the real one is in no particular order."""
        out, err = [], []
        for line in batch["_lines"]:
            item = orjson.loads(line)
            body = item["body"]
            rid = f"req_{uuid.uuid4().hex}"
            if body.get("model") == "fail-me":
                response = {
                    "status_code": 400,
                    "request_id": rid,
                    "body": orjson.loads(
                        error_body(
                            "The model `fail-me` does not exist",
                            "invalid_request_error",
                            "model_not_found",
                        )
                    ),
                }
                target = err
            else:
                payload = (
                    embeddings_payload(body)
                    if batch["endpoint"] == "/v1/embeddings"
                    else responses_payload(body)
                    if batch["endpoint"] == "/v1/responses"
                    else chat_payload(body)
                )
                response = {"status_code": 200, "request_id": rid, "body": payload}
                target = out
            target.append(
                orjson.dumps(
                    {
                        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
                        "custom_id": item["custom_id"],
                        "response": response,
                        "error": None,
                    }
                )
            )
        for lines, key in ((out, "output_file_id"), (err, "error_file_id")):
            if lines:
                file_id = f"file-{uuid.uuid4().hex[:24]}"
                self.files[file_id] = b"\n".join(reversed(lines)) + b"\n"
                batch[key] = file_id
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())
        batch["request_counts"] = {
            "total": len(out) + len(err),
            "completed": len(out),
            "failed": len(err),
        }

    async def unknown(self, request: web.Request) -> web.Response:
        return web.Response(
            status=404,
            body=error_body(
                f"Invalid URL ({request.method} {request.path})", "invalid_request_error", None
            ),
            content_type="application/json",
            headers=self._headers(),
        )


def gzip_stream() -> Any:
    """A generator: send() bytes, get their gzip-compressed flush; send(None) to finish."""
    import zlib

    def gen() -> Any:
        comp = zlib.compressobj(wbits=16 + zlib.MAX_WBITS)
        out = b""
        while True:
            data = yield out
            if data is None:
                yield comp.flush()
                return
            out = comp.compress(data) + comp.flush(zlib.Z_SYNC_FLUSH)

    g = gen()
    next(g)
    return g
