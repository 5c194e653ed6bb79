"""The paid endpoints the proxy understands, and what it does with each (the README's table).

- ``text`` endpoints (chat, completions, embeddings, Responses): the JSON body is read, the
  prompt counted before the call, the answer cached, the context guarded, budgets and rate
  limits charged the estimate and settled from the answer's usage.
- ``media`` endpoints (images, audio): priced from the answer (and the request where the answer
  does not say), charged to the key's USD budget and its request rate; never cached. A JSON body
  (image generation, speech) is read; a multipart upload is streamed through untouched while the
  proxy notes its small form fields (model, n, size, quality) on the way.

Everything else under /v1 is forwarded untouched; ``FREE`` endpoints are not even charged the
one-token probe a budgeted key's other POSTs are.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
RESPONSES_INPUT_TOKENS = "/v1/responses/input_tokens"
IMAGES_GENERATIONS = "/v1/images/generations"
IMAGES_EDITS = "/v1/images/edits"
IMAGES_VARIATIONS = "/v1/images/variations"
SPEECH = "/v1/audio/speech"
TRANSCRIPTIONS = "/v1/audio/transcriptions"
TRANSLATIONS = "/v1/audio/translations"
MODERATIONS = "/v1/moderations"


@dataclass(frozen=True, slots=True)
class Endpoint:
    path: str
    kind: str  # "text" | "image" | "speech" | "transcription"
    json: bool  # the proxy reads the JSON body (else a multipart upload, streamed)

    @property
    def text(self) -> bool:
        return self.kind == "text"


ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint(CHAT, "text", True),
        Endpoint(COMPLETIONS, "text", True),
        Endpoint(EMBEDDINGS, "text", True),
        Endpoint(RESPONSES, "text", True),
        Endpoint(IMAGES_GENERATIONS, "image", True),
        Endpoint(IMAGES_EDITS, "image", False),
        Endpoint(IMAGES_VARIATIONS, "image", False),
        Endpoint(SPEECH, "speech", True),
        Endpoint(TRANSCRIPTIONS, "transcription", False),
        Endpoint(TRANSLATIONS, "transcription", False),
    )
}

# POSTs that cost nothing: forwarded without a budget check
FREE = frozenset({RESPONSES_INPUT_TOKENS, MODERATIONS})


def free(path: str) -> bool:
    """A POST OpenAI does not bill: the free endpoints, and cancelling a response."""
    return path in FREE or (path.startswith("/v1/responses/") and path.endswith("/cancel"))
