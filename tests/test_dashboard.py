"""``/dashboard``: the live savings page, behind the admin token (a bearer header, or the login
form and its session cookie; never the token in a URL or a log), summed across workers, shown in
a real headless Chromium with the same numbers ``thriftgate usage --format json`` computes from
the usage log the proxy wrote."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer
from browser import CHROMEDRIVER, CHROMIUM, Browser, chromium
from conftest import API_KEY, LogSink, MakeProxy, start
from fake_openai import FakeOpenAI
from test_pages import SHOTS, check_numbers
from traffic import HOUR, START, config, one_round

from proxy.dashboard import COOKIE, session_value
from proxy.summary import Summary

TOKEN = "admin-token-for-the-dashboard-0123"
HOSTILE_TAG = "<img src=x onerror=alert(1)>"
READ_TOTAL = "return document.querySelector('[data-k=\"total.requests\"]')?.textContent ?? ''"


async def log_in(browser: Browser) -> None:
    """Send the login form and wait for the dashboard it leads to: a click may return before
    the form's answer (and its cookie) has arrived, and the next navigation would cancel it."""
    await browser.type("#token", TOKEN)
    await browser.click("button[type=submit]")
    async with asyncio.timeout(10):
        while not await browser.run(READ_TOTAL):  # noqa: ASYNC110 - the browser navigates
            await asyncio.sleep(0.05)


needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromium-driver are not installed"
)


async def get(url: str, **headers: str) -> tuple[int, str, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.text(), r


async def test_the_dashboard_needs_the_admin_token(
    make_proxy: MakeProxy, app_logs: LogSink
) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_ADMIN_TOKEN": TOKEN})
    url = proxy.url + "/dashboard"
    status, body, _ = await get(url)  # not a browser: OpenAI's envelope, as /metrics answers
    assert status == 401 and orjson.loads(body)["error"]["code"] == "invalid_admin_token"
    status, body, r = await get(url, Accept="text/html")  # a browser: the login form
    assert status == 200 and 'action="/dashboard/login"' in body and "data-k" not in body
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["Cache-Control"] == "no-store"
    assert (await get(url, Authorization="Bearer wrong"))[0] == 401
    assert (await get(url + f"?token={TOKEN}"))[0] == 401  # never from a URL
    status, body, _ = await get(url, Authorization=f"Bearer {TOKEN}")
    assert status == 200 and 'data-k="total.requests"' in body
    assert '<meta http-equiv="refresh"' in body

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(url + "/login", data={"token": "nope"}, allow_redirects=False) as r:
            assert r.status == 401 and "not the admin token" in await r.text()
            assert COOKIE not in r.cookies
        async with s.post(url + "/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/dashboard"
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
        assert TOKEN not in cookie
        async with s.get(url) as r:  # the session cookie is enough from now on
            assert r.status == 200 and 'data-k="total.requests"' in await r.text()
    value = session_value(TOKEN, time.time())
    expired = session_value(TOKEN, time.time() - 13 * 3600)
    forged = value[:-4] + ("0000" if not value.endswith("0000") else "1111")
    other = session_value("another-token", time.time())
    for bad in (expired, forged, other, "", "123.abc"):
        assert (await get(url, Cookie=f"{COOKIE}={bad}"))[0] == 401, bad
    assert (await get(url, Cookie=f"{COOKIE}={value}"))[0] == 200
    assert TOKEN not in app_logs.getvalue().decode()


async def test_without_an_admin_token_the_dashboard_is_open(make_proxy: MakeProxy) -> None:
    """As /metrics is: an operator who set no token runs the proxy where only they reach it."""
    proxy = await make_proxy()
    status, body, _ = await get(proxy.url + "/dashboard")
    assert status == 200 and 'data-k="total.requests"' in body


async def test_the_dashboard_can_be_turned_off(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(env={"THRIFTGATE_DASHBOARD": "false"})
    assert (await get(proxy.url + "/dashboard"))[0] == 404
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        await client.embeddings.create(model="text-embedding-3-small", input="still logged")
    assert (await proxy.usage.wait(1))[0]["status"] == 200


@needs_browser
async def test_the_dashboard_in_a_browser(
    make_proxy: MakeProxy, fake: FakeOpenAI, tmp_path: Path
) -> None:
    wall = [START]
    proxy = await make_proxy(
        env={
            "THRIFTGATE_ADMIN_TOKEN": TOKEN,
            "THRIFTGATE_CONFIG": str(config(tmp_path)),
            "THRIFTGATE_DASHBOARD_REFRESH_S": "1",
        },
        wall_clock=lambda: wall[0],
    )
    made = 0
    for n in range(6):
        wall[0] = START + n * HOUR
        made += await one_round(proxy.base_url, fake, n)
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "tagged"}],
            extra_headers={"x-thriftgate-tags": HOSTILE_TAG},
        )
    made += 1
    await proxy.usage.wait(made)
    log = tmp_path / "usage.jsonl"
    log.write_bytes(proxy.usage.getvalue())
    async with chromium() as browser:
        await browser.open(proxy.url + "/dashboard")
        await log_in(browser)
        assert await browser.run("return location.pathname + location.search") == "/dashboard"
        assert await browser.run("return document.cookie") == ""  # HttpOnly
        numbers = await browser.numbers()
        checked = check_numbers(numbers, log, "hour")
        assert checked["total"] == 7 + 6 + 3 and checked["slot"] == 6 * 5
        # a tag is text, never markup
        assert await browser.run("return document.querySelectorAll('img, script').length") == 0
        tags = await browser.run(
            "return Array.from(document.querySelectorAll('tr[data-group=tag]'), "
            "r => r.dataset.name)"
        )
        assert HOSTILE_TAG in tags
        assert await browser.console() == []
        requested = await browser.requests()  # the page, the login, the page (and its reloads)
        assert requested[:2] == [proxy.url + "/dashboard", proxy.url + "/dashboard/login"]
        assert set(requested[2:]) == {proxy.url + "/dashboard"}
        SHOTS.mkdir(parents=True, exist_ok=True)
        (SHOTS / "dashboard.png").write_bytes(await browser.screenshot())
        # it refreshes itself: a request made now shows up without anyone reloading the page
        before = await browser.run(READ_TOTAL)
        async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=API_KEY) as client:
            await client.embeddings.create(model="text-embedding-3-small", input="one more")
        async with asyncio.timeout(10):
            while await browser.run(READ_TOTAL) == before:  # noqa: ASYNC110 - the browser reloads
                await asyncio.sleep(0.2)
        assert await browser.run(READ_TOTAL) == f"{made + 1:,}"


@needs_browser
async def test_the_dashboard_sums_every_worker(
    fake: FakeOpenAI, upstream: TestServer, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    server = start(
        tmp_path,
        "--upstream",
        str(upstream.make_url("/v1")),
        "--workers",
        "2",
        env={
            "THRIFTGATE_ADMIN_TOKEN": TOKEN,
            "THRIFTGATE_CONFIG": str(config(tmp_path)),
            "THRIFTGATE_METRICS_DIR": str(shared),
        },
    )
    try:
        await server.ready()
        made = n = 0
        served: dict[str, int] = {}  # requests each worker counted, by its summary file
        # new clients, new connections, spread over the workers by the kernel (SO_REUSEPORT
        # hashes each connection: now and then all of a few land on one worker; then more rounds)
        while n < 4 or (not (len(served) == 2 and all(served.values())) and n < 16):
            for _ in range(4):
                made += await one_round(server.url + "/v1", fake, n)
                n += 1
            async with asyncio.timeout(20):
                while sum(served.values()) != made:
                    await asyncio.sleep(0.1)  # the workers write theirs every second
                    served = {
                        p.name: Summary.load(orjson.loads(p.read_bytes())).groups()[0].requests
                        for p in shared.glob("*.summary")
                    }
        assert len(served) == 2 and all(served.values())  # both workers served some
        log = server.log.with_suffix(".usage")
        async with chromium() as browser:
            await browser.open(server.url + "/dashboard")
            await log_in(browser)
            # whichever worker answers (new connections), it shows both workers' requests
            for _ in range(4):
                await browser.open(server.url + "/dashboard")
                numbers = await browser.numbers()
                shown = next(n["text"] for n in numbers if n["k"] == "total.requests")
                assert shown == f"{made:,}"
            check_numbers(numbers, log, "minute")
            assert await browser.console() == []
    finally:
        if server.proc.poll() is None:
            server.proc.terminate()
            await server.wait()
