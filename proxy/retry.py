"""Retries of transient upstream failures, with tenacity.

Retried: connection failures and resets (502 from the upstream stage), no answer within the
first-byte limit (504), and the statuses 408, 409, 429 (not ``insufficient_quota``), 500, 502, 503,
504. Never other 4xx. Waits grow exponentially with full jitter, unless the upstream says how long
(``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date), which is honoured up to a cap.
A wait that would pass the request's deadline means giving up now. Nothing has been sent to the
client while the stage decides (the upstream stage returns once the status line arrived), so a
stream is retried only before its first byte and never duplicates a chunk. After the last attempt
the upstream's own answer goes to the client unchanged, with ``x-should-retry: false`` so the
OpenAI SDK does not multiply the retries, and ``x-thriftgate-attempts`` when it took more than one.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Callable, MutableMapping

import structlog
from aiohttp import web
from tenacity import AsyncRetrying, RetryCallState

from proxy.config import RetrySettings
from proxy.context import RequestContext, context_of
from proxy.decoding import decoded
from proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnavailable
from proxy.metrics import Metrics
from proxy.types import Handler, Sleep, Stage
from proxy.upstream import Reply

log = structlog.get_logger("thriftgate.retry")

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
ATTEMPTS_HEADER = "x-thriftgate-attempts"


def retry_after_s(resp: web.StreamResponse | None, now: float | None = None) -> float | None:
    """The wait the upstream asked for: ``retry-after-ms``, else ``retry-after`` (seconds or an
    HTTP date); None when it said nothing usable."""
    if resp is None:
        return None
    raw_ms = resp.headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = -1.0
        if value >= 0:
            return value
    raw = resp.headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        value = when.timestamp() - (now if now is not None else time.time())
        return max(0.0, value)
    return value if value >= 0 else None


class RetryStage(Stage):
    def __init__(
        self,
        settings: RetrySettings,
        metrics: Metrics,
        *,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.active = settings.enabled
        self.metrics = metrics
        self.sleep = sleep
        self.clock = clock
        self.jitter = jitter

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        # only a body the proxy holds can be sent again; requests without a body need none
        if ctx is None or not self.settings.enabled or (ctx.raw is None and request.body_exists):
            return await handler(request)
        attempts = self._attempts(ctx)
        if attempts <= 1:
            return await handler(request)
        started = self.clock()
        # The first attempt runs without tenacity (building a retrier costs more than a whole
        # request's other work); tenacity takes over only once there is something to retry.
        first: web.StreamResponse | ProxyError
        try:
            first = await _attempt(request, handler)
        except (UpstreamUnavailable, UpstreamTimeout) as exc:
            first = exc
        else:
            if not _retryable_result(first):
                if _insufficient_quota(first):
                    self._mark(ctx, 1, 0.0, first.headers, final_failure=True)
                return first
        return await self._retry(request, handler, ctx, attempts, started, first)

    async def _retry(
        self,
        request: web.Request,
        handler: Handler,
        ctx: RequestContext,
        attempts: int,
        started: float,
        first: web.StreamResponse | ProxyError,
    ) -> web.StreamResponse:
        deadline = started + self.settings.deadline_s
        waited = 0.0
        count = 1
        replay: list[web.StreamResponse | ProxyError] = [first]

        async def attempt() -> web.StreamResponse:
            nonlocal count
            if replay:  # tenacity's attempt 1 is the one already made
                outcome = replay.pop()
                if isinstance(outcome, ProxyError):
                    raise outcome
                return outcome
            count += 1
            return await _attempt(request, handler)

        def retryable(state: RetryCallState) -> bool:
            assert state.outcome is not None
            if state.outcome.failed:
                return isinstance(state.outcome.exception(), UpstreamUnavailable | UpstreamTimeout)
            return _retryable_result(state.outcome.result())

        def wait(state: RetryCallState) -> float:
            assert state.outcome is not None
            resp = None if state.outcome.failed else state.outcome.result()
            asked = retry_after_s(resp)
            if asked is not None:
                return min(asked, self.settings.retry_after_cap_s)
            ceiling = min(
                self.settings.max_wait_s,
                self.settings.initial_wait_s * 2 ** (state.attempt_number - 1),
            )
            return self.jitter() * ceiling  # full jitter

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= attempts:
                return True
            return self.clock() + state.upcoming_sleep > deadline  # give up now, not later

        async def before_sleep(state: RetryCallState) -> None:
            nonlocal waited
            assert state.outcome is not None
            waited += state.upcoming_sleep
            reason = _reason(state)
            self.metrics.retries[reason] = self.metrics.retries.get(reason, 0) + 1
            log.info(
                "retrying",
                reason=reason,
                attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3),
            )
            if not state.outcome.failed:
                resp = state.outcome.result()
                if isinstance(resp, Reply):
                    resp.release()

        retrying = AsyncRetrying(
            sleep=self.sleep,
            stop=stop,
            wait=wait,
            retry=retryable,
            before_sleep=before_sleep,
            reraise=True,  # the last exception (a 502/504 in OpenAI's envelope) goes out as is
            retry_error_callback=_last_result,  # the last answer goes out as is
        )
        try:
            resp = await retrying(attempt)
        except ProxyError as exc:
            final = isinstance(exc, UpstreamUnavailable | UpstreamTimeout)
            self._mark(ctx, count, waited, exc.headers, final_failure=final)
            raise
        final = _retryable_result(resp) or _insufficient_quota(resp)  # neither would succeed now
        self._mark(ctx, count, waited, resp.headers, final_failure=final)
        return resp

    def _attempts(self, ctx: RequestContext) -> int:
        retries = ctx.control.max_retries  # checked (0 to 10) by the context stage
        return self.settings.max_attempts if retries is None else retries + 1

    def _mark(
        self,
        ctx: RequestContext,
        attempts: int,
        waited: float,
        headers: MutableMapping[str, str],
        *,
        final_failure: bool,
    ) -> None:
        ctx.attempts = max(1, attempts)
        ctx.retry_wait_ms = round(waited * 1000, 3)
        if attempts > 1:
            headers[ATTEMPTS_HEADER] = str(attempts)
        if final_failure and self.settings.tell_client_not_to_retry:
            headers["x-should-retry"] = "false"


def _last_result(state: RetryCallState) -> web.StreamResponse:
    assert state.outcome is not None
    result: web.StreamResponse = state.outcome.result()
    return result


async def _attempt(request: web.Request, handler: Handler) -> web.StreamResponse:
    resp = await handler(request)
    if isinstance(resp, Reply) and resp.status == 429:
        await resp.read()  # small: is it a quota error (final) or a rate limit (retried)?
    return resp


def _retryable_result(resp: web.StreamResponse) -> bool:
    return resp.status in RETRY_STATUSES and not _insufficient_quota(resp)


def _insufficient_quota(resp: web.StreamResponse) -> bool:
    if resp.status != 429 or not isinstance(resp, Reply) or resp.body_bytes is None:
        return False
    body = decoded(resp.body_bytes, resp.headers.get("Content-Encoding")) or b""
    return b"insufficient_quota" in body


def _reason(state: RetryCallState) -> str:
    assert state.outcome is not None
    if state.outcome.failed:
        exc = state.outcome.exception()
        return "timeout" if isinstance(exc, UpstreamTimeout) else "connection"
    return f"status_{state.outcome.result().status}"
