"""What an images or audio call is billed by, gathered from the request and the answer.

OpenAI bills images per image (by model, size and quality) or by token usage where the answer
reports it; speech per input character or by tokens; transcriptions per minute of audio or by
tokens. ``MediaFacts`` collects what the proxy can see of those: the JSON request's fields, the
small form fields of a multipart upload (noted by ``FormFields`` as the upload streams through,
never buffered), and the answer's own ``usage``, ``size``, ``quality``, image count and duration.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the form fields worth noting (a file part is never looked into)
WANTED = frozenset({"model", "n", "size", "quality", "response_format"})
MAX_VALUE = 256  # bytes of a form value kept at most
MAX_HEADER = 2048  # a part header longer than this is not a form field the proxy wants
_NAME = re.compile(rb'name="([^"]{1,64})"')


@dataclass(slots=True)
class MediaFacts:
    model: str | None = None
    n: int | None = None  # images asked for
    size: str | None = None
    quality: str | None = None
    characters: int | None = None  # speech: the input text's length
    images: int | None = None  # images in the answer
    seconds: float | None = None  # audio duration the answer reports

    def read_request(self, body: dict[str, Any]) -> None:
        """A JSON request (image generation, speech)."""
        model, n, size, quality = (body.get(k) for k in ("model", "n", "size", "quality"))
        self.model = model if isinstance(model, str) else None
        self.n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None
        self.size = size if isinstance(size, str) else None
        self.quality = quality if isinstance(quality, str) else None
        text = body.get("input")
        if isinstance(text, str):
            self.characters = len(text)

    def read_form(self, name: str, value: str) -> None:
        if name == "model":
            self.model = value
        elif name == "n" and value.isdigit():
            self.n = int(value) or None
        elif name == "size":
            self.size = value
        elif name == "quality":
            self.quality = value

    def read_answer(self, answer: dict[str, Any]) -> None:
        """A JSON answer: images in ``data``, the size and quality used, the audio's duration."""
        data = answer.get("data")
        if isinstance(data, list):
            self.images = len(data)
        for key in ("size", "quality"):
            value = answer.get(key)
            if isinstance(value, str) and value != "auto":
                setattr(self, key, value)
        duration = answer.get("duration")
        if isinstance(duration, int | float) and not isinstance(duration, bool):
            self.seconds = float(duration)

    def audio_seconds(self, usage: Mapping[str, Any] | None) -> float | None:
        """The audio's length: the answer's ``usage`` of type ``duration``, else its
        ``duration`` field (verbose_json), else unknown."""
        if usage and usage.get("type") == "duration":
            seconds = usage.get("seconds")
            if isinstance(seconds, int | float) and not isinstance(seconds, bool):
                return float(seconds)
        return self.seconds


class FormFields:
    """Notes the small fields of a multipart/form-data body as it streams past (model, n, size,
    quality): each chunk is searched for part headers; file parts are skipped unread. A header
    or value cut between two chunks is carried over (at most ``MAX_HEADER`` bytes)."""

    __slots__ = ("_carry", "facts", "fields")

    def __init__(self, facts: MediaFacts) -> None:
        self.facts = facts
        self.fields: dict[str, str] = {}
        self._carry = b""

    def feed(self, chunk: bytes) -> None:
        if len(self.fields) == len(WANTED):
            return
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        pos = 0
        while True:
            start = data.find(b"form-data;", pos)
            if start < 0:
                self._carry = data[-16:]  # "form-data;" may straddle the chunks
                return
            head_end = data.find(b"\r\n\r\n", start)
            if head_end < 0:
                if len(data) - start <= MAX_HEADER:
                    self._carry = data[start:]
                return
            header = data[start:head_end]
            pos = head_end + 4
            found = _NAME.search(header)
            if found is None or b"filename=" in header:
                continue
            name = found.group(1).decode("latin-1")
            if name not in WANTED:
                continue
            end = data.find(b"\r\n--", pos)
            if end < 0:
                if len(data) - start <= MAX_HEADER + MAX_VALUE:
                    self._carry = data[start:]
                return
            value = data[pos:end]
            pos = end
            if len(value) <= MAX_VALUE and name not in self.fields:
                text = value.decode("utf-8", "replace").strip()
                self.fields[name] = text
                self.facts.read_form(name, text)
