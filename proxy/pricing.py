"""Pricing: what a call cost, in USD, from the shipped price table and the config's overrides.

Cost = uncached input * input price + cached input * cached price + output * output price (prices
per 1M tokens). A model the table does not know costs ``None`` (one warning per model), never an
error.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from importlib import resources
from typing import Any

import structlog

from proxy.config import ConfigError, Price, parse_prices
from proxy.types import PrefixTable

log = structlog.get_logger("thriftgate.pricing")

PER = 1_000_000


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
