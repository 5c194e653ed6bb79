"""``/dashboard``: the savings page of the running proxy (summed across ``--workers``), refreshing
itself; the same page ``thriftgate usage --html`` writes, from the same numbers (``Summary``),
fed by every usage record as it is written.

With an admin token configured, the page needs it: as ``Authorization: Bearer <token>``, or
entered once in the login form (posted, never in a URL), which sets a session cookie
(``HttpOnly``, ``SameSite=Strict``, 12 hours). The cookie holds an expiry and an HMAC of it keyed
by the token, not the token: every worker accepts it, and changing the token ends every session.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import parse_qs

from aiohttp import web

from proxy.admin import is_admin, other_workers
from proxy.errors import error_response
from proxy.pages import CSP, login_page, page
from proxy.summary import Summary
from proxy.types import SETTINGS

SUMMARY: web.AppKey[Summary] = web.AppKey("summary", Summary)

COOKIE = "thriftgate_dashboard"
SESSION_S = 12 * 3600
MAX_FORM_BYTES = 4096
HEADERS = {
    "Content-Security-Policy": CSP + "; frame-ancestors 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def _mac(token: str, expires: int) -> str:
    return hmac.new(
        token.encode("utf-8", "surrogateescape"),
        f"thriftgate-dashboard|{expires}".encode(),
        hashlib.sha256,
    ).hexdigest()


def session_value(token: str, now: float) -> str:
    expires = int(now) + SESSION_S
    return f"{expires}.{_mac(token, expires)}"


def _valid_session(token: str, value: str | None, now: float) -> bool:
    if not value or "." not in value:
        return False
    expires, _, mac = value.partition(".")
    if not expires.isdigit() or int(expires) < now:
        return False
    return hmac.compare_digest(mac.encode(), _mac(token, int(expires)).encode())


def allowed(request: web.Request) -> bool:
    """No admin token, the token as a bearer header, or a valid session cookie."""
    if is_admin(request):
        return True
    token = request.app[SETTINGS].server.admin_token
    assert token is not None
    return _valid_session(token, request.cookies.get(COOKIE), time.time())


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=HEADERS
    )


async def show(request: web.Request) -> web.Response:
    if not allowed(request):  # a browser gets the login form; anything else a 401 as /metrics
        if "text/html" in request.headers.get("Accept", ""):
            return _html(login_page())
        return error_response(
            401,
            "/dashboard needs Authorization: Bearer <THRIFTGATE_ADMIN_TOKEN> (or, in a browser, "
            "the login form)",
            "invalid_request_error",
            "invalid_admin_token",
        )
    summary = Summary()
    summary.merge(request.app[SUMMARY])
    workers = other_workers(request.app[SETTINGS].server.metrics_dir, ".summary")
    for data in workers:
        try:
            summary.merge(Summary.load(data))
        except (KeyError, TypeError, ValueError):
            continue  # a file from another version, or damaged: that worker is left out
    subtitle = "live, this proxy" + (f" ({len(workers) + 1} workers)" if workers else "")
    refresh = request.app[SETTINGS].server.dashboard_refresh_s
    return _html(
        page(summary.view(), title="thriftgate dashboard", subtitle=subtitle, refresh_s=refresh)
    )


async def login(request: web.Request) -> web.Response:
    """The login form's POST: the token, checked in constant time; a session cookie on success."""
    token = request.app[SETTINGS].server.admin_token
    if token is None:
        raise web.HTTPSeeOther("/dashboard")
    raw = await request.content.read(MAX_FORM_BYTES + 1)
    given = None
    if len(raw) <= MAX_FORM_BYTES:  # a form with a token, url-encoded: nothing larger
        found = parse_qs(raw.decode("utf-8", "surrogateescape")).get("token")
        given = found[0] if found else None
    if given is None or not hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape")
    ):
        return _html(login_page("That is not the admin token."), 401)
    resp = web.HTTPSeeOther("/dashboard", headers=HEADERS)
    resp.set_cookie(
        COOKIE,
        session_value(token, time.time()),
        max_age=SESSION_S,
        path="/dashboard",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise resp


def routes(app: web.Application) -> None:
    app.router.add_get("/dashboard", show)
    app.router.add_post("/dashboard/login", login)
