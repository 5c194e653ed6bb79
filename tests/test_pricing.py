"""Pricing: the shipped table, cost arithmetic, overrides, and cost in the usage log."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import LogSink, MakeProxy, Proxy, post

from proxy.config import ConfigError, Price, load_settings
from proxy.pricing import PriceTable

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_copy_is_the_config_file() -> None:
    assert (ROOT / "config" / "prices.toml").read_bytes() == (
        ROOT / "proxy" / "data" / "prices.toml"
    ).read_bytes()


@pytest.mark.parametrize(
    ("model", "prompt", "cached", "output", "expected"),
    [
        # gpt-4o: $2.50 in, $1.25 cached, $10 out per 1M
        ("gpt-4o-2024-08-06", 1000, 200, 100, (800 * 2.5 + 200 * 1.25 + 100 * 10) / 1e6),
        # gpt-4o-mini: 0.15 / 0.075 / 0.60
        ("gpt-4o-mini", 10_000, 0, 2_000, (10_000 * 0.15 + 2_000 * 0.6) / 1e6),
        # gpt-5: 1.25 / 0.125 / 10, reasoning tokens are part of the output
        ("gpt-5-2025-08-07", 5_000, 4_000, 3_000, (1_000 * 1.25 + 4_000 * 0.125 + 30_000) / 1e6),
        # o4-mini: 1.10 / 0.275 / 4.40
        ("o4-mini", 2_000, 1_000, 500, (1_000 * 1.1 + 1_000 * 0.275 + 500 * 4.4) / 1e6),
        # embeddings: input only
        ("text-embedding-3-small", 1_000_000, 0, 0, 0.02),
        # no cached price listed: cached input billed as input
        ("gpt-4-0613", 1_000, 500, 10, (1_000 * 30 + 10 * 60) / 1e6),
    ],
)
def test_cost_arithmetic(
    model: str, prompt: int, cached: int, output: int, expected: float
) -> None:
    table = PriceTable()
    usage = {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": output}
    assert table.cost(model, usage) == pytest.approx(expected, rel=1e-9)
    assert table.cost(model, usage, batch=True) == pytest.approx(expected / 2, rel=1e-9)


def test_unknown_model_costs_null_with_one_warning(app_logs: LogSink) -> None:
    table = PriceTable()
    before = len(app_logs.lines())
    usage = {"prompt_tokens": 10, "completion_tokens": 5}
    assert table.cost("llama-3-70b", usage) is None
    assert table.cost("llama-3-70b", usage) is None
    assert table.cost("gpt-4o", {"prompt_tokens": None}) is None  # no usage: no cost
    warnings = [r for r in app_logs.lines()[before:] if r["event"] == "price_unknown"]
    assert [w["model"] for w in warnings] == ["llama-3-70b"]


def test_config_overrides_and_adds_prices(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text(
        '[prices."gpt-4o"]\ninput = 1.0\noutput = 2.0\n'
        '[prices."house-model"]\ninput = 0.5\ncached_input = 0.05\noutput = 1.5\n'
    )
    settings = load_settings(env={}, config_file=str(cfg))
    assert settings.prices[0] == Price("gpt-4o", 1.0, 2.0, None)
    table = PriceTable(settings.prices)
    assert table.cost("gpt-4o-mini", {"prompt_tokens": 1_000_000}) == 0.15  # shipped entry
    assert table.cost("gpt-4o", {"prompt_tokens": 1_000_000}) == 1.0
    assert table.cost("house-model-v2", {"prompt_tokens": 2, "cached_tokens": 1}) == 0.55e-6
    for text, message in [
        ('[prices."x"]\n', "no price given"),
        ('[prices."x".per_image]\n"big" = 1.0\n', "is not"),
        ('[prices."x".per_image]\n"hd 1024x1024" = -1\n', "must not be negative"),
        ('[prices."x"]\ninput = -1\n', "must not be negative"),
        ('[prices."x"]\ninput = 1\nbatch = 2\n', "unknown setting batch"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(env={}, config_file=str(cfg))


async def test_cost_and_savings_in_the_usage_log(proxy: Proxy) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "price me"}]}
    status, _, answer = await post(proxy, body)
    assert status == 200
    status, _, _ = await post(proxy, body)  # a cache hit
    miss, hit = await proxy.usage.wait(2)
    usage = answer["usage"]
    expected = (usage["prompt_tokens"] * 0.15 + usage["completion_tokens"] * 0.6) / 1e6
    assert miss["cost_usd"] == pytest.approx(expected)
    assert miss["saved_usd"] is None
    assert (hit["cache"], hit["cost_usd"]) == ("hit", 0.0)
    assert hit["saved_usd"] == pytest.approx(expected)


async def test_unknown_model_logs_null_cost(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    status, _, _ = await post(
        proxy, {"model": "local-llm", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 200
    assert (await proxy.usage.wait(1))[-1]["cost_usd"] is None
