"""Proxy-made errors and their single mapping to OpenAI's error envelope.

Every error the proxy itself produces reaches the client as
``{"error": {"message", "type", "param", "code"}}`` with the right status; the upstream's own
errors pass through untouched (they are not exceptions here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import orjson
import structlog
from aiohttp import web

from proxy.types import SETTINGS, Handler, Stage

log = structlog.get_logger("thriftgate.errors")


class ProxyError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "payload_too_large"


class RequestTimeout(InvalidRequest):
    """The client did not send its request (headers or body) in time."""

    status = 408
    code = "request_timeout"


class ServiceUnavailable(ProxyError):
    """The proxy cannot serve this request now (shared state it needs is unreachable)."""

    status = 503
    code = "service_unavailable"


class QuotaExceeded(ProxyError):
    """A key's budget is spent: OpenAI's own 429 for an exhausted quota (not worth retrying)."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamUnavailable(ProxyError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(ProxyError):
    status = 504
    code = "upstream_timeout"


def envelope(
    message: str, type_: str, code: str | None, param: str | None = None
) -> dict[str, dict[str, str | None]]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    resp = web.Response(
        status=status,
        body=orjson.dumps(envelope(message, type_, code, param)),
        content_type="application/json",
        headers=headers,
    )
    resp.headers["x-thriftgate-error"] = code or type_
    return resp


def to_response(exc: ProxyError) -> web.Response:
    return error_response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)


_HTTP_CODES: dict[int, str] = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


class ErrorStage(Stage):
    """Outermost stage: any exception becomes OpenAI's envelope; no traceback reaches a client.
    (A class, as every stage is: aiohttp 4 drops the ``@web.middleware`` decorator.)"""

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProxyError as exc:
            return to_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            type_ = "invalid_request_error" if exc.status < 500 else "server_error"
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
            if exc.status == 404:
                message = (
                    f"Unknown path {request.path}: thriftgate serves the OpenAI API under "
                    "/v1/* (point OPENAI_BASE_URL at <this address>/v1), and /healthz, /readyz "
                    "and /metrics"
                )
            if exc.status == 413:
                message = (
                    f"The request body is larger than this proxy's limit of "
                    f"{request.app[SETTINGS].server.max_body_bytes} bytes"
                )
            return error_response(
                exc.status,
                message or exc.reason,
                type_,
                _HTTP_CODES.get(exc.status, f"http_{exc.status}"),
                headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unhandled_error", path=request.path, method=request.method)
            return error_response(
                500,
                "thriftgate hit an internal error; see its logs",
                "server_error",
                "internal_error",
            )


error_middleware = ErrorStage()
