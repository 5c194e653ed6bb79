"""The savings page: ``Summary.view()`` (and the what-if estimates) as one self-contained HTML
document: inline CSS and SVG, no script, nothing fetched (its Content-Security-Policy forbids
it), readable on a phone, printable. ``thriftgate usage --html`` writes it; ``/dashboard`` serves
it live. Every number shown carries ``data-k`` (its field), so a test can hold it against
``thriftgate usage --format json``.
"""

from __future__ import annotations

from html import escape
from typing import Any

NONE = "-"  # a number that is not known (no requests, no streams)
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'"

DIMENSION_TITLES = {
    "model": "By model",
    "key": "By key",
    "tag": "By tag",
    "endpoint": "By endpoint",
}

CSS = """
:root{--ink:#1d2433;--mute:#5b6474;--line:#e3e6ec;--spend:#3559c7;--save:#1f9d63;--err:#c8402f;
--bg:#f6f7f9;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
background:var(--bg)}
main{max-width:1100px;margin:0 auto;padding:16px}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.1em;margin:0 0 .6em}
.sub{color:var(--mute);margin:0 0 1em}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;
margin:0 0 14px}
.card,section{background:var(--card);border:1px solid var(--line);border-radius:8px}
.card{padding:10px 12px}.card b{display:block;font-size:1.5em;font-variant-numeric:tabular-nums}
.card span{color:var(--mute);font-size:.85em}.card.good b{color:var(--save)}
.card.bad b{color:var(--err)}
section{padding:14px;margin:0 0 14px;break-inside:avoid}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,300px),1fr));gap:14px}
.grid section{margin:0}.grid{margin:0 0 14px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:4px 8px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left;white-space:normal;overflow-wrap:anywhere;
min-width:9em}
th{color:var(--mute);font-weight:600;font-size:.85em}
.share{display:block;height:3px;background:var(--spend);margin-top:2px}
svg{width:100%;height:170px;display:block}
.axis{display:flex;justify-content:space-between;color:var(--mute);font-size:.8em}
.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;border-radius:2px}
.note{color:var(--mute);font-size:.85em}
ul.assume{margin:.4em 0 0 1.2em;padding:0;color:var(--mute);font-size:.85em}
details summary{cursor:pointer;color:var(--mute);font-size:.85em;margin-top:6px}
form{max-width:360px;margin:15vh auto;background:var(--card);padding:20px;border-radius:8px;
border:1px solid var(--line)}
input{width:100%;padding:8px;margin:8px 0;font:inherit}
button{padding:8px 14px;font:inherit}
@media (max-width:600px){body{font-size:14px}main{padding:8px}.card b{font-size:1.25em}
.grid{grid-template-columns:1fr}}
@media print{body{background:#fff}section,.card{border-color:#bbb}details{display:block}
.live{display:none}}
"""


# -- how numbers are shown (the tests format the JSON's numbers with these same functions) --------
def usd(value: float | None) -> str:
    if value is None:
        return NONE
    if abs(value) >= 100:
        return f"${value:,.2f}"
    return f"${value:,.4f}"


def count(value: int | None) -> str:
    return NONE if value is None else f"{value:,}"


def pct(value: float | None) -> str:
    return NONE if value is None else f"{value:.1%}"


def ms(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value / 1000:,.2f} s" if value >= 10_000 else f"{value:,.0f} ms"


FORMATS = {
    "requests": count,
    "tokens": count,
    "prompt_tokens": count,
    "cached_tokens": count,
    "errors": count,
    "budget_refusals": count,
    "rate_limit_refusals": count,
    "upstream_429": count,
    "cost_usd": usd,
    "saved_usd": usd,
    "cache_hit_rate": pct,
    "prompt_cache_share": pct,
    "error_rate": pct,
    "p50_ms": ms,
    "p95_ms": ms,
    "p99_ms": ms,
    "ttft_p50_ms": ms,
    "ttft_p95_ms": ms,
    "ttft_p99_ms": ms,
}


def shown(key: str, value: Any) -> str:
    """How the page shows field ``key``'s value."""
    return FORMATS[key](value)


def _v(row: dict[str, Any], key: str, tag: str = "td") -> str:
    return f'<{tag} data-k="{key}">{escape(shown(key, row[key]))}</{tag}>'


# -- the page ----------------------------------------------------------------------------------
def page(
    view: dict[str, Any],
    *,
    title: str = "thriftgate savings report",
    subtitle: str = "",
    what_if: dict[str, Any] | None = None,
    refresh_s: int | None = None,
) -> str:
    total = view["total"]
    head = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
        + (f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else "")
        + f"<title>{escape(title)}</title><style>{CSS}</style></head><body><main>"
    )
    period = (
        f"{escape(view['from'])} to {escape(view['to'])}" if view["from"] else "no requests yet"
    )
    parts = [
        head,
        f"<h1>{escape(title)}</h1>",
        f'<p class="sub">{period}{" · " + escape(subtitle) if subtitle else ""}</p>',
        _cards(total),
        _charts(view["series"]),
        *(_group_table(d, view["groups"][d]) for d in DIMENSIONS_SHOWN),
        '<div class="grid">',
        _latency(total),
        _refusals(total),
        _errors(view["error_codes"], total["requests"]),
        "</div>",
    ]
    if what_if is not None:
        parts.append(_what_if(what_if))
    parts.append(
        '<p class="note">Costs are computed by thriftgate from its price table for each call; '
        "“saved” is what the cache's hits would have cost. Percentiles are within 1%."
        + (f' <span class="live">Refreshes every {int(refresh_s)} s.</span>' if refresh_s else "")
        + "</p></main></body></html>"
    )
    return "".join(parts)


DIMENSIONS_SHOWN = ("model", "key", "tag", "endpoint")


def _cards(t: dict[str, Any]) -> str:
    would = (t["cost_usd"] or 0) + (t["saved_usd"] or 0)
    cards = [
        ("requests", "requests", ""),
        ("tokens", "tokens", ""),
        ("cost_usd", "spent", ""),
        ("saved_usd", f"saved by the cache ({usd(would)} without it)", "good"),
        ("cache_hit_rate", "cache hit rate", "good"),
        ("prompt_cache_share", "prompt tokens from OpenAI's prompt cache", ""),
        ("errors", f"errors ({pct(t['error_rate'])})", "bad" if t["errors"] else ""),
    ]
    out = ['<div class="cards">']
    for key, label, cls in cards:
        out.append(
            f'<div class="card {cls}"><b data-k="total.{key}">{escape(shown(key, t[key]))}</b>'
            f"<span>{escape(label)}</span></div>"
        )
    out.append("</div>")
    if t["unpriced"]:
        out.append(
            f'<p class="note">{t["unpriced"]:,} answered calls have no known price (a model '
            "missing from the price table): the spend shown leaves them out.</p>"
        )
    return "".join(out)


W, H = 600, 160


def _bars(slots: list[dict[str, Any]], stacks: list[tuple[str, str, str]], top: float) -> str:
    """One bar per slot, ``stacks`` (field, colour, name) stacked, scaled to ``top``."""
    n = max(len(slots), 1)
    width = W / n
    out = [f'<svg viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img">']
    out.append(f'<line x1="0" y1="{H}" x2="{W}" y2="{H}" stroke="#c9ced8"/>')
    for i, slot in enumerate(slots):
        y = float(H)
        tip = [slot["label"]]
        for key, colour, name in stacks:
            value = slot[key] or 0
            tip.append(f"{name} {shown(key, slot[key])}")
            h = H * value / top if top else 0
            if h > 0:
                y -= h
                out.append(
                    f'<rect x="{i * width + width * 0.1:.2f}" y="{y:.2f}" '
                    f'width="{max(width * 0.8, 0.5):.2f}" height="{h:.2f}" fill="{colour}">'
                    f"<title>{escape(', '.join(tip))}</title></rect>"
                )
    out.append("</svg>")
    return "".join(out)


def _charts(series: dict[str, Any]) -> str:
    slots = series["slots"]
    if not slots:
        return ""
    money_top = max(((s["cost_usd"] or 0) + (s["saved_usd"] or 0) for s in slots), default=0)
    axis = (
        f'<div class="axis"><span>{escape(slots[0]["label"])}</span>'
        f"<span>per {escape(series['resolution'])}</span>"
        f"<span>{escape(slots[-1]['label'])}</span></div>"
    )
    spend = (
        "<section><h2>Spend and savings over time</h2>"
        f'<div class="axis"><span>top: {usd(money_top)}</span><span class="legend">'
        '<i style="background:var(--spend)"></i>spent<i style="background:var(--save)"></i>'
        "saved</span></div>"
        + _bars(
            slots, [("cost_usd", "#3559c7", "spent"), ("saved_usd", "#1f9d63", "saved")], money_top
        )
        + axis
    )
    hits = [{**s, "hit": s["cache_hit_rate"] or 0} for s in slots]
    rate = (
        "<section><h2>Cache hit rate over time</h2>"
        '<div class="axis"><span>top: 100%</span></div>' + _hit_bars(hits) + axis + "</section>"
    )
    rows = "".join(
        f'<tr data-slot="{escape(s["label"])}"><td>{escape(s["label"])}</td>'
        + "".join(
            _v(s, k) for k in ("requests", "cost_usd", "saved_usd", "cache_hit_rate", "errors")
        )
        + "</tr>"
        for s in slots
        if s["requests"]
    )
    table = (
        '<details><summary>the numbers</summary><div class="wrap"><table><tr>'
        f"<th>{escape(series['resolution'])}</th><th>requests</th><th>spent</th><th>saved</th>"
        f"<th>hit rate</th><th>errors</th></tr>{rows}</table></div></details>"
    )
    return spend + table + "</section>" + rate


def _hit_bars(slots: list[dict[str, Any]]) -> str:
    n = max(len(slots), 1)
    width = W / n
    out = [f'<svg viewBox="0 0 {W} {H}" preserveAspectRatio="none" role="img">']
    out.append(f'<line x1="0" y1="{H}" x2="{W}" y2="{H}" stroke="#c9ced8"/>')
    for i, s in enumerate(slots):
        if s["cache_hit_rate"] is None:
            continue
        h = H * s["hit"]
        out.append(
            f'<rect x="{i * width + width * 0.1:.2f}" y="{H - h:.2f}" '
            f'width="{max(width * 0.8, 0.5):.2f}" height="{max(h, 0.5):.2f}" fill="#1f9d63">'
            f"<title>{escape(s['label'])}: {pct(s['cache_hit_rate'])} of "
            f"{s['requests']:,} requests</title></rect>"
        )
    out.append("</svg>")
    return "".join(out)


COLUMNS = (
    ("requests", "requests"),
    ("tokens", "tokens"),
    ("cost_usd", "spent"),
    ("saved_usd", "saved"),
    ("cache_hit_rate", "hit rate"),
    ("errors", "errors"),
    ("p50_ms", "p50"),
    ("p95_ms", "p95"),
)


def _group_table(dimension: str, groups: dict[str, Any]) -> str:
    rows = groups["rows"]
    total_cost = sum(r["cost_usd"] or 0 for r in rows) or 1
    head = "".join(f"<th>{escape(title)}</th>" for _, title in COLUMNS)
    body = "".join(
        f'<tr data-group="{dimension}" data-name="{escape(r["name"])}"><td>{escape(r["name"])}'
        f'<span class="share" style="width:{100 * (r["cost_usd"] or 0) / total_cost:.1f}%"></span>'
        "</td>" + "".join(_v(r, k) for k, _ in COLUMNS) + "</tr>"
        for r in rows
    )
    more = groups["count"] - len(rows)
    note = (
        f'<p class="note">and {more:,} more (<code>thriftgate usage --by {dimension}</code>)</p>'
        if more > 0
        else ""
    )
    return (
        f'<section><h2>{DIMENSION_TITLES[dimension]}</h2><div class="wrap"><table>'
        f"<tr><th>{dimension}</th>{head}</tr>{body}</table></div>{note}</section>"
    )


def _latency(t: dict[str, Any]) -> str:
    def row(name: str, prefix: str) -> str:
        return (
            f"<tr><td>{name}</td>"
            + "".join(_v(t, f"{prefix}{q}_ms") for q in ("p50", "p95", "p99"))
            + "</tr>"
        )

    return (
        '<section><h2>Latency</h2><div class="wrap"><table><tr><th></th><th>p50</th><th>p95</th>'
        "<th>p99</th></tr>"
        + row("whole request", "")
        + row("first token (streams)", "ttft_")
        + "</table></div></section>"
    )


def _refusals(t: dict[str, Any]) -> str:
    rows = (
        ("budget_refusals", "refused by a budget"),
        ("rate_limit_refusals", "refused by a rate limit"),
        ("upstream_429", "rate-limited by OpenAI (429)"),
    )
    body = "".join(f"<tr><td>{label}</td>{_v(t, key)}</tr>" for key, label in rows)
    return f"<section><h2>Refusals</h2><table>{body}</table></section>"


def _errors(codes: dict[str, int], requests: int) -> str:
    if not codes:
        return '<section><h2>Top error codes</h2><p class="note">No errors.</p></section>'
    body = "".join(
        f'<tr data-code="{escape(code)}"><td>{escape(code)}</td><td data-k="count">{n:,}</td>'
        f"<td>{pct(n / requests if requests else None)}</td></tr>"
        for code, n in codes.items()
    )
    return (
        "<section><h2>Top error codes</h2><table><tr><th>code</th><th>requests</th>"
        f"<th>share</th></tr>{body}</table></section>"
    )


def _what_if(w: dict[str, Any]) -> str:
    c, b = w["cache"], w["batch"]
    trims = "".join(
        f'<tr data-trim="{keep}"><td>last {keep} messages</td>'
        f'<td data-k="requests">{t["requests"]:,}</td><td data-k="tokens">{t["tokens"]:,}</td>'
        f'<td data-k="saved_usd">{usd(t["saved_usd"])}</td></tr>'
        for keep, t in w["trim"].items()
    )
    assumptions = "".join(f"<li>{escape(a)}</li>" for a in w["assumptions"])
    return (
        '<section id="what-if"><h2>What if</h2><div class="cards">'
        f'<div class="card good"><b data-k="what_if.cache.saved_usd">{usd(c["saved_usd"])}</b>'
        f"<span>the exact cache ({c['ttl_s']:g} s) would have saved: "
        f'<span data-k="what_if.cache.would_hit">{c["would_hit"]:,}</span> more hits of '
        f"{c['requests']:,} answered requests</span></div>"
        f'<div class="card good"><b data-k="what_if.batch.saved_usd">{usd(b["saved_usd"])}</b>'
        f"<span>the Batch API would have saved on "
        f'<span data-k="what_if.batch.requests">{b["requests"]:,}</span> requests tagged '
        f"{escape(', '.join(b['tags']))}</span></div></div>"
        '<div class="wrap"><table><tr><th>trimming history to</th><th>requests</th>'
        f"<th>prompt tokens dropped</th><th>saved</th></tr>{trims}</table></div>"
        f'<ul class="assume">{assumptions}</ul></section>'
    )


def login_page(message: str = "") -> str:
    """The dashboard's login form (the admin token, posted: never in a URL)."""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>thriftgate dashboard</title><style>{CSS}</style></head><body>"
        '<form method="post" action="/dashboard/login"><h1>thriftgate dashboard</h1>'
        + (f'<p class="note" role="alert">{escape(message)}</p>' if message else "")
        # a username field (hidden) so password managers and the browser know what the form is
        + '<input type="text" name="username" value="admin" autocomplete="username" hidden>'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" '
        'required autofocus><button type="submit">Open the dashboard</button></form>'
        "</body></html>"
    )
