"""Embeddings micro-batching (opt-in): concurrent ``/v1/embeddings`` requests that can share an
upstream call are sent as one.

Requests with the same model, ``encoding_format``, ``dimensions``, ``user``, kind of input (text
or token ids) and key scope (API key, organization, project) arriving within ``window_ms`` of the
first are merged, up to ``max_inputs`` inputs and ``max_tokens`` tokens per upstream request.
Each client gets its own answer — its embeddings, in its own order, indexed from 0, and its share
of the usage by its token count (the shares sum to the upstream's total). Answers of merged
requests are re-serialised, so they are not byte-for-byte the upstream's. A request alone in its
window goes upstream untouched; when a merged call fails, each client's request goes on its own
(and the retry stage retries it as usual).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from proxy.background import Background
from proxy.config import MicrobatchSettings
from proxy.context import RequestContext, context_of
from proxy.decoding import decoded
from proxy.endpoints import EMBEDDINGS
from proxy.metrics import Metrics
from proxy.types import Handler, Stage
from proxy.upstream import Reply

log = structlog.get_logger("thriftgate.microbatch")

SendUpstream = Callable[..., Awaitable[Reply]]
DROPPED_HEADERS = ("Content-Length", "Content-Encoding", "Transfer-Encoding")


def flatten(value: Any) -> tuple[str, list[Any]] | None:
    """The inputs of an embeddings request and their kind, or None when it cannot be merged."""
    if isinstance(value, str):
        return "text", [value]
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(v, str) for v in value):
        return "text", list(value)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return "tokens", [value]
    if all(isinstance(v, list) and v and all(isinstance(t, int) for t in v) for v in value):
        return "tokens", list(value)
    return None


def shares(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, in whole numbers that sum to ``total``."""
    if not sum(weights):
        weights = [1] * len(weights)
    weight = sum(weights)
    exact = [total * w / weight for w in weights]
    parts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


@dataclass(slots=True)
class Member:
    request: web.Request
    ctx: RequestContext
    inputs: list[Any]
    tokens: int
    done: asyncio.Future[Reply | None]


@dataclass(slots=True)
class Group:
    key: tuple[Any, ...]
    members: list[Member] = field(default_factory=list)
    inputs: int = 0
    tokens: int = 0
    timer: asyncio.TimerHandle | None = None


class EmbeddingsBatcher(Stage):
    def __init__(
        self, settings: MicrobatchSettings, metrics: Metrics, send_upstream: SendUpstream
    ) -> None:
        self.settings = settings
        self.active = settings.embeddings  # opt-in
        self.metrics = metrics
        self.send_upstream = send_upstream
        self.groups: dict[tuple[Any, ...], Group] = {}
        self.tasks = Background()
        self.upstream_calls = 0  # merged calls made
        self.merged_requests = 0  # client requests answered by them

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        ctx = context_of(request)
        if (
            not self.settings.embeddings
            or ctx is None
            or ctx.endpoint != EMBEDDINGS
            or ctx.body is None
            or ctx.model is None
        ):
            return await handler(request)
        flat = flatten(ctx.body.get("input"))
        if flat is None or len(flat[1]) > self.settings.max_inputs:
            return await handler(request)
        kind, inputs = flat
        tokens = ctx.prompt_estimate or len(inputs)
        if tokens > self.settings.max_tokens:
            return await handler(request)
        member = Member(request, ctx, inputs, tokens, asyncio.get_running_loop().create_future())
        self._join(self._key(request, ctx, kind), member)
        reply = await member.done
        if reply is None:  # alone in its window, or the merged call failed: on its own
            return await handler(request)
        return reply

    def _key(self, request: web.Request, ctx: RequestContext, kind: str) -> tuple[Any, ...]:
        body = ctx.body or {}
        auth = request.headers.get("Authorization", "")
        return (
            ctx.model,
            body.get("encoding_format"),
            body.get("dimensions"),
            body.get("user"),
            kind,
            hashlib.sha256(auth.encode()).digest(),
            ctx.organization,
            ctx.project,
        )

    def _join(self, key: tuple[Any, ...], member: Member) -> None:
        s = self.settings
        group = self.groups.get(key)
        if group is not None and (
            group.inputs + len(member.inputs) > s.max_inputs
            or group.tokens + member.tokens > s.max_tokens
        ):
            self._flush(group)
            group = None
        if group is None:
            group = self.groups[key] = Group(key)
            group.timer = asyncio.get_running_loop().call_later(
                s.window_ms / 1000, self._flush, group
            )
        group.members.append(member)
        group.inputs += len(member.inputs)
        group.tokens += member.tokens
        if group.inputs >= s.max_inputs:
            self._flush(group)

    def _flush(self, group: Group) -> None:
        if self.groups.get(group.key) is group:
            del self.groups[group.key]
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        members = [m for m in group.members if not m.done.done()]  # clients gone are left out
        if len(members) == 1:
            members[0].done.set_result(None)
            return
        if members:
            self.tasks.spawn(self._send(members))

    async def _send(self, members: list[Member]) -> None:
        leader = members[0]
        body = {**(leader.ctx.body or {}), "input": [i for m in members for i in m.inputs]}
        t0 = time.monotonic()
        try:
            reply = await self.send_upstream(
                leader.request, orjson.dumps(body), stream=False, rewritten=True
            )
            raw = await reply.read()
        except Exception as exc:
            log.info("microbatch_failed", error=repr(exc)[:200], requests=len(members))
            self._alone(members)
            return
        answers = self._split(reply, raw, members)
        if answers is None:
            self._alone(members)
            return
        self.upstream_calls += 1
        self.merged_requests += len(members)
        upstream_ms = round((time.monotonic() - t0) * 1000, 3)
        note = {
            "merged_requests": len(members),
            "inputs": sum(len(m.inputs) for m in members),
            "upstream_request_id": reply.headers.get("x-request-id"),
        }
        for member, answer in zip(members, answers, strict=True):
            member.ctx.upstream = leader.ctx.upstream
            member.ctx.upstream_ms = upstream_ms
            member.ctx.extra["microbatch"] = note
            if not member.done.done():
                member.done.set_result(answer)

    @staticmethod
    def _alone(members: list[Member]) -> None:
        for member in members:
            if not member.done.done():
                member.done.set_result(None)

    def _split(self, reply: Reply, raw: bytes, members: list[Member]) -> list[Reply] | None:
        """Each member's own answer out of the merged one; None if it cannot be split."""
        if reply.status != 200:
            return None
        text = decoded(raw, reply.headers.get("Content-Encoding"))
        try:
            payload = orjson.loads(text) if text is not None else None
        except orjson.JSONDecodeError:
            return None
        data = payload.get("data") if isinstance(payload, dict) else None
        total = sum(len(m.inputs) for m in members)
        if not isinstance(data, list) or len(data) != total:
            return None
        try:
            data = sorted(data, key=lambda item: item["index"])
        except (KeyError, TypeError):
            return None
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
        prompt = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else 0
        split = shares(prompt, [m.tokens for m in members])
        headers = CIMultiDict(reply.headers)
        for name in DROPPED_HEADERS:
            headers.popall(name, None)
        headers["Content-Type"] = "application/json"
        out, start = [], 0
        for member, share in zip(members, split, strict=True):
            items = data[start : start + len(member.inputs)]
            start += len(member.inputs)
            own = {
                **payload,
                "data": [{**item, "index": i} for i, item in enumerate(items)],
                "usage": {"prompt_tokens": share, "total_tokens": share},
            }
            out.append(
                Reply(
                    status=200,
                    reason=reply.reason,
                    headers=CIMultiDict(headers),
                    body=orjson.dumps(own),
                )
            )
        return out

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """On the way out: the groups still waiting are sent, and their answers awaited."""
        yield
        for group in list(self.groups.values()):
            self._flush(group)
        await self.tasks.drain()
