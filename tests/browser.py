"""A real headless Chromium for the tests, driven over the W3C WebDriver protocol by its own
``chromedriver`` (Debian's ``chromium`` and ``chromium-driver``; ``.ci/run`` installs them).

Async (aiohttp), so a page can be loaded from a proxy served by the same event loop. Records
what the page logged to its console and every network request it made (Chrome's performance
log), for the tests to assert there are none they did not expect.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
from redis_fleet import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# what a page's numbers are read with: every [data-k] element, its text, and the row it is in
READ_NUMBERS = """
return Array.from(document.querySelectorAll('[data-k]')).map(e => {
  const row = e.closest('[data-group],[data-slot],[data-code],[data-trim]');
  return {k: e.dataset.k, text: e.textContent,
          group: row ? (row.dataset.group || null) : null,
          name: row ? (row.dataset.name ?? null) : null,
          slot: row ? (row.dataset.slot || null) : null,
          code: row ? (row.dataset.code || null) : null,
          trim: row ? (row.dataset.trim || null) : null};
});
"""


class Browser:
    def __init__(self, http: aiohttp.ClientSession, base: str, session: str) -> None:
        self.http = http
        self.base = f"{base}/session/{session}"

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.http.request(method, self.base + path, json=body) as r:
            data = orjson.loads(await r.read())
        value = data.get("value") if isinstance(data, dict) else None
        if isinstance(value, dict) and "error" in value:
            raise RuntimeError(f"webdriver {path}: {value['error']}: {value.get('message')}")
        return value

    async def open(self, url: str) -> None:
        await self._call("POST", "/url", {"url": url})

    async def run(self, script: str, *args: Any) -> Any:
        return await self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    async def numbers(self) -> list[dict[str, Any]]:
        return list(await self.run(READ_NUMBERS))

    async def find(self, css: str) -> str:
        found = await self._call("POST", "/element", {"using": "css selector", "value": css})
        return str(next(iter(found.values())))

    async def type(self, css: str, text: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/value", {"text": text})

    async def click(self, css: str) -> None:
        await self._call("POST", f"/element/{await self.find(css)}/click", {})

    async def size(self, width: int, height: int) -> None:
        await self._call("POST", "/window/rect", {"width": width, "height": height})

    async def screenshot(self) -> bytes:
        """The whole page as PNG (the window grown to the page's height first)."""
        height = await self.run("return document.documentElement.scrollHeight")
        width = await self.run("return window.outerWidth")
        await self.size(int(width), int(height) + 140)
        return base64.b64decode(await self._call("GET", "/screenshot"))

    async def pdf(self) -> bytes:
        """The page printed (A4-ish paper, Chromium's print path and the page's print CSS)."""
        return base64.b64decode(await self._call("POST", "/print", {"background": True}))

    async def console(self) -> list[dict[str, Any]]:
        """What the page wrote to its console (errors included) since the last call."""
        return list(await self._call("POST", "/se/log", {"type": "browser"}) or [])

    async def requests(self) -> list[str]:
        """The URLs the browser requested since the last call."""
        urls = []
        for entry in await self._call("POST", "/se/log", {"type": "performance"}) or []:
            message = orjson.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls


@contextlib.asynccontextmanager
async def chromium(width: int = 1200, height: int = 900) -> AsyncIterator[Browser]:
    """A headless Chromium session (its chromedriver on a free port, stopped afterwards)."""
    assert CHROMIUM and CHROMEDRIVER, "install chromium and chromium-driver (see .ci/run)"
    port = free_port()
    driver = await asyncio.create_subprocess_exec(
        CHROMEDRIVER, f"--port={port}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    capabilities = {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-default-apps",
                "--disable-sync",
                "--hide-scrollbars",
                f"--window-size={width},{height}",
            ],
        },
        "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
    }
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):
                while True:  # the driver is listening once it answers /status
                    try:
                        async with http.get(base + "/status") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
            async with http.post(
                base + "/session", json={"capabilities": {"alwaysMatch": capabilities}}
            ) as r:
                created = orjson.loads(await r.read())["value"]
            if "sessionId" not in created:
                raise RuntimeError(f"chromedriver: no session: {created}")
            browser = Browser(http, base, created["sessionId"])
            try:
                yield browser
            finally:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.delete(browser.base):
                        pass
    finally:
        driver.terminate()
        await driver.wait()
