"""One outcome per request: what a finished call used and cost, decided once, in this file.

When an answer has been delivered (or a request ended without one) the request context stage
calls ``conclude``, which builds one ``Outcome`` (read-only by contract): status and error, the
``usage`` object and where it came from, the token counts, the cost by the price table, what a
cache hit saved, latency and time to first token, and an images or audio call's own facts.
The same outcome is then handed to every settler a stage registered (budgets, rate limits, the
cache's store, in any order: none writes what another reads) and to the usage log, which gives it
to the metrics and the alert rules. Every number in a usage line comes from here (``Outcome.line``).

Where the usage comes from, first found wins:

1. the answer the proxy produced itself: a cache hit carries the stored answer's usage;
2. the usage chunk the proxy asked for and took out of a stream (``usage.force_stream_usage``);
3. the answer's own ``usage`` (``proxy.answers``), in a JSON body or the last events of a stream;
4. a stream that carried none (the client did not ask for it, or it ended early): the prompt
   counted before the call plus the text actually streamed (``tokens_source: estimated``, or
   ``estimated_partial`` when the prompt was counted in part).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy import tokens

if TYPE_CHECKING:
    from proxy.answers import UsageRecorder
    from proxy.context import RequestContext
    from proxy.pricing import PriceTable


def token_fields(usage: dict[str, Any] | None) -> dict[str, int | None]:
    """Normalise chat/embeddings (prompt/completion) and Responses (input/output) usage."""
    if not usage:
        return {
            "prompt_tokens": None,
            "cached_tokens": None,
            "completion_tokens": None,
            "reasoning_tokens": None,
            "total_tokens": None,
        }
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    total = usage.get("total_tokens")
    if total is None and isinstance(prompt, int):
        total = prompt + (completion if isinstance(completion, int) else 0)
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return {
        "prompt_tokens": prompt,
        "cached_tokens": prompt_details.get("cached_tokens")
        if isinstance(prompt_details, dict)
        else None,
        "completion_tokens": completion,
        "reasoning_tokens": out_details.get("reasoning_tokens")
        if isinstance(out_details, dict)
        else None,
        "total_tokens": total,
    }


@dataclass(slots=True)  # not frozen: a frozen init costs a request ~1% (callgrind); by contract
class Outcome:
    """How one request ended. Built once by ``conclude``; read, never written, by everyone."""

    ctx: RequestContext  # what the request was and what the stages decided on the way in
    status: int
    error: str | None  # None: answered (any status) and delivered whole
    model: str | None  # the request's model, else the answer's (endpoints the proxy does not read)
    usage: dict[str, Any] | None  # the usage object, as found (see the module's docstring)
    tokens_source: str | None  # upstream | estimated | estimated_partial; None without usage
    tokens: dict[str, int | None]  # ``token_fields(usage)``
    price_usd: float | None  # what the call cost by the price table (a hit: the original's)
    latency_ms: float
    ttft_ms: float | None = None  # streams: time to the first byte of the answer's body
    media: dict[str, Any] = field(default_factory=dict)  # images and audio: the line's facts
    upstream_error: str | None = None  # an upstream error answer's own code (else its type)

    @property
    def failed(self) -> bool:
        """An error answer or no answer at all: not charged (a client that left, 499, is)."""
        return self.status >= 400 and self.status != 499

    @property
    def hit(self) -> bool:
        return self.ctx.cache == "hit"

    @property
    def cost_usd(self) -> float | None:
        """What the call cost this time: nothing for a cache hit."""
        return 0.0 if self.hit and self.price_usd is not None else self.price_usd

    @property
    def saved_usd(self) -> float | None:
        """What a cache hit saved: the price of the answer it replayed."""
        return self.price_usd if self.hit else None

    @property
    def spent(self) -> dict[str, int | None] | None:
        """What budgets and rate limits settle on: the tokens used; zeros for a call that failed
        (not charged); None when it is not known (the estimate made before the call stands)."""
        if self.tokens["prompt_tokens"] is not None:
            return self.tokens
        if self.failed:
            return dict.fromkeys(self.tokens, 0)
        return None

    def line(self, ts: str) -> dict[str, Any]:
        """The usage line."""
        ctx = self.ctx
        return {
            "ts": ts,
            "request_id": ctx.request_id,
            "upstream_request_id": ctx.upstream_request_id,
            "upstream": ctx.upstream,
            "key": ctx.key,
            "key_alias": ctx.key_alias,
            "user": ctx.user,
            "tags": ctx.tags,
            "method": ctx.method,
            "endpoint": ctx.endpoint,
            "model": self.model,
            "stream": ctx.stream,
            "status": self.status,
            "cache": ctx.cache,
            "request_hash": ctx.request_hash,
            **self.tokens,
            "tokens_source": self.tokens_source,
            "prompt_tokens_estimate": ctx.prompt_estimate,
            "prompt_tokens_estimate_source": ctx.prompt_source,
            "cost_usd": self.cost_usd,
            "saved_usd": self.saved_usd,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "upstream_ms": ctx.upstream_ms,
            "attempts": ctx.attempts,
            "retry_wait_ms": ctx.retry_wait_ms,
            "rate_limited_ms": ctx.rate_limited_ms,
            "error": self.error,
            "upstream_error": self.upstream_error,
            **ctx.extra,
            **self.media,
        }


Settler = Callable[[Outcome], None]


def conclude(
    ctx: RequestContext,
    prices: PriceTable | None,
    *,
    status: int,
    error: str | None,
    latency_ms: float,
    ttft_ms: float | None = None,
    recorder: UsageRecorder | None = None,
    taken_usage: dict[str, Any] | None = None,
) -> Outcome:
    """The outcome of ``ctx``'s request. ``recorder`` watched the answer's body as it passed;
    ``taken_usage`` is the usage chunk a transform took out of the stream."""
    usage = ctx.hit_usage if ctx.cache == "hit" else taken_usage
    source: str | None = "upstream"
    model = ctx.model
    answer = None
    if usage is None and recorder is not None and status < 300:
        usage = recorder.usage()
        answer = recorder.answer
        if model is None and usage is not None:
            model = recorder.model  # endpoints the proxy does not parse
        if usage is None and recorder.sse:
            usage = _estimated(ctx, recorder.streamed_text())
            source = "estimated_partial" if ctx.prompt_source == "partial" else "estimated"
    media: dict[str, Any] = {}
    if ctx.media is not None and recorder is not None:  # an answer was delivered
        _media_facts(ctx, answer if status < 300 else None, usage, media)
        model = model or ctx.media.model
    memo = ctx.hit_memo if ctx.cache == "hit" and ctx.media is None else None
    known = memo.get(model) if memo is not None else None
    if known is not None:  # a hit on an entry already counted: the same usage, the same price
        fields, price = known
    else:
        fields = token_fields(usage)
        price = _price(ctx, model, status, usage, fields, prices)
        if memo is not None and len(memo) < 8:
            memo[model] = (fields, price)
    return Outcome(
        ctx=ctx,
        status=status,
        error=error,
        model=model,
        usage=usage,
        tokens_source=source if usage else None,
        tokens=fields,  # never written (shared by the hits of one entry)
        price_usd=price,
        latency_ms=latency_ms,
        ttft_ms=ttft_ms,
        media=media,
        upstream_error=recorder.error_code() if recorder is not None and status >= 400 else None,
    )


def _price(
    ctx: RequestContext,
    model: str | None,
    status: int,
    usage: dict[str, Any] | None,
    fields: dict[str, int | None],
    prices: PriceTable | None,
) -> float | None:
    """Text endpoints by their token usage, images and audio by their own units
    (``media_cost``); None when it cannot be known."""
    if prices is None:
        return None
    if ctx.media is not None and ctx.kind is not None:
        if usage is None and status >= 300:
            return None
        return prices.media_cost(ctx.kind, usage, ctx.media)
    return prices.cost(model, fields)


def _estimated(ctx: RequestContext, text: str | None) -> dict[str, Any] | None:
    """A stream's usage from the prompt counted before the call and the text it streamed,
    counted with the model's encoding; None for what is not a text endpoint."""
    if (text is None and ctx.prompt_estimate is None) or ctx.kind != "text":
        return None
    name, _ = tokens.encoding_name_for(ctx.model)
    completion = len(tokens.encoding(name).encode_ordinary(text)) if text else 0
    prompt = ctx.prompt_estimate or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _media_facts(
    ctx: RequestContext,
    answer: dict[str, Any] | None,
    usage: dict[str, Any] | None,
    out: dict[str, Any],
) -> None:
    """An images or audio answer's facts, noted (``ctx.media``) and put in ``out`` for the usage
    line."""
    media = ctx.media
    assert media is not None
    if answer is not None:
        media.read_answer(answer)
    if media.images is not None:
        out["images"] = media.images
    if media.size is not None and ctx.kind == "image":
        out["image_size"] = media.size
    if media.quality is not None and ctx.kind == "image":
        out["image_quality"] = media.quality
    seconds = media.audio_seconds(usage)
    if seconds is not None:
        out["audio_seconds"] = seconds
    if media.characters is not None:
        out["characters"] = media.characters
