"""Images and audio: priced from the shipped table, charged to the key's USD budget and request
rate, never cached; multipart uploads streamed through, their form fields noted on the way."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from conftest import API_KEY, AUTH, MakeProxy, Proxy, post
from fake_openai import AUDIO_BYTES_PER_SECOND, FakeOpenAI
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.media import FormFields, MediaFacts


def async_client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY, max_retries=0)


def audio(seconds: float) -> tuple[str, bytes, str]:
    return ("talk.mp3", b"\x00" * int(seconds * AUDIO_BYTES_PER_SECOND), "audio/mpeg")


# -- form fields, noted as the upload streams ----------------------------------------------------


def test_form_fields_are_found_across_any_chunking() -> None:
    boundary = b"xyzzy"
    body = b"".join(
        [
            b'--xyzzy\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n",
            b'form-data; name="model"\r\n\r\nnot-this' * 20,  # inside the file: skipped
            b'\r\n--xyzzy\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1',
            b'\r\n--xyzzy\r\nContent-Disposition: form-data; name="size"\r\n\r\n1536x1024',
            b'\r\n--xyzzy\r\nContent-Disposition: form-data; name="n"\r\n\r\n3',
            b"\r\n--" + boundary + b"--\r\n",
        ]
    )
    for size in (1, 2, 3, 7, 64, len(body)):
        facts = MediaFacts()
        fields = FormFields(facts)
        for i in range(0, len(body), size):
            fields.feed(body[i : i + size])
        assert (facts.model, facts.size, facts.n) == ("gpt-image-1", "1536x1024", 3), size


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"form-data;",
                b' name="model"',
                b' name="n"',
                b"\r\n\r\n",
                b"\r\n--",
                b"gpt",
                b"7",
                b"x",
            ]
        )
        | st.binary(max_size=12),
        max_size=40,
    ),
    st.integers(1, 9),
)
def test_any_bytes_in_any_chunks_give_the_same_fields(parts: list[bytes], size: int) -> None:
    body = b"".join(parts)
    whole, chunked = MediaFacts(), MediaFacts()
    FormFields(whole).feed(body)
    fields = FormFields(chunked)
    for i in range(0, len(body), size):
        fields.feed(body[i : i + size])
    assert chunked == whole


# -- images ----------------------------------------------------------------------------------------


async def test_a_gpt_image_is_priced_by_its_token_usage(proxy: Proxy, fake: FakeOpenAI) -> None:
    async with async_client(proxy) as client:
        result = await client.images.generate(
            model="gpt-image-1", prompt="a lighthouse at dusk", quality="high"
        )
    assert result.usage is not None
    record = (await proxy.usage.wait(1))[-1]
    text_in = result.usage.input_tokens_details.text_tokens
    expected = (text_in * 5.0 + result.usage.output_tokens * 40.0) / 1e6
    assert record["cost_usd"] == pytest.approx(expected)
    assert record["images"] == 1 and record["image_quality"] == "high"
    assert record["model"] == "gpt-image-1" and record["cache"] is None
    assert record["total_tokens"] == result.usage.total_tokens


async def test_dall_e_is_priced_per_image_by_quality_and_size(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        await client.images.generate(
            model="dall-e-3", prompt="a fox", n=2, size="1024x1792", quality="hd"
        )
    record = (await proxy.usage.wait(1))[-1]
    assert record["cost_usd"] == pytest.approx(2 * 0.12)
    assert record["images"] == 2 and record["image_size"] == "1024x1792"


async def test_an_image_edit_streams_its_upload_and_is_priced(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    picture = b"\x89PNG" + bytes(range(256)) * 400
    async with async_client(proxy) as client:
        result = await client.images.edit(
            model="gpt-image-1",
            image=("in.png", picture, "image/png"),
            prompt="make it blue",
            size="1024x1536",
        )
    assert fake.uploads[-1]["files"] == {"image": len(picture)}
    assert fake.uploads[-1]["fields"]["model"] == "gpt-image-1"
    record = (await proxy.usage.wait(1))[-1]
    assert record["model"] == "gpt-image-1"  # noted from the form as it streamed
    usage = result.usage
    assert usage is not None
    details = usage.input_tokens_details
    expected = (
        details.text_tokens * 5 + details.image_tokens * 10 + usage.output_tokens * 40
    ) / 1e6
    assert details.image_tokens > 0 and record["cost_usd"] == pytest.approx(expected)


async def test_images_are_never_cached(proxy: Proxy, fake: FakeOpenAI) -> None:
    body = {"model": "dall-e-2", "prompt": "a cube"}
    for _ in range(2):
        status, headers, _ = await post(proxy, body, "/v1/images/generations")
        assert status == 200 and "x-thriftgate-cache" not in headers
    assert fake.calls("/v1/images/generations") == 2


async def test_an_image_dearer_than_the_budget_is_refused_before_the_call(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_USD_PER_DAY": "0.10"})
    body = {"model": "dall-e-3", "prompt": "x", "size": "1792x1024", "quality": "hd"}
    status, headers, raw = await post(proxy, body, "/v1/images/generations")  # $0.12
    assert status == 429 and headers["x-should-retry"] == "false"
    assert raw["error"]["code"] == "insufficient_quota"
    assert fake.calls("/v1/images/generations") == 0
    body = {**body, "quality": "standard"}  # $0.08 fits, and spends most of the budget
    assert (await post(proxy, body, "/v1/images/generations"))[0] == 200
    assert (await post(proxy, body, "/v1/images/generations"))[0] == 429
    assert fake.calls("/v1/images/generations") == 1


async def test_the_request_rate_covers_images(make_proxy: MakeProxy, fake: FakeOpenAI) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_RPM": "1"})
    body = {"model": "dall-e-2", "prompt": "a cube"}
    assert (await post(proxy, body, "/v1/images/generations"))[0] == 200
    status, _, raw = await post(proxy, body, "/v1/images/generations")
    assert status == 429 and raw["error"]["code"] == "rate_limit_exceeded"
    assert fake.calls("/v1/images/generations") == 1


# -- speech ----------------------------------------------------------------------------------------


async def test_tts_is_priced_per_character(proxy: Proxy) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 5
    async with async_client(proxy) as client:
        speech = await client.audio.speech.create(model="tts-1", voice="alloy", input=text)
        assert len(speech.content) > 0
    record = (await proxy.usage.wait(1))[-1]
    assert record["characters"] == len(text)
    assert record["cost_usd"] == pytest.approx(len(text) * 15 / 1e6)


async def test_token_priced_speech_is_priced_when_the_answer_reports_usage(
    proxy: Proxy, app_logs: Any
) -> None:
    body = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "hello there"}
    status, headers, _ = await post(proxy, body, "/v1/audio/speech")
    assert status == 200 and headers["Content-Type"] == "audio/mpeg"
    status, _, raw = await post(proxy, {**body, "stream_format": "sse"}, "/v1/audio/speech")
    assert status == 200
    usage = orjson.loads(raw.strip().split(b"\n\n")[-1][6:])["usage"]
    unknown, known = await proxy.usage.wait(2)
    assert unknown["cost_usd"] is None  # audio bytes alone do not tell the tokens
    expected = (usage["input_tokens"] * 0.60 + usage["output_tokens"] * 12.0) / 1e6
    assert known["cost_usd"] == pytest.approx(expected)


# -- transcription and translation -------------------------------------------------------------


async def test_whisper_is_priced_per_minute_of_audio(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        result = await client.audio.transcriptions.create(model="whisper-1", file=audio(90))
    # translations: the SDK marks its method deprecated, so a plain multipart post
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("response_format", "verbose_json")
    form.add_field("file", audio(30)[1], filename="talk.mp3", content_type="audio/mpeg")
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/audio/translations", data=form, headers=AUTH) as r,
    ):
        verbose = await r.json()
    assert result.text.startswith("A recording")
    first, second = await proxy.usage.wait(2)
    assert first["endpoint"] == "/v1/audio/transcriptions" and first["model"] == "whisper-1"
    assert first["audio_seconds"] == 90 and first["cost_usd"] == pytest.approx(1.5 * 0.006)
    assert second["endpoint"] == "/v1/audio/translations"
    assert second["audio_seconds"] == pytest.approx(verbose["duration"])
    assert second["cost_usd"] == pytest.approx(0.5 * 0.006)


async def test_gpt_transcription_is_priced_by_its_tokens(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        result = await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio(12))
    usage = result.usage
    assert usage is not None and usage.type == "tokens"
    record = (await proxy.usage.wait(1))[-1]
    audio_tokens = usage.input_token_details.audio_tokens  # type: ignore[union-attr]
    assert record["cost_usd"] == pytest.approx((audio_tokens * 6 + usage.output_tokens * 10) / 1e6)


async def test_a_plain_text_transcript_has_an_unknown_cost(proxy: Proxy) -> None:
    async with async_client(proxy) as client:
        text = await client.audio.transcriptions.create(
            model="whisper-1", file=audio(5), response_format="text"
        )
    assert "recording" in text
    record = (await proxy.usage.wait(1))[-1]
    assert record["status"] == 200 and record["cost_usd"] is None


async def test_an_upload_reaches_the_upstream_before_the_client_has_sent_it_all(
    proxy: Proxy, fake: FakeOpenAI
) -> None:
    """The proxy does not buffer an upload: the upstream reads the first part while the client
    still holds the rest back (it sends it only once the upstream has seen the start)."""
    total = 40 * AUDIO_BYTES_PER_SECOND

    async def body() -> AsyncIterator[bytes]:
        yield b"\0" * (total // 2)
        async with asyncio.timeout(10):
            await fake.form_seen.wait()
        yield b"\0" * (total - total // 2)

    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    form.add_field("file", body(), filename="long.wav", content_type="audio/wav")
    async with (
        aiohttp.ClientSession() as s,
        s.post(proxy.url + "/v1/audio/transcriptions", data=form, headers=AUTH) as r,
    ):
        assert r.status == 200
        answer = await r.json()
    assert answer["usage"] == {"type": "duration", "seconds": 40}
    assert fake.uploads[-1]["files"] == {"file": total}
    record = (await proxy.usage.wait(1))[-1]
    assert record["cost_usd"] == pytest.approx(40 / 60 * 0.006)


async def test_spent_audio_is_charged_to_the_usd_budget_after_the_fact(
    make_proxy: MakeProxy, fake: FakeOpenAI
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_USD_PER_DAY": "0.005"})
    async with async_client(proxy) as client:
        await client.audio.transcriptions.create(model="whisper-1", file=audio(60))  # $0.006
        with pytest.raises(openai.RateLimitError) as refused:
            await client.audio.transcriptions.create(model="whisper-1", file=audio(1))
    assert refused.value.code == "insufficient_quota"
    assert fake.calls("/v1/audio/transcriptions") == 1
    record = (await proxy.usage.wait(2))[0]
    assert record["cost_usd"] == pytest.approx(0.006)


def test_an_unknown_image_size_is_priced_at_the_default_and_reserved_at_the_most() -> None:
    from proxy.pricing import PriceTable

    table = PriceTable()
    facts = MediaFacts(model="dall-e-3", n=1)
    assert table.media_estimate("image", facts) == 0.12  # the dearest a request may cost
    assert table.media_cost("image", None, facts) == 0.04  # the defaults: standard, 1024x1024
    assert table.media_cost("image", None, MediaFacts(model="nobody-knows")) is None
    assert math.isclose(
        table.media_cost(
            "transcription", {"type": "duration", "seconds": 30}, MediaFacts(model="whisper-1")
        )
        or 0,
        0.003,
    )
