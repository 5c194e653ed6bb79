"""Decoding an answer's body from its Content-Encoding (gzip, deflate), for the stages that read
it: always from a copy, incrementally for a stream. What the client receives is never touched.
(Request bodies are decoded by ``proxy.inbound``, with its own bounds.)"""

from __future__ import annotations

import zlib
from typing import Any


class Decoder:
    """Incremental decoder of the Content-Encodings OpenAI uses (gzip, deflate)."""

    __slots__ = ("_obj", "_raw_deflate", "failed")

    def __init__(self, encoding: str) -> None:
        enc = encoding.strip().lower()
        self.failed = False
        self._raw_deflate = False
        self._obj: Any = None
        if enc == "gzip" or enc == "x-gzip":
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._obj = zlib.decompressobj()
            self._raw_deflate = True  # retry as raw deflate if the zlib header is missing
        elif enc != "identity":
            self.failed = True

    def feed(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        if self._obj is None:
            return chunk
        try:
            return self._obj.decompress(chunk)
        except zlib.error:
            if self._raw_deflate:
                self._raw_deflate = False
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                return self.feed(chunk)
            self.failed = True
            return b""


def decoded(body: bytes, content_encoding: str | None) -> bytes | None:
    """A whole body, decoded from its Content-Encoding; None if it cannot be."""
    if not content_encoding:
        return body
    decoder = Decoder(content_encoding)
    data = decoder.feed(body)
    return None if decoder.failed else data
