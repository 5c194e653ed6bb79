"""The admission stage: what a text request is before anyone pays for it.

For every request to the text endpoints (chat, completions, embeddings, Responses) that reaches it
(cache hits do not, and cost nothing):

1. the prompt is counted offline (``proxy.tokens``; the optimise stage may have counted it
   already) and the count is returned in ``x-thriftgate-prompt-tokens`` (with
   ``x-thriftgate-prompt-tokens-source``: exact, approximate or partial). A body the counter cannot
   read goes on uncounted (``ctx.unreadable`` names the field: the budget and rate-limit stages
   refuse it for a key that needs the count);
2. a chat or completion whose prompt plus requested output cannot fit the model's context window
   is refused with OpenAI's own ``context_length_exceeded`` error before any upstream call;
3. with ``usage.force_stream_usage``, a stream that did not ask for its usage chunk asks for it
   upstream, and the chunk is taken out of what the client receives (``UsageStripper``), so the
   call is settled to exact usage and the client gets the bytes it would have got.

The budget and rate-limit stages after it reserve from ``ctx.prompt_estimate`` and
``ctx.output_limit``.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from proxy.answers import UsageStripper
from proxy.context import RequestContext, context_of, counted
from proxy.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from proxy.errors import ContextLengthExceeded
from proxy.optimize import TRIM_KEEPS, trim_savings
from proxy.tokens import Catalogue, Count
from proxy.types import Handler, Stage
from proxy.upstream import Reply

PROMPT_TOKENS_HEADER = "x-thriftgate-prompt-tokens"
PROMPT_SOURCE_HEADER = "x-thriftgate-prompt-tokens-source"  # exact | approximate | partial


def requested_output(body: dict[str, object]) -> int:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


class AdmissionStage(Stage):
    def __init__(self, catalogue: Catalogue, *, force_stream_usage: bool = False) -> None:
        self.catalogue = catalogue
        self.force_usage = force_stream_usage

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None or not ctx.optimised:
            return await handler(request)
        count = await counted(ctx)
        if count is None:  # unreadable: the stages that need the count refuse it
            return await handler(request)
        ctx.prompt_estimate = count.tokens
        ctx.prompt_source = count.source
        assert ctx.body is not None
        ctx.output_limit = requested_output(ctx.body)
        if count.sizes:  # a long conversation: what trimming it would save, for --what-if
            responses = ctx.endpoint == RESPONSES
            listed = ctx.body.get("input" if responses else "messages")
            saved = trim_savings(listed, count.sizes, TRIM_KEEPS, items=responses)
            if saved:
                ctx.extra["trim_tokens"] = saved
        self._guard(ctx, count)
        strip = self._force_stream_usage(ctx)
        resp = await handler(request)
        resp.headers[PROMPT_TOKENS_HEADER] = str(count.tokens)
        resp.headers[PROMPT_SOURCE_HEADER] = count.source
        if strip and isinstance(resp, Reply) and resp.status < 300:
            self._strip_usage(resp)
        return resp

    # -- exact usage for streams ------------------------------------------------------------------

    def _force_stream_usage(self, ctx: RequestContext) -> bool:
        """With ``usage.force_stream_usage``: ask for the usage chunk the client did not ask for
        (the request sent upstream changes; the client's stream will not)."""
        if not self.force_usage or not ctx.stream or ctx.endpoint not in (CHAT, COMPLETIONS):
            return False  # embeddings do not stream; Responses streams always carry usage
        assert ctx.body is not None
        options = ctx.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        if options is not None and not isinstance(options, dict):
            return False  # the upstream will refuse it as it is; leave that to it
        body = {**ctx.body, "stream_options": {**(options or {}), "include_usage": True}}
        try:
            ctx.raw = orjson.dumps(body)
        except TypeError:  # nested deeper than orjson writes: leave the request alone
            return False
        ctx.body, ctx.rewritten = body, True
        return True

    @staticmethod
    def _strip_usage(reply: Reply) -> None:
        """The usage chunk is taken out as the stream passes; the outcome reads it from the
        transform (``proxy.outcome``)."""
        if reply.headers.get("Content-Encoding"):  # a compressed stream is passed as it is
            return
        reply.transform = UsageStripper()

    # -- the context guard -----------------------------------------------------------------------

    def _guard(self, ctx: RequestContext, count: Count) -> None:
        """Refuse what cannot fit, as OpenAI would: not when parts were estimated (an image of
        unknown size could refuse a request that fits), and not for embeddings (their limit is per
        input, and OpenAI reports it). A model the catalogue knows but tiktoken does not (one added
        in the config) is counted with o200k_base and guarded all the same."""
        if count.parts_estimated or ctx.endpoint == EMBEDDINGS:
            return
        info = self.catalogue.lookup(ctx.model)
        if info is None:
            return
        output = ctx.output_limit or 0
        if count.tokens + output > info.context_window:
            field = "input" if ctx.endpoint == RESPONSES else "messages"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {info.context_window} tokens. However, "
                f"you requested {count.tokens + output} tokens ({count.tokens} in the {field}, "
                f"{output} in the completion). Please reduce the length of the {field} or "
                "completion.",
                param=field,
            )
