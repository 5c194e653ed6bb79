"""Opt-in token optimisations, applied by the budget stage before anything is reserved:

- history trimming: keep every system/developer message and the most recent N others, never
  separating an assistant's tool calls from their results, and only above a token threshold;
- dynamic max_tokens: a chat request with no output limit gets min(cap, context window left, the
  model's output limit) in the field the model expects.

Both change what is sent upstream (the body is re-serialised), which is why they are off unless
configured (``[optimize]``) or asked for (``x-thriftgate-trim: last-10``).
"""

from __future__ import annotations

import re
from typing import Any

from proxy.config import ModelInfo, OptimizeSettings
from proxy.errors import InvalidRequest

TRIM_HEADER = "X-Thriftgate-Trim"
PINNED_ROLES = frozenset({"system", "developer"})
RESULT_ROLES = frozenset({"tool", "function"})
OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens")
_REASONING = re.compile(r"^(o\d|gpt-5)")
_TRIM = re.compile(r"^last-(\d{1,4})$")


def trim_keep(header: str | None, settings: OptimizeSettings) -> int | None:
    """How many recent messages to keep for this request (None: no trimming)."""
    if header is None:
        return settings.trim_keep if settings.trim else None
    value = header.strip().lower()
    if value in {"off", "none", "no", "0"}:
        return None
    match = _TRIM.match(value)
    if match is None or int(match.group(1)) < 1:
        raise InvalidRequest(
            f"Invalid {TRIM_HEADER} header {header!r}: use last-N (for example last-10) or off.",
            code="invalid_header",
        )
    return int(match.group(1))


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def trim_history(messages: list[Any], keep: int) -> list[Any]:
    """System/developer messages and the last ``keep`` others, in their order. The cut never
    falls between an assistant's tool calls and the tool results answering them: it moves back to
    that assistant message (keeping a few more than ``keep``)."""
    others = [i for i, m in enumerate(messages) if _role(m) not in PINNED_ROLES]
    if len(others) <= keep:
        return messages
    position = len(others) - keep
    while position > 0 and _role(messages[others[position]]) in RESULT_ROLES:
        position -= 1
    if position == 0:
        return messages
    cut = others[position]
    return [m for i, m in enumerate(messages) if i >= cut or _role(m) in PINNED_ROLES]


def output_field(model: str) -> str:
    """``max_completion_tokens`` for o-series and gpt-5 models (they refuse ``max_tokens``)."""
    return "max_completion_tokens" if _REASONING.match(model) else "max_tokens"


def dynamic_max_tokens(
    body: dict[str, Any], prompt: int, info: ModelInfo | None, cap: int
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
    return output_field(body["model"]), value
