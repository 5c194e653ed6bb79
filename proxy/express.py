"""The express lane: a cache hit answered the moment its request has arrived.

A request that arrives whole on an idle keep-alive connection is looked at by the connection
itself (``server.ProxyRequestHandler``), before aiohttp makes a request object, a task and a
response for it. When it is a POST to a text endpoint whose answer is in this process's memory
(the memory cache, or Redis's local copy), and nothing before the cache in the chain would act on
it, the lane writes the stored answer at once: the very bytes the chain's hit writes (status
line, replayed headers, ``x-thriftgate-cache: HIT``, ``age``, ``Content-Length``, ``Date``,
``Server``), concluded like the chain's hit (one usage line, the same metrics and accounting).

Everything else goes down the chain as before. The lane does the front of the context stage's
work first (the request id, the key's identity, the path and header checks, the body read and
parsed: ``RequestContextStage.begin``, ``admit``, ``take_body``); a request it does not answer
carries that work to the chain (``context.Prepared``), so a miss does it once, and an error the
lane found is raised where the chain would have found it. The lane leaves to the chain: HTTP/1.0,
``Connection: close``, ``Expect``, a ``Cache-Control`` header, a body still arriving, a
connection with requests queued or writes paused, a request the optimise stage would change.

``server.express = false`` turns it off (every hit then goes through the chain).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import hdrs
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.streams import StreamReader

from proxy.context import Prepared, RequestContextStage
from proxy.endpoints import ENDPOINTS

if TYPE_CHECKING:
    from proxy.cache import CacheStage
    from proxy.optimize import OptimizeStage


class ExpressLane:
    """Answers what it can of a request that has arrived whole (see the module's docstring)."""

    def __init__(
        self, context: RequestContextStage, optimize: OptimizeStage, cache: CacheStage
    ) -> None:
        self.context = context
        self.optimize = optimize
        self.cache = cache

    def take(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        write: Callable[[bytes], None],
    ) -> bool | Prepared:
        """True: answered (written with ``write``). Else what it made of the request for the
        chain (``Prepared``), or False when it did not look (nothing read)."""
        url = message.url
        if (
            message.method != "POST"
            or message.version != HttpVersion11
            or message.should_close
            or url.absolute
            or not payload.is_eof()
        ):
            return False
        path = url.path
        endpoint = ENDPOINTS.get(path)
        headers = message.headers
        if endpoint is None or not endpoint.text or hdrs.EXPECT in headers:
            return False
        context = self.context
        ctx = context.begin("POST", path, url.query_string, headers)
        prepared = Prepared(payload, ctx)
        try:
            context.admit(ctx, message.path, headers)
            context.take_body(ctx, context.whole_body(payload), headers)
            if self.optimize.acts_on(ctx):
                return prepared
            hit = self.cache.express_hit(ctx, headers.get(hdrs.CACHE_CONTROL))
            if hit is None:
                return prepared
            status, answer = hit
            context.answered(ctx, status)  # concluded on the next turn, after the write below
        except Exception as exc:  # the chain raises it where it would have found it
            prepared.error = exc
            return prepared
        write(answer)  # last: nothing after it can fail and leave the answer sent twice
        return True
