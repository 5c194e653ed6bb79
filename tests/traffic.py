"""Mixed traffic through a real proxy, for the savings pages' tests: chat (repeats that hit the
cache, streams, requests that bypass it), embeddings, a long conversation, tagged batch work, an
upstream failure, a budget refusal and a rate-limit refusal, from four keys with aliases, through
the official SDK, the wall clock moved an hour per round."""

from __future__ import annotations

import contextlib
from pathlib import Path

import openai
from conftest import API_KEY
from fake_openai import FakeOpenAI, Fault

from proxy.keys import fingerprint

KEY_BATCH = "sk-batch-jobs-0000000000000000"
KEY_TINY = "sk-tiny-budget-000000000000000"
KEY_BURST = "sk-burst-00000000000000000000"
HOUR = 3600.0
START = 1_796_083_200.0  # 2026-12-01T00:00:00Z


def config(tmp_path: Path, extra: str = "") -> Path:
    """Aliases for the four keys; a budget too small for anything, one request a minute."""
    path = tmp_path / "thriftgate.toml"
    path.write_text(
        f'[keys."web"]\nfingerprint = "{fingerprint(API_KEY)}"\n'
        f'[keys."batch-jobs"]\nfingerprint = "{fingerprint(KEY_BATCH)}"\n'
        f'[keys."tiny"]\nfingerprint = "{fingerprint(KEY_TINY)}"\nusd_per_day = 0.000001\n'
        f'[keys."burst"]\nfingerprint = "{fingerprint(KEY_BURST)}"\nrpm = 1\n' + extra
    )
    return path


def conversation(turns: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}: " + "why " * (5 + i)})
        messages.append({"role": "assistant", "content": f"answer {i}: " + "because " * (3 + i)})
    messages.append({"role": "user", "content": "and so?"})
    return messages


async def one_round(base_url: str, fake: FakeOpenAI, n: int) -> int:
    """One round of traffic; returns the number of requests made (each makes one usage line)."""
    made = 0
    async with (
        openai.AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=0) as web,
        openai.AsyncOpenAI(base_url=base_url, api_key=KEY_BATCH, max_retries=0) as batch,
    ):
        web_tags = {"x-thriftgate-tags": "web,eu" if n % 2 else "web"}
        for _ in range(2):  # the second is a cache hit
            await web.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"status of order {n % 3}"}],
                extra_headers=web_tags,
            )
            made += 1
        stream = await web.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": f"write a haiku about hour {n}"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=web_tags,
        )
        async for _ in stream:
            pass
        made += 1
        for _ in range(2):  # past the cache: the what-if estimate finds the repeat
            await web.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "what are your opening hours?"}],
                extra_headers={**web_tags, "Cache-Control": "no-store"},
            )
            made += 1
        await batch.embeddings.create(
            model="text-embedding-3-small",
            input=[f"document {n}-{i}" for i in range(4)],
            extra_headers={"x-thriftgate-tags": "batch"},
        )
        made += 1
        await batch.chat.completions.create(
            model="gpt-4o",
            messages=conversation(8 + n % 5),  # type: ignore[arg-type]
            extra_headers={"x-thriftgate-tags": "batch,nightly"},
        )
        made += 1
        if n % 4 == 0:
            fake.fail_next(Fault(status=500, code="server_error", type="server_error"))
            with contextlib.suppress(openai.InternalServerError):
                await web.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": f"fail {n}"}],
                    extra_headers={"x-thriftgate-max-retries": "0"},
                )
            made += 1
    if n % 6 == 0:
        async with (
            openai.AsyncOpenAI(base_url=base_url, api_key=KEY_TINY, max_retries=0) as tiny,
            openai.AsyncOpenAI(base_url=base_url, api_key=KEY_BURST, max_retries=0) as burst,
        ):
            with contextlib.suppress(openai.RateLimitError):
                await tiny.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "over budget"}]
                )
            made += 1
            for i in range(2):  # one a minute: the second is refused
                with contextlib.suppress(openai.RateLimitError):
                    await burst.chat.completions.create(
                        model="gpt-4o-mini",
                        messages=[{"role": "user", "content": f"burst {n} {i}"}],
                    )
                made += 1
    return made
