"""The token budget stage: tokens counted before the call, and the context guard.

Every request to the optimised endpoints that reaches it (cache hits do not) is counted offline
(``proxy.tokens``); the estimate goes to the client as ``x-thriftgate-prompt-tokens``. A chat or
completion whose prompt plus requested output cannot fit the model's context window (from the
catalogue) is refused with OpenAI's own ``context_length_exceeded`` error before any upstream
call. Per-key budgets are still to come; until then this stage only counts and guards.
"""

from __future__ import annotations

from aiohttp import web

from proxy.context import RequestContext, context_of
from proxy.errors import ContextLengthExceeded
from proxy.tokens import Catalogue, Count, count_request_async
from proxy.types import Handler, Stage

PROMPT_TOKENS_HEADER = "x-thriftgate-prompt-tokens"


def requested_output(body: dict[str, object]) -> int:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


class BudgetStage(Stage):
    def __init__(self, catalogue: Catalogue) -> None:
        self.catalogue = catalogue

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if ctx is None or not ctx.optimised or ctx.body is None:
            return await handler(request)
        size = len(ctx.raw) if ctx.raw is not None else 0
        count = await count_request_async(ctx.endpoint, ctx.body, size)
        ctx.prompt_estimate = count.tokens
        self._guard(ctx, count)
        resp = await handler(request)
        resp.headers[PROMPT_TOKENS_HEADER] = str(count.tokens)
        return resp

    def _guard(self, ctx: RequestContext, count: Count) -> None:
        """Refuse what cannot fit, as OpenAI would: not when parts were estimated (an image of
        unknown size could refuse a request that fits), and not for embeddings (their limit is per
        input, and OpenAI reports it). A model the catalogue knows but tiktoken does not (one added
        in the config) is counted with o200k_base and guarded all the same."""
        if count.parts_estimated or ctx.endpoint == "/v1/embeddings":
            return
        info = self.catalogue.lookup(ctx.model)
        if info is None:
            return
        assert ctx.body is not None
        output = requested_output(ctx.body)
        if count.tokens + output > info.context_window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {info.context_window} tokens. However, "
                f"you requested {count.tokens + output} tokens ({count.tokens} in the messages, "
                f"{output} in the completion). Please reduce the length of the messages or "
                "completion.",
                param="messages",
            )
