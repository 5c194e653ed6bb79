"""The least a Python proxy can do: read the request, forward it with aiohttp, return the answer.

The yardstick thriftgate is compared with. Run: python bench/bare_forwarder.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        url = upstream + request.raw_path[3:]
        async with request.app["session"].request(
            request.method, url, data=body, headers=headers
        ) as resp:
            out = {k: v for k, v in resp.headers.items() if k.lower() not in HOP}
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                stream = web.StreamResponse(status=resp.status, headers=out)
                await stream.prepare(request)
                async for chunk in resp.content.iter_any():
                    await stream.write(chunk)
                await stream.write_eof()
                return stream
            return web.Response(status=resp.status, body=await resp.read(), headers=out)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    web.run_app(
        app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
