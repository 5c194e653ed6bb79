"""Opt-in token optimisations, applied to chat and Responses requests before the cache looks
them up (so the cache key is what is actually sent upstream):

- history trimming: keep every system/developer message and the most recent N others, never
  separating an assistant's tool calls from their results (Responses: a window never starts on a
  function call, its output or a reasoning item), and only above a token threshold;
- dynamic max_tokens: a request with no output limit gets min(cap, context window left, the
  model's output limit) in the field the model expects (``max_output_tokens`` for Responses).

Both change what is sent upstream (the body is re-serialised), which is why they are off unless
configured (``[optimize]``) or asked for (``x-thriftgate-trim: last-10``). A request that needs
neither costs this stage a few attribute checks.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any

import orjson
from aiohttp import web

from proxy.config import ModelInfo, OptimizeSettings
from proxy.context import RequestContext, context_of, counted
from proxy.endpoints import CHAT, RESPONSES
from proxy.inbound import Control
from proxy.tokens import Catalogue, count_request_async
from proxy.types import Handler, Stage

PINNED_ROLES = frozenset({"system", "developer"})
RESULT_ROLES = frozenset({"tool", "function"})
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_REASONING = re.compile(r"^(o\d|gpt-5)")
TRIM_KEEPS = (5, 10, 20)  # the usage line's ``trim_tokens``: what trimming to these would drop


def keep_for(control: Control, settings: OptimizeSettings) -> int | None:
    """How many recent messages to keep for this request (None: no trimming), from its
    already-checked ``x-thriftgate-trim`` header or the configuration."""
    if control.trim_off:
        return None
    if control.trim_keep is not None:
        return control.trim_keep
    return settings.trim_keep if settings.trim else None


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _attached(message: Any) -> bool:
    """A chat message that belongs to the one before it (a tool result)."""
    return _role(message) in RESULT_ROLES


def _attached_item(item: Any) -> bool:
    """A Responses input item that cannot start a window: anything but a message (function calls
    and their outputs, reasoning items, built-in tool calls go with what came before)."""
    return not isinstance(item, dict) or item.get("type", "message") != "message" or not _role(item)


def trim_cut(messages: list[Any], keep: int, *, items: bool = False) -> int | None:
    """Where trimming to the last ``keep`` messages cuts (messages before it go, but for the
    system/developer ones), or None when nothing would go. The cut never falls between an
    assistant's tool calls and the tool results answering them: it moves back to that assistant
    message (keeping a few more than ``keep``). ``items``: a Responses ``input`` list, whose
    window starts on a message."""
    others = [i for i, m in enumerate(messages) if _role(m) not in PINNED_ROLES]
    if len(others) <= keep:
        return None
    attached = _attached_item if items else _attached
    position = len(others) - keep
    while position > 0 and attached(messages[others[position]]):
        position -= 1
    return others[position] if position else None


def trim_history(messages: list[Any], keep: int, *, items: bool = False) -> list[Any]:
    """System/developer messages and the last ``keep`` others, in their order (``trim_cut``)."""
    cut = trim_cut(messages, keep, items=items)
    if cut is None:
        return messages
    return [m for i, m in enumerate(messages) if i >= cut or _role(m) in PINNED_ROLES]


def trim_savings(
    messages: list[Any], sizes: tuple[int, ...], keeps: tuple[int, ...], *, items: bool = False
) -> dict[str, int] | None:
    """For each N of ``keeps``: the prompt tokens trimming to the last N messages would drop,
    from the messages' counted ``sizes`` (``Count.sizes``); None when no N would drop any."""
    if len(sizes) != len(messages):
        return None
    out = {}
    for keep in keeps:
        cut = trim_cut(messages, keep, items=items)
        if cut is not None:
            out[str(keep)] = sum(
                size
                for size, message in zip(sizes[:cut], messages[:cut], strict=True)
                if _role(message) not in PINNED_ROLES
            )
    return out or None


def output_field(model: str, endpoint: str = CHAT) -> str:
    """``max_output_tokens`` for Responses; ``max_completion_tokens`` for o-series and gpt-5
    models (they refuse ``max_tokens``)."""
    if endpoint == RESPONSES:
        return "max_output_tokens"
    return "max_completion_tokens" if _REASONING.match(model) else "max_tokens"


def dynamic_max_tokens(
    body: dict[str, Any], prompt: int, info: ModelInfo | None, cap: int, endpoint: str = CHAT
) -> tuple[str, int] | None:
    """The output limit to set, or None when the request has one or the model is unknown."""
    if info is None or not isinstance(body.get("model"), str):
        return None
    if any(body.get(f) is not None for f in OUTPUT_FIELDS):
        return None
    room = info.context_window - prompt
    value = min(cap, room, info.max_output_tokens or room)
    if value < 1:
        return None
    return output_field(body["model"], endpoint), value


class OptimizeStage(Stage):
    """Trims history and sets an output limit on chat requests that ask for it (or whose
    configuration does), before the cache: the request is counted here, and the count is kept
    for the budget stage (``ctx.count``)."""

    def __init__(self, settings: OptimizeSettings, catalogue: Catalogue) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.configured = settings.trim or settings.dynamic_max_tokens

    def __call__(  # type: ignore[override]
        self, request: web.Request, handler: Handler
    ) -> Awaitable[web.StreamResponse]:
        """A request with nothing to optimise (every request, unless configured or asked) is
        handed on as it is: the next stage's awaitable, without a coroutine of this stage's."""
        ctx = context_of(request)
        if ctx is not None and self.acts_on(ctx):
            return self._optimised(request, handler, ctx, keep_for(ctx.control, self.settings))
        return handler(request)

    def acts_on(self, ctx: RequestContext) -> bool:
        """Whether this stage changes (or may change) the request: trimming or an output limit
        configured or asked for, on a readable chat or Responses body."""
        return (
            ctx.body is not None
            and ctx.unreadable is None
            and (self.configured or ctx.control.trim_keep is not None)
            and ctx.endpoint in (CHAT, RESPONSES)
            and (
                keep_for(ctx.control, self.settings) is not None or self.settings.dynamic_max_tokens
            )
        )

    async def _optimised(
        self, request: web.Request, handler: Handler, ctx: RequestContext, keep: int | None
    ) -> web.StreamResponse:
        await self._optimise(ctx, keep)
        return await handler(request)

    async def _optimise(self, ctx: RequestContext, keep: int | None) -> None:
        count = await counted(ctx)
        if count is None:
            return
        assert ctx.body is not None
        body = ctx.body
        done: dict[str, Any] = {}
        field = "input" if ctx.endpoint == RESPONSES else "messages"
        messages = body.get(field)
        if (
            keep is not None
            and isinstance(messages, list)
            and count.tokens > self.settings.trim_threshold_tokens
        ):
            kept = trim_history(messages, keep, items=ctx.endpoint == RESPONSES)
            if len(kept) < len(messages):
                body = {**body, field: kept}
                before = count.tokens
                count = await count_request_async(ctx.endpoint, body, len(ctx.raw or b""))
                done.update(
                    trim=f"last-{keep}",
                    messages_dropped=len(messages) - len(kept),
                    tokens_saved=before - count.tokens,
                )
        if self.settings.dynamic_max_tokens:
            limit = dynamic_max_tokens(
                body,
                count.tokens,
                self.catalogue.lookup(ctx.model),
                self.settings.max_tokens_cap,
                ctx.endpoint,
            )
            if limit is not None:
                body = {**body, limit[0]: limit[1]}
                done.update(max_tokens_field=limit[0], max_tokens=limit[1])
        if done:
            try:
                raw = orjson.dumps(body)
            except TypeError:  # nested deeper than orjson writes: leave the request alone
                ctx.unreadable = "body"
                return
            ctx.body, ctx.raw, ctx.rewritten = body, raw, True
            ctx.extra["optimized"] = done
        ctx.count = count
