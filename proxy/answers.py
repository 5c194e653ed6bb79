"""Reading the ``usage`` object out of an answer as it passes, never delaying it.

``UsageRecorder`` finds it in a JSON answer (in the tail of one too large to parse), or in the last
events of an SSE stream (the ``include_usage`` chunk, Responses' ``response.completed``), and for a
stream keeps the text it carried (to estimate the tokens of one that ends without usage).
``UsageStripper`` takes out of a stream the usage chunk the proxy asked for and the client did not.
What the numbers then mean (tokens, cost, savings) is ``proxy.outcome``'s job.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from proxy.decoding import Decoder

JSON_LIMIT = 8 * 1024 * 1024  # a JSON answer larger than this is not inspected for usage
TEXT_LIMIT = 4 * 1024 * 1024  # characters of a stream's text kept to estimate its tokens
SSE_TAIL = 64 * 1024  # the usage chunk is among the last events of a stream


class UsageRecorder:
    """Observer of a reply's body that extracts the upstream's ``usage`` object, and for a stream
    the client asked for without usage (``collect_text``), the text it streamed."""

    __slots__ = (
        "_buf",
        "_decoder",
        "_line",
        "_too_big",
        "answer",
        "json",
        "model",
        "sse",
        "text",
        "text_chars",
    )

    def __init__(
        self, content_type: str | None, content_encoding: str | None, collect_text: bool = False
    ) -> None:
        ctype = (content_type or "").lower()
        self.sse = ctype.startswith("text/event-stream")
        self.json = not self.sse and "json" in ctype
        self._decoder = Decoder(content_encoding) if content_encoding else None
        self._buf = bytearray()
        self._too_big = False
        self.text: list[str] | None = [] if collect_text and self.sse else None
        self.text_chars = 0
        self._line = b""
        self.model: str | None = None  # the answer's own "model", once usage() has read it
        self.answer: dict[str, Any] | None = None  # a JSON answer, once usage() has read it

    def feed(self, chunk: bytes) -> None:
        data = self._decoder.feed(chunk) if self._decoder is not None else chunk
        if not data:
            return
        if self.text is not None:
            self._collect(data)
        self._buf += data
        if self.sse:
            if len(self._buf) > 2 * SSE_TAIL:
                del self._buf[: len(self._buf) - SSE_TAIL]
        elif len(self._buf) > JSON_LIMIT:
            # a JSON answer this large (images as base64) is not parsed whole: its tail, where
            # the usage object is written, is kept
            self._too_big = True
            del self._buf[: len(self._buf) - SSE_TAIL]
        elif self._too_big and len(self._buf) > 2 * SSE_TAIL:
            del self._buf[: len(self._buf) - SSE_TAIL]

    def _collect(self, data: bytes) -> None:
        """The streamed text of complete ``data:`` events: content, refusals, tool arguments,
        legacy completions' text (at most TEXT_LIMIT characters)."""
        lines = (self._line + data).split(b"\n")
        self._line = lines.pop()
        for line in lines:
            if not line.startswith(b"data:") or self.text_chars > TEXT_LIMIT:
                continue
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                continue  # [DONE], or not JSON
            if not isinstance(event, dict):
                continue
            if isinstance(event.get("type"), str) and event["type"].endswith(".delta"):
                delta = event.get("delta")  # Responses API: output_text, refusal, arguments
                if isinstance(delta, str) and delta:
                    self.text.append(delta)  # type: ignore[union-attr]
                    self.text_chars += len(delta)
                continue
            choices = event.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                parts = [choice.get("text")]
                if isinstance(delta, dict):
                    parts += [delta.get("content"), delta.get("refusal")]
                    for call in delta.get("tool_calls") or ():
                        if isinstance(call, dict) and isinstance(call.get("function"), dict):
                            parts += [
                                call["function"].get("name"),
                                call["function"].get("arguments"),
                            ]
                for part in parts:
                    if isinstance(part, str) and part:
                        self.text.append(part)  # type: ignore[union-attr]
                        self.text_chars += len(part)

    def streamed_text(self) -> str | None:
        return "".join(self.text) if self.text else None

    def error_code(self) -> str | None:
        """An error answer's ``error.code`` (else its ``error.type``), read from its JSON body."""
        if not self.json or self._too_big or (self._decoder is not None and self._decoder.failed):
            return None
        try:
            body = orjson.loads(self._buf)
        except orjson.JSONDecodeError:
            return None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return None
        code = error.get("code") or error.get("type")
        return str(code)[:64] if isinstance(code, str | int) else None

    def usage(self) -> dict[str, Any] | None:
        if (self._decoder is not None and self._decoder.failed) or not self._buf:
            return None
        if self._too_big:
            return _usage_from_tail(bytes(self._buf))
        if self.json:
            try:
                body = orjson.loads(self._buf)
            except orjson.JSONDecodeError:
                return None
            if not isinstance(body, dict):
                return None
            if isinstance(body.get("response"), dict):  # Responses API envelope events
                body = body["response"]
            found = body.get("usage")
            if isinstance(body.get("model"), str):
                self.model = body["model"]
            self.answer = body
            return found if isinstance(found, dict) else None
        return _usage_from_sse(bytes(self._buf))


_USAGE_KEY = b'"usage":'


def _usage_from_tail(tail: bytes) -> dict[str, Any] | None:
    """The last ``"usage": {...}`` object in the tail of a JSON answer too large to parse whole."""
    at = tail.rfind(_USAGE_KEY)
    if at < 0:
        return None
    text = tail[at + len(_USAGE_KEY) :].decode("utf-8", "replace").lstrip()
    try:
        found, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def _usage_from_sse(tail: bytes) -> dict[str, Any] | None:
    for line in reversed(tail.splitlines()):
        if not line.startswith(b"data:") or b'"usage"' not in line:
            continue
        try:
            event = orjson.loads(line[5:].strip())
        except orjson.JSONDecodeError:
            continue
        if not isinstance(event, dict):
            continue
        found = event.get("usage")
        if found is None and isinstance(event.get("response"), dict):
            found = event["response"].get("usage")
        if isinstance(found, dict):
            return found
    return None


class UsageStripper:
    """For ``usage.force_stream_usage``: the upstream was asked for the usage chunk the client did
    not ask for; take it out of the stream (keeping the usage) and take out the ``"usage":null``
    each other chunk then carries, so the client gets the bytes it would have got."""

    __slots__ = ("_buf", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._buf = data
            return b""
        self._buf = data[cut + 2 :]
        return b"".join(self._event(e) for e in data[: cut + 2].split(b"\n\n") if e)

    def end(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._event(rest) if rest else b""

    def _event(self, event: bytes) -> bytes:
        if b'"usage":' not in event:
            return event + b"\n\n"
        if b'"choices":[]' in event and event.startswith(b"data:"):
            try:
                found = orjson.loads(event[5:]).get("usage")
            except (orjson.JSONDecodeError, AttributeError):
                found = None
            if isinstance(found, dict):
                self.usage = found
                return b""  # the usage chunk: the client did not ask for it
        for null in (b',"usage":null', b'"usage":null,'):
            if null in event:
                return event.replace(null, b"", 1) + b"\n\n"
        return event + b"\n\n"
