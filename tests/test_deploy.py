"""deploy/: the alerting rules checked and unit-tested by promtool, a real Prometheus scraping a
running thriftgate with them loaded, the Grafana dashboard and the rules built only on series
thriftgate exports, and the compose and Kubernetes files saying what the docs promise."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import API_KEY, free_port
from test_cli import Served, start

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "thriftgate.rules.yml"

needs_prometheus = pytest.mark.skipif(
    shutil.which("promtool") is None or shutil.which("prometheus") is None,
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


@pytest.fixture
async def served(tmp_path: Path, upstream: TestServer, redis_url: str) -> AsyncIterator[Served]:
    server = start(
        tmp_path, "--upstream", str(upstream.make_url("/v1")), env={"REDIS_URL": redis_url}
    )
    await server.ready()
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY) as client:
        for _ in range(2):  # a miss and a hit: every family has a sample
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "for the scrape"}]
            )
    yield server
    server.proc.send_signal(signal.SIGTERM)
    await server.wait()


async def scrape(served: Served) -> str:
    async with aiohttp.ClientSession() as s, s.get(served.url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


def exported(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^# TYPE (\w+) ", text, re.M)}


def used(expr: str) -> set[str]:
    """The thriftgate series an expression reads (histograms by their family name)."""
    names = set(re.findall(r"\b(thriftgate_\w+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


@needs_prometheus
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    for args in (
        ["check", "rules", str(RULES)],
        ["test", "rules", str(DEPLOY / "prometheus" / "thriftgate.rules.test.yml")],
        ["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
    ):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_prometheus
async def test_a_real_prometheus_scrapes_thriftgate_with_the_rules_loaded(
    served: Served, tmp_path: Path
) -> None:
    text = await scrape(served)
    check = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(check.communicate(text.encode()), 60)
    assert check.returncode == 0, said.decode()
    port = free_port()
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [served.url.split("//")[1]]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        "prometheus",
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        async with aiohttp.ClientSession() as s:

            async def query(q: str) -> list[dict[str, Any]]:
                async with s.get(api + "/query", params={"query": q}) as r:
                    return (await r.json())["data"]["result"]

            async with asyncio.timeout(60):
                while True:  # until Prometheus is up and has scraped thriftgate
                    try:
                        found = await query('thriftgate_requests_total{job="thriftgate"}')
                    except (aiohttp.ClientError, KeyError):
                        found = []
                    if found:
                        break
                    await asyncio.sleep(0.2)
            assert (await query('up{job="thriftgate"}'))[0]["value"][1] == "1"
            hits = await query('thriftgate_cache_events_total{event="hit"}')
            assert hits[0]["value"][1] == "1"
            assert (await query("thriftgate_redis_up"))[0]["value"][1] == "1"
            async with s.get(api + "/rules") as r:
                groups = (await r.json())["data"]["groups"]
            rules = [rule for g in groups for rule in g["rules"]]
            assert len(rules) == 7 and all(rule["health"] == "ok" for rule in rules)
            # nothing is wrong: no alert fires
            assert not [rule for rule in rules if rule["state"] == "firing"]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)


async def test_the_dashboard_and_the_rules_use_only_exported_series(served: Served) -> None:
    names = exported(await scrape(served))
    # only exported once they happened: a refusal, a queued request, a retry
    names |= {"thriftgate_budget_rejections_total", "thriftgate_rate_limited_total"}
    dashboard = json.loads((DEPLOY / "grafana" / "thriftgate.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs and all(used(e) <= names for e in exprs), [used(e) - names for e in exprs]
    assert {"datasource"} <= {v["name"] for v in dashboard["templating"]["list"]}
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    for rule in rules:
        assert used(rule["expr"]) <= names, rule["alert"]


def test_compose_writes_the_usage_log_to_its_volume_as_the_image_user() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    tg = compose["services"]["thriftgate"]
    env = tg["environment"]
    log_path = env["THRIFTGATE_USAGE_LOG"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in tg["volumes"]}
    folder = str(Path(log_path).parent)
    assert folder in mounts and mounts[folder] in compose["volumes"]  # a named volume
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"mkdir -p {folder}" in dockerfile and f"chown thriftgate {folder}" in dockerfile
    assert "USER thriftgate" in dockerfile
    assert env["REDIS_URL"].startswith("redis://redis:")
    assert "redis" in compose["services"]


def test_the_kubernetes_sidecar_probes_and_grace() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes" / "sidecar.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    tg = next(c for c in pod["containers"] if c["name"] == "thriftgate")
    app = next(c for c in pod["containers"] if c["name"] == "app")
    assert {"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:8080/v1"} in app["env"]
    assert tg["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert tg["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["terminationGracePeriodSeconds"] >= 30 + 5  # shutdown_grace_s + margin
    key = next(e for e in tg["env"] if e["name"] == "THRIFTGATE_UPSTREAM_API_KEY")
    assert "secretKeyRef" in key["valueFrom"]  # the key is never written in the manifest
