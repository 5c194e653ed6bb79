"""The savings report (``thriftgate usage --html``) in a real headless Chromium: every number it
shows is the one ``thriftgate usage --format json`` computes for the same log, the page logs no
error and requests nothing, on a desktop and on a phone. Screenshots go to docs/screenshots
(the README shows them)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from browser import CHROMEDRIVER, CHROMIUM, chromium
from conftest import MakeProxy
from fake_openai import FakeOpenAI
from traffic import HOUR, START, config, one_round

from proxy.pages import count, shown, usd
from proxy.summary import MAX_GROUPS, MAX_KEYS, MAX_SLOTS, Summary

SHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DIMENSIONS = ("model", "key", "tag", "endpoint")

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver are not installed"
)


def usage(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "usage", *map(str, args)], capture_output=True, check=True
    )


def cli_json(log: Path, *args: str) -> dict[str, Any]:
    return json.loads(usage(log, "--format", "json", *args).stdout)


def check_numbers(numbers: list[dict[str, Any]], log: Path, series: str) -> Counter[str]:
    """Every number the page shows against the CLI's JSON for the same log (formatted the way the
    page formats); returns how many of each kind were checked."""
    data = cli_json(log, "--what-if")
    total, what_if = data["total"], data["what_if"]
    by = {d: {g[d]: g for g in cli_json(log, "--by", d)["groups"]} for d in DIMENSIONS}
    slots = {g[series]: g for g in cli_json(log, "--by", series)["groups"]}
    checked: Counter[str] = Counter()
    for n in numbers:
        k, text = n["k"], n["text"]
        if n["group"]:
            want, kind = shown(k, by[n["group"]][n["name"]][k]), n["group"]
        elif n["slot"]:
            want, kind = shown(k, slots[n["slot"]][k]), "slot"
        elif n["code"]:
            want, kind = count(data["error_codes"][n["code"]]), "code"
        elif n["trim"]:
            value = what_if["trim"][n["trim"]][k]
            want, kind = (usd(value) if k == "saved_usd" else count(value)), "trim"
        elif k.startswith("what_if."):
            _, part, field = k.split(".")
            value = what_if[part][field]
            want, kind = (usd(value) if field.endswith("usd") else count(value)), "what_if"
        else:
            field = k.removeprefix("total.")
            want, kind = shown(field, total[field]), "total"
        assert text == want, f"{n}: the CLI says {want}"
        checked[kind] += 1
    # every group and every busy slot the CLI knows is on the page
    for d in DIMENSIONS:
        assert {n["name"] for n in numbers if n["group"] == d} == set(by[d])
    assert {n["slot"] for n in numbers if n["slot"]} == set(slots)
    assert {n["code"] for n in numbers if n["code"]} == set(data["error_codes"])
    return checked


@pytest.fixture
async def day_log(make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path) -> Path:
    """A day of traffic through the real proxy (24 rounds, an hour apart by its wall clock)."""
    wall = [START]
    proxy = await make_proxy(
        env={"THRIFTGATE_CONFIG": str(config(tmp_path))}, wall_clock=lambda: wall[0]
    )
    made = 0
    for n in range(24):
        wall[0] = START + n * HOUR + 17 * 60
        made += await one_round(proxy.base_url, fake, n)
    records = await proxy.usage.wait(made)
    assert len(records) == made
    log = tmp_path / "usage.jsonl"
    log.write_bytes(proxy.usage.getvalue())
    return log


@needs_browser
async def test_the_report_shows_what_the_cli_computes(day_log: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    usage(day_log, "--html", report)
    html = report.read_text()
    assert "<script" not in html and "http://" not in html and "https://" not in html
    async with chromium() as browser:
        await browser.open(report.as_uri())
        numbers = await browser.numbers()
        checked = check_numbers(numbers, day_log, "hour")
        data = cli_json(day_log)["total"]
        # the traffic had all of it: hits, refusals of both kinds, upstream errors, streams
        assert data["cache_hits"] and data["budget_refusals"] and data["rate_limit_refusals"]
        assert data["errors"] > data["budget_refusals"] + data["rate_limit_refusals"]
        assert data["ttft_p50_ms"] is not None
        assert checked["slot"] == 24 * 5  # an hour a row, five numbers each
        assert checked["trim"] == 9 and checked["what_if"] == 4
        assert checked["total"] == 7 + 6 + 3  # the cards, the percentiles, the refusals
        assert {"model", "key", "tag", "endpoint", "code"} <= set(checked)
        assert await browser.console() == []
        assert await browser.requests() == [report.as_uri()]
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / "report.png").write_bytes(await browser.screenshot())
        printed = await browser.pdf()  # it prints: a few pages of paper
        assert printed.startswith(b"%PDF")
        assert 1 <= len(re.findall(rb"/Type\s*/Page\b(?!s)", printed)) <= 8
    async with chromium(width=390, height=844) as phone:
        await phone.open(report.as_uri())
        # nothing is wider than the phone's screen but the tables, which scroll on their own
        overflow = await phone.run(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        assert check_numbers(await phone.numbers(), day_log, "hour") == checked
        assert await phone.console() == []
        (SHOTS / "report-phone.png").write_bytes(await phone.screenshot())


@needs_browser
async def test_the_browser_checks_can_fail(tmp_path: Path) -> None:
    """The harness sees a console error and a request a page makes (else the checks above
    would prove nothing)."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><body><p data-k='total.requests'>1</p>"
        "<script>console.error('broken')</script>"
        "<img src='http://127.0.0.1:9/pixel.png'></body></html>"
    )
    async with chromium() as browser:
        await browser.open(page.as_uri())
        assert [n["text"] for n in await browser.numbers()] == ["1"]
        assert any("broken" in entry["message"] for entry in await browser.console())
        assert "http://127.0.0.1:9/pixel.png" in await browser.requests()


def test_the_report_is_one_offline_file(day_log: Path, tmp_path: Path) -> None:
    """No script, no font, no link to anything: the page's own policy forbids fetching."""
    report = tmp_path / "r.html"
    out = usage(day_log, "--html", report, "--what-if")
    assert b"what if" in out.stdout  # the estimates are printed too
    html = report.read_text()
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'' in html
    assert "<script" not in html and "url(" not in html and "@import" not in html
    assert "The estimates overlap" in html  # the assumptions are stated
    assert "@media print" in html and 'name="viewport"' in html


def test_the_summary_stays_small_and_merges_exactly() -> None:
    """Minutes become hours, then days, once there are too many slots; groups beyond the cap are
    one (other) row; two halves merged equal the whole."""
    records = [
        {
            "ts": f"2026-{1 + i // (31 * 24):02d}-{1 + (i // 24) % 28:02d}T{i % 24:02d}:00:00.000Z",
            "request_id": str(i),
            "endpoint": "/v1/chat/completions",
            "status": 200 if i % 7 else 500,
            "model": f"m{i % 3}",
            "key": f"k{i % 50}",
            "cache": "hit" if i % 2 else "miss",
            "cost_usd": 0.001,
            "latency_ms": float(i % 100),
        }
        for i in range(3000)
    ]
    whole, first, second = Summary(), Summary(), Summary()
    for i, r in enumerate(records):
        whole.add(r)
        (first if i % 2 else second).add(r)
    assert len(whole.slots) <= MAX_SLOTS and whole.resolution > 60
    merged = Summary.load(json.loads(json.dumps(first.dump())))
    merged.merge(Summary.load(json.loads(json.dumps(second.dump()))))
    assert merged.view() == whole.view()
    assert whole.view()["total"]["requests"] == 3000
    many = Summary()
    for i in range(3 * MAX_KEYS):  # a new key and a new model every request
        many.add({**records[0], "key": f"key-{i}", "model": f"model-{i}"})
    total, groups = many.groups()
    assert total.requests == 3 * MAX_KEYS
    assert len(groups["key"]) == MAX_KEYS + 1  # the keys seen first, and (other)
    assert groups["key"]["(other)"].requests == 2 * MAX_KEYS
    assert len(groups["model"]) == MAX_GROUPS + 1
    assert groups["model"]["(other)"].requests == 3 * MAX_KEYS - MAX_GROUPS
    assert len(many.unique_cells()) == MAX_GROUPS + 1  # whatever came: bounded
