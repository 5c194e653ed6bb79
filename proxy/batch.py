"""``thriftgate batch``: run a Batch-API input file through OpenAI's Batch API (half price) or as
individual requests through thriftgate (cache, budgets, rate limits and retries apply).

Input is OpenAI's batch format, one ``{custom_id, method, url, body}`` per line; output is the
Batch API's output format, one ``{id, custom_id, response: {status_code, request_id, body},
error}`` per line. Re-running with the same output file skips what is already answered; an
interrupted run loses nothing it had received.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import orjson

from proxy.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from proxy.outcome import token_fields
from proxy.pricing import PriceTable
from proxy.types import Sleep
from proxy.upstream import unreachable

SUPPORTED_URLS = (CHAT, EMBEDDINGS, COMPLETIONS, RESPONSES)
NO_BATCH_API = (404, 405, 501)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchError(Exception):
    """The run cannot go on; the message says why."""


class NoBatchAPI(BatchError):
    """The upstream has no Batch API, or refused this batch: individual requests can do it."""


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    custom_id: str
    url: str
    body: dict[str, Any]
    raw: bytes


def read_input(path: str) -> tuple[list[Line], list[str]]:
    """The input's requests, and every problem found in it (with its line number)."""
    lines: list[Line] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return [], [f"{path}: cannot read: {exc.strerror}"]
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problems.append(f"line {n}: not valid JSON")
            continue
        if not isinstance(item, dict):
            problems.append(f"line {n}: not a JSON object")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            problems.append(f"line {n}: custom_id is missing (a non-empty string is required)")
            continue
        if custom_id in seen:
            problems.append(f"line {n}: custom_id {custom_id!r} repeats line {seen[custom_id]}")
            continue
        seen[custom_id] = n
        if item.get("method", "POST") != "POST":
            problems.append(f"line {n}: method must be POST, not {item.get('method')!r}")
            continue
        url = item.get("url")
        if url not in SUPPORTED_URLS:
            problems.append(f"line {n}: url {url!r} is not one of {', '.join(SUPPORTED_URLS)}")
            continue
        body = item.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            problems.append(f"line {n}: body must be an object with a model")
            continue
        lines.append(Line(n, custom_id, url, body, raw.strip()))
    if not lines and not problems:
        problems.append(f"{path}: no requests in it")
    return lines, problems


def read_output(path: Path) -> dict[str, dict[str, Any]]:
    """The results already in an output file, by custom_id (the last line of each wins)."""
    found: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return found
    with path.open("rb") as fh:
        for raw in fh:
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue  # a line cut short by an interruption
            if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
                found[item["custom_id"]] = item
    return found


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1)


def answered(result: dict[str, Any]) -> bool:
    """A result that needs no new attempt: an answer came back (errors of transport do not
    count; an upstream's own 4xx does — sending it again would fail again)."""
    response = result.get("response")
    return (
        result.get("error") is None
        and isinstance(response, dict)
        and (response.get("status_code") or 0) < 500
        and response.get("status_code") != 429
    )


def outstanding(lines: list[Line], output: Path) -> tuple[dict[str, dict[str, Any]], list[Line]]:
    """The results already in ``output``, and the lines still to send."""
    done = read_output(output)
    todo = [
        line for line in lines if not (line.custom_id in done and answered(done[line.custom_id]))
    ]
    return done, todo


@dataclass(slots=True)
class Stats:
    total: int = 0
    skipped: int = 0  # answered by an earlier run
    succeeded: int = 0
    failed: int = 0
    cost_usd: float = 0.0
    saved_usd: float = 0.0  # answers the proxy's cache served: what they would have cost
    cache_hits: int = 0
    priced: bool = False
    max_in_flight: int = 0
    via: str = ""
    batch_id: str | None = None
    notes: list[str] = field(default_factory=list)

    def count(
        self,
        result: dict[str, Any],
        model: str | None,
        prices: PriceTable,
        batch: bool,
        *,
        hit: bool = False,
    ) -> None:
        response = result.get("response") or {}
        status = response.get("status_code") or 0
        if result.get("error") is None and 200 <= status < 300:
            self.succeeded += 1
        else:
            self.failed += 1
        body = response.get("body")
        if isinstance(body, dict) and isinstance(body.get("usage"), dict):
            cost = prices.cost(body.get("model") or model, token_fields(body["usage"]), batch=batch)
            if cost is not None:
                if hit:  # served by the proxy's cache: nothing was spent
                    self.saved_usd += cost
                else:
                    self.cost_usd += cost
                self.priced = True
        self.cache_hits += hit

    def summary(self) -> str:
        cost = f", cost ${self.cost_usd:,.6f}" if self.priced else ""
        if self.cache_hits:
            cost += f", {self.cache_hits} cache hits saved ${self.saved_usd:,.6f}"
        price = " (Batch API prices)" if self.via == "api" else ""
        return (
            f"thriftgate batch: {self.total} requests via {self.via}: {self.succeeded} succeeded, "
            f"{self.failed} failed, {self.skipped} already answered{cost}{price}"
        )


class Progress:
    """One line redrawn on a terminal; plain lines (at each 10%, or when the status changes)
    otherwise."""

    def __init__(self, total: int, out: IO[str] | None = None) -> None:
        self.total = total
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self._last_step = -1
        self._last_note = ""

    def show(self, done: int, failed: int, note: str = "") -> None:
        share = done / self.total if self.total else 1.0
        if self.tty:
            bar = "#" * int(share * 30)
            self.out.write(
                f"\r[{bar:<30}] {done}/{self.total} done, {failed} failed {note}".ljust(79)
            )
            self.out.flush()
            return
        step = int(share * 10)
        if step != self._last_step or note != self._last_note:
            self._last_step, self._last_note = step, note
            self.out.write(
                f"batch: {done}/{self.total} done, {failed} failed {note}".rstrip() + "\n"
            )
            self.out.flush()

    def end(self) -> None:
        if self.tty:
            self.out.write("\n")
            self.out.flush()


def _result(
    custom_id: str, response: dict[str, Any] | None, error: dict[str, Any] | None
) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


class Client:
    """The HTTP side of a run: an OpenAI-compatible base URL and a key."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> None:
        self.session = session
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def url(self, path: str) -> str:
        """``/v1/x`` (as batch lines name it) or ``/x`` under the base URL (which ends in /v1)."""
        rest = path[3:] if path.startswith("/v1/") and self.base.endswith("/v1") else path
        return self.base + rest

    async def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.session.request(
            method, self.url(path), headers=self.headers, **kwargs
        ) as r:
            raw = await r.read()
            try:
                return r.status, orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                return r.status, raw.decode(errors="replace")


# -- individual requests --------------------------------------------------------------------------


async def run_proxy(
    lines: list[Line],
    output: Path,
    client: Client,
    *,
    concurrency: int,
    prices: PriceTable,
    progress: Progress | None = None,
) -> Stats:
    """Each line as its own request, ``concurrency`` at a time; each result appended to
    ``output`` as soon as it is in (so an interruption loses nothing already received)."""
    stats = Stats(total=len(lines), via="proxy")
    done, todo = outstanding(lines, output)
    stats.skipped = len(lines) - len(todo)
    if any(line.custom_id in done for line in todo):  # (done is empty without a file)
        # failed results of an earlier run are sent again: their old lines go, so the output
        # keeps exactly one line per custom_id (the answered ones, in input order)
        kept = {c: r for c, r in done.items() if answered(r)}
        _write_sorted(output, [line for line in lines if line.custom_id in kept], kept)
    semaphore = asyncio.Semaphore(concurrency)
    in_flight = 0
    finished = 0
    with output.open("ab", buffering=0) as out:
        if out.tell() and _last_byte(output) != b"\n":
            out.write(b"\n")  # a line cut short by an interruption ends here, alone

        async def one(line: Line) -> None:
            nonlocal in_flight, finished
            async with semaphore:
                in_flight += 1
                stats.max_in_flight = max(stats.max_in_flight, in_flight)
                try:
                    result, hit = await _send(client, line)
                finally:
                    in_flight -= 1
            out.write(orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE))
            stats.count(result, line.body.get("model"), prices, batch=False, hit=hit)
            finished += 1
            if progress is not None:
                progress.show(stats.skipped + finished, stats.failed)

        await asyncio.gather(*(one(line) for line in todo))
    return stats


async def _send(client: Client, line: Line) -> tuple[dict[str, Any], bool]:
    """The result line for ``line``, and whether the proxy's cache answered it."""
    try:
        async with client.session.post(
            client.url(line.url),
            data=orjson.dumps(line.body),
            headers={**client.headers, "Content-Type": "application/json"},
        ) as r:
            raw = await r.read()
            try:
                body: Any = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            response = {
                "status_code": r.status,
                "request_id": r.headers.get("x-request-id"),
                "body": body,
            }
            hit = r.headers.get("x-thriftgate-cache") == "HIT"
            return _result(line.custom_id, response, None), hit
    except (aiohttp.ClientError, TimeoutError) as exc:
        message = f"{client.base} could not be reached: {unreachable(exc)}"
        return _result(line.custom_id, None, {"code": "request_failed", "message": message}), False


# -- the Batch API --------------------------------------------------------------------------------


def state_path(output: Path) -> Path:
    return output.with_name(output.name + ".batch.json")


async def run_api(
    lines: list[Line],
    output: Path,
    client: Client,
    *,
    prices: PriceTable,
    sleep: Sleep = asyncio.sleep,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    progress: Progress | None = None,
) -> Stats:
    """Upload the lines not yet answered, create a batch, poll it, and write the output file in
    input order. A batch created by an interrupted run is picked up again (its id is kept beside
    the output file until the run ends)."""
    stats = Stats(total=len(lines), via="api")
    done, todo = outstanding(lines, output)
    stats.skipped = len(lines) - len(todo)
    if todo:
        urls = {line.url for line in todo}
        if len(urls) > 1:
            raise NoBatchAPI(f"a batch has one endpoint; the input mixes {', '.join(sorted(urls))}")
        state = state_path(output)
        batch_id = _resume(state, todo)
        if batch_id is None:
            batch_id = await _create(client, todo, state)
        stats.batch_id = batch_id
        batch = await _poll(client, batch_id, sleep, poll_initial_s, poll_max_s, progress)
        if batch["status"] == "failed":
            errors = (batch.get("errors") or {}).get("data") or []
            detail = "; ".join(
                f"line {e.get('line')}: {e.get('message')}"
                if e.get("line")
                else str(e.get("message"))
                for e in errors[:5]
            )
            state.unlink(missing_ok=True)
            raise NoBatchAPI(f"the batch {batch_id} failed validation: {detail or 'no detail'}")
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                for item in await _download(client, batch[key]):
                    done[item["custom_id"]] = item
        if batch["status"] != "completed":
            stats.notes.append(f"the batch ended {batch['status']}: re-run to send what is left")
        state.unlink(missing_ok=True)
    _write_sorted(output, lines, done)
    for line in todo:
        if line.custom_id in done:
            stats.count(done[line.custom_id], line.body.get("model"), prices, batch=True)
    return stats


def _resume(state: Path, todo: list[Line]) -> str | None:
    if not state.exists():
        return None
    try:
        saved = orjson.loads(state.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if set(saved.get("custom_ids", [])) != {line.custom_id for line in todo}:
        return None  # the input changed: start a new batch
    batch_id = saved.get("batch_id")
    return batch_id if isinstance(batch_id, str) else None


async def _create(client: Client, todo: list[Line], state: Path) -> str:
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field(
        "file",
        b"\n".join(line.raw for line in todo) + b"\n",
        filename="thriftgate-batch.jsonl",
        content_type="application/jsonl",
    )
    status, uploaded = await client.json("POST", "/v1/files", data=form)
    if status in NO_BATCH_API:
        raise NoBatchAPI(f"the upstream has no Files API (POST /v1/files answered {status})")
    if status >= 400 or not isinstance(uploaded, dict):
        raise BatchError(f"uploading the input failed ({status}): {_message(uploaded)}")
    status, batch = await client.json(
        "POST",
        "/v1/batches",
        json={
            "input_file_id": uploaded["id"],
            "endpoint": todo[0].url,
            "completion_window": "24h",
            "metadata": {"created_by": "thriftgate batch"},
        },
    )
    if status in NO_BATCH_API:
        raise NoBatchAPI(f"the upstream has no Batch API (POST /v1/batches answered {status})")
    if status >= 400 or not isinstance(batch, dict):
        raise BatchError(f"creating the batch failed ({status}): {_message(batch)}")
    tmp = state.with_suffix(".tmp")
    tmp.write_bytes(
        orjson.dumps(
            {
                "batch_id": batch["id"],
                "input_file_id": uploaded["id"],
                "custom_ids": [line.custom_id for line in todo],
            }
        )
    )
    os.replace(tmp, state)
    return str(batch["id"])


async def _poll(
    client: Client,
    batch_id: str,
    sleep: Sleep,
    initial: float,
    most: float,
    progress: Progress | None,
) -> dict[str, Any]:
    wait = initial
    while True:
        status, batch = await client.json("GET", f"/v1/batches/{batch_id}")
        if status >= 400 or not isinstance(batch, dict):
            raise BatchError(f"reading batch {batch_id} failed ({status}): {_message(batch)}")
        counts = batch.get("request_counts") or {}
        if progress is not None:
            progress.show(
                (counts.get("completed") or 0) + (counts.get("failed") or 0),
                counts.get("failed") or 0,
                f"({batch.get('status')}, {batch_id})",
            )
        if batch.get("status") in TERMINAL:
            return batch
        await sleep(wait)
        wait = min(most, wait * 1.5)


async def _download(client: Client, file_id: str) -> list[dict[str, Any]]:
    async with client.session.get(
        client.url(f"/v1/files/{file_id}/content"), headers=client.headers
    ) as r:
        if r.status >= 400:
            raise BatchError(f"downloading {file_id} failed ({r.status})")
        raw = await r.read()
    items = []
    for line in raw.splitlines():
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
            items.append(item)
    return items


def _write_sorted(output: Path, lines: Iterable[Line], done: dict[str, dict[str, Any]]) -> None:
    """The output file in input order (replaced at once: an interruption leaves the old one)."""
    tmp = output.with_name(output.name + ".tmp")
    with tmp.open("wb") as fh:
        for line in lines:
            if line.custom_id in done:
                fh.write(orjson.dumps(done[line.custom_id], option=orjson.OPT_APPEND_NEWLINE))
    os.replace(tmp, output)


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    return str(body)[:300]


# -- the whole run --------------------------------------------------------------------------------


async def run(
    input_path: str,
    output_path: str,
    *,
    via: str,
    base_url: str,
    api_key: str | None,
    concurrency: int,
    prices: PriceTable,
    sleep: Sleep = asyncio.sleep,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    progress_out: IO[str] | None = None,
) -> Stats:
    lines, problems = read_input(input_path)
    if problems:
        raise BatchError("the input has problems; nothing was sent:\n  " + "\n  ".join(problems))
    output = Path(output_path)
    progress = Progress(len(lines), progress_out)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=900)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        client = Client(session, base_url, api_key)
        await preflight(client)
        try:
            if via in ("api", "auto"):
                try:
                    return await run_api(
                        lines,
                        output,
                        client,
                        prices=prices,
                        sleep=sleep,
                        poll_initial_s=poll_initial_s,
                        poll_max_s=poll_max_s,
                        progress=progress,
                    )
                except NoBatchAPI as exc:
                    if via == "api":
                        raise
                    progress.out.write(f"batch: {exc}; sending individual requests instead\n")
            stats = await run_proxy(
                lines, output, client, concurrency=concurrency, prices=prices, progress=progress
            )
            if via == "auto":
                stats.notes.append("fell back from the Batch API to individual requests")
            return stats
        finally:
            progress.end()


async def preflight(client: Client) -> None:
    """Something answers at the base URL (any HTTP status will do), before anything is sent."""
    try:
        async with client.session.get(
            client.url("/v1/models"),
            headers=client.headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as r:
            await r.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BatchError(
            f"nothing answers at {client.base}: {unreachable(exc)}. Is the proxy running "
            "(thriftgate serve)? Or give the address with --base-url (or THRIFTGATE_BATCH_BASE_URL)"
            ". Nothing was sent."
        ) from None


async def show(
    base_url: str, api_key: str | None, batch_id: str, *, cancel: bool
) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        client = Client(session, base_url, api_key)
        method, path = (
            ("POST", f"/v1/batches/{batch_id}/cancel")
            if cancel
            else (
                "GET",
                f"/v1/batches/{batch_id}",
            )
        )
        status, batch = await client.json(method, path)
    if status >= 400 or not isinstance(batch, dict):
        raise BatchError(f"{method} {path} answered {status}: {_message(batch)}")
    return batch
