"""Tokens before the call: the prompt estimate header, the model catalogue, the context guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import API_KEY, MakeProxy, Proxy
from fake_openai import FakeOpenAI

from proxy import tokens
from proxy.config import ConfigError, ModelInfo, load_settings
from proxy.tokens import Catalogue

AUTH = {"Authorization": f"Bearer {API_KEY}", "Cache-Control": "no-store"}
ROOT = Path(__file__).resolve().parent.parent


async def post(proxy: Proxy, body: dict[str, Any], path: str = "/v1/chat/completions") -> Any:
    async with aiohttp.ClientSession() as s, s.post(proxy.url + path, json=body, headers=AUTH) as r:
        return r.status, r.headers, orjson.loads(await r.read())


def chat(model: str, words: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi " * words}], **extra}


async def test_prompt_estimate_header_and_usage_field(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = chat("gpt-4o", 50)
    status, headers, _ = await post(proxy, body)
    expected = tokens.count_request("/v1/chat/completions", body).tokens
    assert status == 200
    assert headers["x-thriftgate-prompt-tokens"] == str(expected)
    assert (await proxy.usage.wait(1))[-1]["prompt_tokens_estimate"] == expected


async def test_context_guard_refuses_before_any_upstream_call(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    body = chat("gpt-4-0613", 9000)  # gpt-4: 8192 tokens
    status, _, payload = await post(proxy, body)
    assert status == 400
    error = payload["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    n = tokens.count_request("/v1/chat/completions", body).tokens
    assert error["message"] == (
        f"This model's maximum context length is 8192 tokens. However, you requested {n} tokens "
        f"({n} in the messages, 0 in the completion). Please reduce the length of the messages "
        "or completion."
    )
    assert fake.requests == []
    assert (await proxy.usage.wait(1))[-1]["error"] == "context_length_exceeded"


async def test_requested_output_counts_toward_the_window(proxy: Proxy, fake: FakeOpenAI) -> None:
    fits = chat("gpt-4", 4000)
    assert (await post(proxy, fits))[0] == 200
    status, _, payload = await post(proxy, {**fits, "max_tokens": 5000})
    assert status == 400 and "5000 in the completion" in payload["error"]["message"]
    status, _, _ = await post(proxy, {**fits, "max_completion_tokens": 4000})
    assert status == 200
    assert fake.calls("/v1/chat/completions") == 2


async def test_no_guard_for_unknown_models_estimated_images_or_embeddings(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    assert (await post(proxy, chat("my-local-model", 20_000)))[0] == 200
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    many_images = {
        "model": "gpt-4",
        "messages": [{"role": "user", "content": [image] * 11}],  # 11 x 765 estimated > 8192
    }
    assert (await post(proxy, many_images))[0] == 200
    emb = {"model": "text-embedding-3-small", "input": ["hi " * 9000]}
    assert (await post(proxy, emb, "/v1/embeddings"))[0] == 200


async def test_the_sdk_sees_openais_error(proxy: Proxy) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**chat("gpt-3.5-turbo", 17_000))
    assert caught.value.code == "context_length_exceeded"


async def test_config_overrides_the_catalogue(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text(
        '[models."gpt-4o"]\ncontext_window = 100\nmax_output_tokens = 50\n'
        '[models."house-model"]\ncontext_window = 60\n'
    )
    proxy = await make_proxy(env={"THRIFTGATE_CONFIG": str(cfg)})
    assert (await post(proxy, chat("gpt-4o-2024-08-06", 150)))[0] == 400
    assert (await post(proxy, chat("house-model-v2", 80)))[0] == 400
    assert (await post(proxy, chat("gpt-4o-mini", 150)))[0] == 200  # its own, shipped entry


def test_catalogue_lookup_and_shipped_copy() -> None:
    assert (ROOT / "config" / "models.toml").read_bytes() == (
        ROOT / "proxy" / "data" / "models.toml"
    ).read_bytes()
    cat = Catalogue()
    assert cat.lookup("gpt-4o-2024-08-06") == ModelInfo("gpt-4o", 128000, 16384)
    assert cat.lookup("gpt-4o-mini-2024-07-18").name == "gpt-4o-mini"  # type: ignore[union-attr]
    assert cat.lookup("gpt-4-turbo-2024-04-09").name == "gpt-4-turbo"  # type: ignore[union-attr]
    assert cat.lookup("gpt-4-0613").name == "gpt-4"  # type: ignore[union-attr]
    for name in ("gpt-4.1", "o3", "o4-mini", "gpt-5", "gpt-5-mini", "text-embedding-3-small"):
        assert cat.lookup(name) is not None, name
    assert cat.lookup("llama-3") is None
    assert cat.lookup(None) is None
    override = Catalogue((ModelInfo("gpt-4o", 1000, 10),))
    assert override.lookup("gpt-4o-2024-08-06") == ModelInfo("gpt-4o", 1000, 10)


def test_bad_model_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    for text, message in [
        ('[models."x"]\nmax_output_tokens = 5\n', "context_window is required"),
        ('[models."x"]\ncontext_window = "big"\n', "is not a valid int"),
        ('[models."x"]\ncontext_window = 10\nspeed = 1\n', "unknown setting speed"),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(env={}, config_file=str(cfg))
        assert message in str(caught.value)
