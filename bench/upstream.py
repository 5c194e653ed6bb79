"""A fast static OpenAI-like upstream for benchmarks: canned JSON chat answers, short SSE streams.

Run: python bench/upstream.py PORT
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1730000000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Benchmark answer.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }
)
# a Response object as the Responses API returns it, with its usage
RESPONSE = orjson.dumps(
    {
        "id": "resp_bench",
        "object": "response",
        "created_at": 1730000000,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": "You are terse.",
        "max_output_tokens": None,
        "model": "gpt-4o-mini-2024-07-18",
        "output": [
            {
                "type": "message",
                "id": "msg_bench",
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "Benchmark answer.", "annotations": []}
                ],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "store": True,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "usage": {
            "input_tokens": 20,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 3,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 23,
        },
    }
)
HEADERS = {
    "x-request-id": "req_bench",
    "openai-processing-ms": "1",
    "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-remaining-tokens": "999999",
}
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1730000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}'
    b"\n\n"
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' in body:
        resp = web.StreamResponse(headers=HEADERS)
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        for _ in range(3):
            await resp.write(CHUNK)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    return web.Response(body=ANSWER, content_type="application/json", headers=HEADERS)


async def responses(request: web.Request) -> web.StreamResponse:
    await request.read()
    return web.Response(body=RESPONSE, content_type="application/json", headers=HEADERS)


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/responses", responses)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
