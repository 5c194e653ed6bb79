"""Pricing: what a call cost, in USD, from the shipped price table and the config's overrides.

Text: uncached input * input price + cached input * cached price + output * output price (prices
per 1M tokens). Images and audio (``media_cost``): by the token usage the answer reports (text,
image and audio input tokens each at their price), else per image (model, quality, size), per
minute of audio, or per input character of speech. A model the table does not know costs
``None`` (one warning per model), never an error; so does a call whose unit the answer does not
reveal (a transcript asked for as plain text from a per-minute model).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from typing import Any

import structlog

from proxy.config import ConfigError, Price, parse_prices
from proxy.media import MediaFacts
from proxy.types import PrefixTable

log = structlog.get_logger("thriftgate.pricing")

PER = 1_000_000
DEFAULT_SIZE = "1024x1024"  # every image model's default size
DEFAULT_QUALITY = "standard"  # DALL·E's default quality (GPT image models report theirs)
TOKENS_PER_CHARACTER = 0.25  # speech text, when only a lower bound of its tokens is needed


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def per_image(price: Price, quality: str | None, size: str | None, *, most: bool) -> float | None:
    """The price of one image: exact for a known quality and size; an unknown (or "auto") one is
    the default (standard, 1024x1024) or, with ``most`` (a reservation), the dearest listed."""
    if not price.per_image:
        return None
    table = dict(price.per_image)
    quality = None if quality in (None, "auto") else quality
    size = None if size in (None, "auto") else size
    if quality is not None and size is not None and f"{quality} {size}" in table:
        return table[f"{quality} {size}"]
    candidates = [
        usd
        for label, usd in price.per_image
        if (quality is None or label.startswith(f"{quality} "))
        and (size is None or label.endswith(f" {size}"))
    ]
    if not most:
        defaults = [
            usd
            for label, usd in price.per_image
            if (quality or DEFAULT_QUALITY) == label.split()[0]
            and (size or DEFAULT_SIZE) == label.split()[1]
        ]
        candidates = defaults or candidates
    return max(candidates) if candidates else max(table.values())


class PriceTable:
    """``data/prices.toml`` (a copy of ``config/prices.toml``) with ``[prices."model"]`` on top."""

    def __init__(self, overrides: tuple[Price, ...] = ()) -> None:
        data = tomllib.loads(resources.files("proxy").joinpath("data", "prices.toml").read_text())
        prices = {p.name: p for p in parse_prices("prices.toml", data.get("prices", {}))}
        prices.update({p.name: p for p in overrides})
        discount = data.get("batch_discount", 0.5)
        if not isinstance(discount, int | float) or not 0 <= discount <= 1:
            raise ConfigError(f"prices.toml: batch_discount {discount!r} is not in [0, 1]")
        self.batch_discount = float(discount)
        self.prices = prices
        self.lookup = PrefixTable(prices).lookup
        self._warned: set[str] = set()

    def price(self, model: str | None) -> Price | None:
        found = self.lookup(model)
        if found is None and model and model not in self._warned and len(self._warned) < 1024:
            self._warned.add(model)
            log.warning("price_unknown", model=model, note="cost logged as null; add [prices]")
        return found

    def cost(
        self, model: str | None, tokens: Mapping[str, Any], *, batch: bool = False
    ) -> float | None:
        """USD for normalised usage (``usage.token_fields``): None without a price or usage."""
        prompt = tokens.get("prompt_tokens")
        if not isinstance(prompt, int):
            return None
        price = self.price(model)
        if price is None:
            return None
        cached = tokens.get("cached_tokens") or 0
        output = tokens.get("completion_tokens") or 0
        return self._usd(price, prompt, cached, output, batch)

    def estimate(self, model: str | None, prompt: int, output: int) -> float | None:
        """USD for a call not yet made: every prompt token uncached, ``output`` tokens out."""
        price = self.price(model)
        return None if price is None else self._usd(price, prompt, 0, output, False)

    def _usd(self, price: Price, prompt: int, cached: int, output: int, batch: bool) -> float:
        cached = min(max(cached, 0), prompt)
        cached_price = price.input if price.cached_input is None else price.cached_input
        usd = (
            (prompt - cached) * price.input + cached * cached_price + output * price.output
        ) / PER
        if batch:
            usd *= 1 - self.batch_discount
        return round(usd, 10)

    # -- images and audio --------------------------------------------------------------------

    def media_cost(
        self, kind: str, usage: Mapping[str, Any] | None, facts: MediaFacts
    ) -> float | None:
        """USD for an images or audio call once answered, or None when it cannot be known."""
        price = self.price(facts.model)
        if price is None:
            return None
        if usage and isinstance(usage.get("input_tokens"), int):
            return self._tokens_usd(price, usage)
        seconds = facts.audio_seconds(usage)
        if kind == "transcription" and seconds is not None and price.per_minute:
            return round(seconds / 60 * price.per_minute, 10)
        if kind == "image":
            one = per_image(price, facts.quality, facts.size, most=False)
            count = facts.images if facts.images is not None else facts.n or 1
            return None if one is None else round(one * count, 10)
        if kind == "speech" and facts.characters is not None and price.per_million_characters:
            return round(facts.characters * price.per_million_characters / PER, 10)
        return None

    def media_estimate(self, kind: str, facts: MediaFacts) -> float | None:
        """USD to reserve before an images or audio call: images at the dearest price their
        request allows; speech by its characters (or its text's tokens, a lower bound); None when
        nothing is known before the answer (uploads)."""
        price = self.lookup(facts.model)
        if price is None:
            return None
        if kind == "image":
            one = per_image(price, facts.quality, facts.size, most=True)
            return None if one is None else round(one * (facts.n or 1), 10)
        if kind == "speech" and facts.characters is not None:
            if price.per_million_characters:
                return round(facts.characters * price.per_million_characters / PER, 10)
            return round(facts.characters * TOKENS_PER_CHARACTER * price.input / PER, 10)
        return None

    @staticmethod
    def _tokens_usd(price: Price, usage: Mapping[str, Any]) -> float:
        details = usage.get("input_tokens_details") or usage.get("input_token_details") or {}
        details = details if isinstance(details, Mapping) else {}
        total_in = _n(usage.get("input_tokens"))
        image_in = _n(details.get("image_tokens"))
        audio_in = _n(details.get("audio_tokens"))
        text_in = _n(details.get("text_tokens")) if "text_tokens" in details else None
        if text_in is None:
            text_in = max(total_in - image_in - audio_in, 0)
        image_price = price.input if price.image_input is None else price.image_input
        audio_price = price.input if price.audio_input is None else price.audio_input
        usd = (
            text_in * price.input
            + image_in * image_price
            + audio_in * audio_price
            + _n(usage.get("output_tokens")) * price.output
        ) / PER
        return round(usd, 10)
