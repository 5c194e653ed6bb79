"""Real Redis topologies for the fleet tests, started by the suite itself: a 3-primary Redis
Cluster, a primary with a replica watched by Sentinel, and a TLS-only server with a test CA."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REDIS = shutil.which("redis-server") or "redis-server"
CLI = shutil.which("redis-cli") or "redis-cli"


def free_port(*, with_bus: bool = False) -> int:
    """A free port (and, for a cluster node, one whose +10000 bus port is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


def cli(port: int, *args: str, tls: list[str] | None = None) -> str:
    out = subprocess.run(
        [CLI, "-p", str(port), *(tls or []), *args], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def wait_until(check: object, within: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Process:
    def __init__(self, args: list[str], cwd: Path) -> None:
        self.args = args
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def server_args(port: int, *extra: str) -> list[str]:
    """redis-server on ``port`` of 127.0.0.1, in memory only (no RDB, no AOF), quiet."""
    return [
        REDIS,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--loglevel",
        "warning",
        *extra,
    ]


def _pong(port: int) -> bool:
    return cli(port, "PING") == "PONG"


class Cluster:
    """Three primaries, every slot covered (``redis-cli --cluster create``)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tg-cluster-"))
        self.ports = [free_port(with_bus=True) for _ in range(3)]
        self.nodes = [
            Process(
                server_args(
                    p,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    f"nodes-{p}.conf",
                    "--cluster-node-timeout",
                    "2000",
                ),
                self.dir,
            )
            for p in self.ports
        ]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        for p in self.ports:
            wait_until(lambda p=p: _pong(p), what=f"cluster node {p}")
        subprocess.run(
            [
                CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        for p in self.ports:
            wait_until(
                lambda p=p: "cluster_state:ok" in cli(p, "CLUSTER", "INFO"), what="cluster ok"
            )

    def flush(self) -> None:
        for p in self.ports:
            cli(p, "FLUSHALL")

    def keys_per_node(self, pattern: str) -> list[int]:
        script = f"return #redis.call('KEYS', '{pattern}')"
        return [int(cli(p, "EVAL", script, "0")) for p in self.ports]

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A primary, one replica, and one sentinel (quorum 1) that fails over in about a second."""

    SERVICE = "tgprimary"

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tg-sentinel-"))
        self.primary_port, self.replica_port, self.sentinel_port = (free_port() for _ in range(3))
        self.primary = Process(server_args(self.primary_port), self.dir)
        self.replica = Process(
            server_args(self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port)),
            self.dir,
        )
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\n"
            "bind 127.0.0.1\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 600\n"
            f"sentinel failover-timeout {self.SERVICE} 3000\n"
            f"sentinel parallel-syncs {self.SERVICE} 1\n"
        )
        self.sentinel = Process([REDIS, str(conf), "--sentinel"], self.dir)

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.SERVICE}/0"

    def primary_now(self) -> int:
        out = cli(self.sentinel_port, "SENTINEL", "get-master-addr-by-name", self.SERVICE)
        return int(out.split()[-1]) if out else 0

    def start(self) -> None:
        self.primary.start()
        wait_until(lambda: _pong(self.primary_port), what="primary")
        self.replica.start()
        wait_until(
            lambda: "master_link_status:up" in cli(self.replica_port, "INFO", "replication"),
            what="replica in sync",
        )
        self.sentinel.start()
        wait_until(lambda: self.primary_now() == self.primary_port, what="sentinel")
        wait_until(
            lambda: "slaves=1" in cli(self.sentinel_port, "INFO", "sentinel"),
            what="sentinel sees the replica",
        )

    def stop(self) -> None:
        for p in (self.sentinel, self.replica, self.primary):
            p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class TLSServer:
    """A redis-server that speaks TLS only, with a certificate from a CA made for the test."""

    def __init__(self, password: str = "tls-secret") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tg-tls-"))
        self.port = free_port()
        self.password = password
        self.ca = self.dir / "ca.crt"
        self._make_certificates()
        self.server = Process(
            [
                REDIS,
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--tls-cert-file",
                str(self.dir / "server.crt"),
                "--tls-key-file",
                str(self.dir / "server.key"),
                "--tls-ca-cert-file",
                str(self.ca),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                password,
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            self.dir,
        )

    def _make_certificates(self) -> None:
        d = self.dir

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=d, capture_output=True, check=True, timeout=60)

        key = ["-newkey", "rsa:2048", "-nodes"]
        # the extensions a CA and a server certificate should have: Python 3.13's default context
        # verifies strictly (VERIFY_X509_STRICT) and refuses certificates without them
        run("req", "-x509", *key, "-days", "2", "-subj", "/CN=tg-test-ca", "-keyout", "ca.key",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", "ca.crt")  # fmt: skip
        (d / "san.cnf").write_text(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
            "authorityKeyIdentifier=keyid\n"
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
        )
        run("req", *key, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
        run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "san.cnf",
            "-out", "server.crt")  # fmt: skip

    @property
    def url(self) -> str:
        return f"rediss://default:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def tls(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca), "-a", self.password, "--no-auth-warning"]

    def count(self, pattern: str) -> int:
        script = f"return #redis.call('KEYS', '{pattern}')"
        return int(cli(self.port, "EVAL", script, "0", tls=self.tls) or 0)

    def start(self) -> None:
        self.server.start()
        wait_until(lambda: cli(self.port, "PING", tls=self.tls) == "PONG", what="TLS redis")

    def stop(self) -> None:
        self.server.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
