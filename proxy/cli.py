"""Command line: ``thriftgate serve`` (also ``python -m proxy serve``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from proxy import __version__
from proxy.config import ConfigError, Settings, load_settings
from proxy.console import resolve_format
from proxy.logs import configure_logging

log = structlog.get_logger("thriftgate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="thriftgate",
        description="A transparent OpenAI-compatible proxy that caches, budgets, rate-limits, "
        "retries and logs the cost of every call.",
    )
    parser.add_argument("--version", action="version", version=f"thriftgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--host", help="address to listen on (env THRIFTGATE_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (env THRIFTGATE_PORT, 8080)")
    serve.add_argument(
        "--upstream",
        help="OpenAI-compatible base URL (env THRIFTGATE_UPSTREAM_URL, https://api.openai.com/v1)",
    )
    serve.add_argument("--config", help="TOML config file (env THRIFTGATE_CONFIG)")
    serve.add_argument(
        "--workers", type=int, help="worker processes sharing the port (env THRIFTGATE_WORKERS, 1)"
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    _log_flags(serve)
    doctor = sub.add_parser(
        "doctor",
        help="check the configuration end to end: upstreams, key, Redis, usage log, port",
    )
    doctor.add_argument("--config", help="TOML config file (env THRIFTGATE_CONFIG)")
    doctor.add_argument("--upstream", help="check this base URL instead of the configured one")
    doctor.add_argument("--port", type=int, help="the port serve would listen on")
    doctor.add_argument(
        "--key", help="an API key to try GET /models with (default: the configured upstream key)"
    )
    tokens = sub.add_parser("tokens", help="count the prompt tokens of a request body, offline")
    tokens.add_argument(
        "request", help="a JSON request body (chat, embeddings or completions); - for stdin"
    )
    tokens.add_argument("--model", help="count as this model (default: the body's model)")
    fp = sub.add_parser(
        "fingerprint", help="print an API key's fingerprint (for [keys] tables and usage logs)"
    )
    fp.add_argument("key", nargs="?", default="-", help="the key; - or nothing: read from stdin")
    fp.add_argument(
        "--full", action="store_true", help="the whole SHA-256 (64 hex) instead of its first 12"
    )
    usage = sub.add_parser("usage", help="totals from usage logs: requests, tokens, cost, ...")
    usage.add_argument(
        "files",
        nargs="*",
        help="usage logs, plain or gzipped; - (or none, when piped): stdin",
    )
    usage.add_argument("--since", help="from this time: 2026-11-22, 2026-11-22T10:00Z, 24h, 7d")
    usage.add_argument("--until", help="up to (not including) this time, same forms")
    usage.add_argument(
        "--by",
        nargs="+",
        action="extend",
        default=[],
        choices=["key", "model", "day", "hour", "minute", "endpoint", "user", "tag"],
        help="group by these (key shows the alias when there is one; a request with several "
        "tags counts in each)",
    )
    usage.add_argument("--format", choices=["table", "json", "csv"], default="table")
    usage.add_argument(
        "--html",
        metavar="FILE",
        help="also write the savings report: one self-contained HTML page (with --what-if)",
    )
    usage.add_argument(
        "--what-if",
        action="store_true",
        help="estimate what the exact cache, the Batch API and history trimming would save",
    )
    usage.add_argument(
        "--cache-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="--what-if: how long the cache would keep answers (default 3600)",
    )
    usage.add_argument(
        "--batch-tag",
        action="append",
        metavar="TAG",
        help="--what-if: a tag of non-interactive traffic (default: batch, offline, "
        "non-interactive; repeat for more)",
    )
    batch = sub.add_parser("batch", help="run a Batch-API input file (Batch API or one by one)")
    bsub = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION")
    brun = bsub.add_parser("run", help="send INPUT.jsonl, write the answers to OUTPUT.jsonl")
    brun.add_argument("input", help="OpenAI batch input: one {custom_id, method, url, body} a line")
    brun.add_argument("-o", "--output", required=True, help="results (re-run to resume)")
    brun.add_argument(
        "--via",
        choices=["api", "proxy", "auto"],
        default="auto",
        help="api: the Batch API; proxy: one request each; auto (default): api, else proxy",
    )
    brun.add_argument("--concurrency", type=int, help="--via proxy: requests at once (16)")
    brun.add_argument("--base-url", help="OpenAI-compatible base URL (thriftgate's by default)")
    for action in ("status", "cancel"):
        b = bsub.add_parser(action, help=f"{action} a batch left running")
        b.add_argument("batch_id")
        b.add_argument("--base-url", help="OpenAI-compatible base URL")
    return parser


def _log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        help="operational log on stderr: console (readable, one access line per request) or "
        "json; auto (default): console on a terminal (env THRIFTGATE_LOG_FORMAT)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="least severe level logged (env THRIFTGATE_LOG_LEVEL, info)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C: a word, not a traceback
        print("\nthriftgate: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `thriftgate usage ... | head`: the reader left, nothing to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the final flush
        return 0


def _main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    if args.command == "serve":
        return serve(args, list(sys.argv[1:] if argv is None else argv))
    if args.command == "doctor":
        return run_doctor(args)
    if args.command == "tokens":
        return count_tokens(args.request, args.model)
    if args.command == "fingerprint":
        return print_fingerprint(args.key, full=args.full)
    if args.command == "usage":
        return usage_report(args)
    if args.command == "batch":
        return batch_command(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def count_tokens(path: str, model: str | None) -> int:
    from proxy.admission import requested_output
    from proxy.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
    from proxy.pricing import PriceTable
    from proxy.tokens import count_request

    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        body = json.loads(raw)
    except OSError as exc:
        print(f"thriftgate: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"thriftgate: {path} is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(body, dict):
        print(f"thriftgate: {path} must hold a JSON object (a request body)", file=sys.stderr)
        return 2
    named = str(model or body.get("model") or "")
    if "messages" in body:
        endpoint = CHAT
    elif "input" in body:  # embeddings, or a Responses request (instructions, items, a chat model)
        value = body["input"]
        texts = isinstance(value, list) and all(isinstance(v, str | int | list) for v in value)
        embeds = "embedding" in named or (texts and "instructions" not in body)
        endpoint = EMBEDDINGS if embeds else RESPONSES
    elif "prompt" in body:
        endpoint = COMPLETIONS
    else:
        print("thriftgate: the body has no messages, input or prompt to count", file=sys.stderr)
        return 2
    count = count_request(endpoint, body, model)
    shown = model or body.get("model") or "unknown model"
    note = {"exact": "", "partial": " (partial: earlier state is not counted)"}.get(
        count.source, f" ({count.source})"
    )
    print(f"{count.tokens} prompt tokens{note}: {endpoint}, {shown}, {count.encoding}")
    try:
        prices = PriceTable(load_settings().prices)  # the config's [prices] too, when it has any
    except ConfigError as exc:
        print(f"thriftgate: {exc}", file=sys.stderr)
        return 2
    name = model or body.get("model")
    priced = name if isinstance(name, str) else None
    cost = prices.estimate(priced, count.tokens, 0)
    if cost is not None:
        line = f"estimated input cost: ${cost:.6f}"
        output = requested_output(body)
        if output:
            most = prices.estimate(priced, count.tokens, output)
            line += f"; at most ${most:.6f} with {output} output tokens"
        print(line)
    return 0


def run_doctor(args: argparse.Namespace) -> int:
    from proxy.doctor import FAIL, render, run_checks

    flags = {"upstream": args.upstream, "port": args.port}
    checks = asyncio.run(run_checks(flags, args.config, args.key))
    print(render(checks))
    return 1 if any(c.result == FAIL for c in checks) else 0


def usage_report(args: argparse.Namespace) -> int:
    from proxy.pages import page
    from proxy.pricing import PriceTable
    from proxy.report import Report, open_log, render, time_window
    from proxy.summary import Summary
    from proxy.whatif import BATCH_TAGS, WhatIf, render_text

    try:
        since, until = time_window(args.since, args.until)
    except ValueError as exc:
        print(f"thriftgate: {exc}", file=sys.stderr)
        return 2
    files = args.files or ["-"]
    if files == ["-"] and not args.files and sys.stdin.isatty():
        with contextlib.suppress(SystemExit):  # argparse exits after printing the help
            build_parser().parse_args(["usage", "--help"])
        print(
            "\nthriftgate: give a usage log (a file, or piped in): nothing to read from a terminal",
            file=sys.stderr,
        )
        return 2
    if args.cache_ttl < 0:
        print("thriftgate: --cache-ttl must be 0 or more seconds", file=sys.stderr)
        return 2
    report = Report(tuple(dict.fromkeys(args.by)), since, until)
    summary = whatif = None
    if args.html:
        summary = Summary()
        report.consumers.append(summary.add)
    if args.html or args.what_if:
        whatif = WhatIf(
            PriceTable(),
            ttl_s=args.cache_ttl,
            batch_tags=tuple(args.batch_tag) if args.batch_tag else BATCH_TAGS,
        )
        report.consumers.append(whatif.add)
    for path in files:
        try:
            with open_log(path) as lines:
                report.feed(lines, "stdin" if path == "-" else path)
        except (OSError, EOFError) as exc:
            print(f"thriftgate: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    if report.foreign and not report.total.requests:
        print(
            f"thriftgate: no usage records found; {report.first_foreign}",
            file=sys.stderr,
        )
        return 2
    estimates = whatif.result() if whatif is not None else None
    render(report, args.format, sys.stdout, estimates if args.what_if else None)
    if args.what_if and args.format != "json":
        sys.stdout.write(render_text(estimates))  # type: ignore[arg-type]
    if summary is not None:
        subtitle = f"{len(files)} log file{'s' if len(files) > 1 else ''}"
        html = page(summary.view(), subtitle=subtitle, what_if=estimates)
        try:
            with open(args.html, "w", encoding="utf-8") as out:
                out.write(html)
        except OSError as exc:
            print(f"thriftgate: cannot write {args.html}: {exc}", file=sys.stderr)
            return 2
        print(f"thriftgate: wrote {args.html}", file=sys.stderr)
    if report.skipped:
        print(f"thriftgate: skipped {report.skipped} malformed lines", file=sys.stderr)
    if report.foreign:
        print(
            f"thriftgate: skipped {report.foreign} lines that are not usage records (first: "
            f"{report.first_foreign})",
            file=sys.stderr,
        )
    return 0


def batch_command(args: argparse.Namespace) -> int:
    from proxy import batch
    from proxy.pricing import PriceTable

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"thriftgate: {exc}", file=sys.stderr)
        return 2
    base_url = args.base_url or settings.batch.base_url
    try:
        if args.batch_command in ("status", "cancel"):
            found = asyncio.run(
                batch.show(
                    base_url,
                    settings.batch.api_key,
                    args.batch_id,
                    cancel=args.batch_command == "cancel",
                )
            )
            print(json.dumps(found, indent=2))
            return 0
        concurrency = args.concurrency or settings.batch.concurrency
        if concurrency < 1:
            print("thriftgate: --concurrency must be at least 1", file=sys.stderr)
            return 2
        stats = asyncio.run(
            batch.run(
                args.input,
                args.output,
                via=args.via,
                base_url=base_url,
                api_key=settings.batch.api_key,
                concurrency=concurrency,
                prices=PriceTable(settings.prices),
                poll_initial_s=settings.batch.poll_initial_s,
                poll_max_s=settings.batch.poll_max_s,
            )
        )
    except batch.BatchError as exc:
        print(f"thriftgate: {exc}", file=sys.stderr)
        return 2
    except aiohttp.ClientError as exc:
        print(f"thriftgate: {base_url} cannot be reached: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "thriftgate: interrupted; what was received is in the output file: re-run the same "
            "command to go on",
            file=sys.stderr,
        )
        return 130
    for note in stats.notes:
        print(f"thriftgate: {note}", file=sys.stderr)
    print(stats.summary())
    return 0 if stats.failed == 0 else 1


def print_fingerprint(key: str, *, full: bool = False) -> int:
    from proxy.keys import fingerprint, key_digest

    secret = sys.stdin.readline() if key == "-" else key
    secret = secret.strip()
    if secret.lower().startswith("bearer "):
        secret = secret[7:].strip()
    if not secret:
        print("thriftgate: no key given", file=sys.stderr)
        return 2
    print(key_digest(secret) if full else fingerprint(secret))
    return 0


def serve(args: argparse.Namespace, argv: list[str]) -> int:
    flags: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "upstream": args.upstream,
        "workers": args.workers,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    try:
        settings = load_settings(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"thriftgate: configuration error: {exc}", file=sys.stderr)
        return 2
    fmt = resolve_format(settings.log.format)
    settings = dataclasses.replace(settings, log=dataclasses.replace(settings.log, format=fmt))
    configure_logging(level=settings.log.level, fmt=fmt)
    if settings.server.workers > 1 and args.worker_index is None:
        if settings.server.port == 0:
            print("thriftgate: --workers > 1 needs a fixed --port", file=sys.stderr)
            return 2
        return _supervise(settings, argv)
    return _run(settings, reuse_port=args.worker_index is not None)


def tune_collector() -> None:
    """Everything loaded at start-up lives as long as the process: keep it out of the collector's
    scans, and collect the young generation less often (a request allocates many short-lived
    objects, freed by reference counting). Measured in bench/: about 7% less CPU per request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def _run(settings: Settings, *, reuse_port: bool) -> int:
    from proxy.server import catch_stop_signals

    noted = catch_stop_signals()  # a SIGTERM from here on is a clean stop
    from proxy.app import create_app
    from proxy.server import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    tune_collector()
    try:
        app = create_app(settings)
        return loop.run_until_complete(
            serve(app, settings, reuse_port=reuse_port, stop_noted=noted)
        )
    finally:
        loop.close()


def _supervise(settings: Settings, argv: list[str]) -> int:
    """Run N worker processes on one port (SO_REUSEPORT); forward SIGTERM/SIGINT to them."""
    n = settings.server.workers
    # the workers share their metrics through files here, so any one of them answers /metrics
    # for all (a directory of the operator's choosing is kept; ours is removed at the end)
    own_dir = settings.server.metrics_dir is None
    metrics_dir = settings.server.metrics_dir or tempfile.mkdtemp(prefix="thriftgate-metrics-")
    env = {**os.environ, "THRIFTGATE_METRICS_DIR": metrics_dir}
    children = [
        subprocess.Popen([sys.executable, "-m", "proxy", *argv, "--worker-index", str(i)], env=env)
        for i in range(n)
    ]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def reopen(signum: int, _frame: object) -> None:  # logrotate: each worker reopens its log
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reopen)
    log.info("supervising", workers=n, pids=[c.pid for c in children])
    code = 0
    while children:
        try:
            pid, status = _wait_any()
        except ChildProcessError:
            break
        for child in [c for c in children if c.pid == pid]:
            children.remove(child)
            child.returncode = _exit_code(status)
            if child.returncode != 0:
                code = code or child.returncode
            if not stopping:
                log.error("worker_exited", pid=pid, code=child.returncode)
                stop(signal.SIGTERM, None)
    if own_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _wait_any() -> tuple[int, int]:
    return os.wait()


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)
