"""Configuration: defaults < TOML file < environment < flags, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).parent.parent / "config" / "thriftgate.example.toml"


def test_defaults() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.server.host == "127.0.0.1"
    assert s.server.port == 8080
    assert s.server.workers == 1
    assert s.upstream.url == "https://api.openai.com/v1"
    assert s.server.max_body_bytes == 100 * 1024 * 1024
    assert s.redis.url is None


def test_example_file_is_valid_and_equals_the_defaults() -> None:
    s = load_settings(env={}, config_file=str(EXAMPLE))
    assert s.config_file == str(EXAMPLE)
    assert s.server == Settings().server
    assert s.upstream == Settings().upstream


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[server]\nport = 9001\nhost = "10.0.0.1"\nworkers = 3\n'
        '[upstream]\nurl = "http://file:1/v1"\n'
    )
    env = {"THRIFTGATE_CONFIG": str(cfg), "THRIFTGATE_PORT": "9002", "THRIFTGATE_WORKERS": "2"}
    s = load_settings({"port": 9003, "host": None}, env=env)
    assert s.server.port == 9003  # flag
    assert s.server.workers == 2  # env
    assert s.server.host == "10.0.0.1"  # file
    assert s.upstream.url == "http://file:1/v1"
    assert s.config_file == str(cfg)


def test_redis_url_from_parts_and_url() -> None:
    assert (
        load_settings(env={"REDIS_HOST": "r", "REDIS_PORT": "7000", "REDIS_DB": "2"}).redis.url
        == "redis://r:7000/2"
    )
    assert (
        load_settings(env={"REDIS_URL": "redis://x:1/0", "REDIS_HOST": "r"}).redis.url
        == "redis://x:1/0"
    )


def test_secrets_not_in_repr() -> None:
    s = load_settings(
        env={"THRIFTGATE_UPSTREAM_API_KEY": "sk-secret-value", "REDIS_URL": "redis://:pw@h:1/0"}
    )
    assert s.upstream.api_key == "sk-secret-value"
    assert "sk-secret-value" not in repr(s)
    assert "pw@" not in repr(s)


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"THRIFTGATE_PORT": "http"}, "THRIFTGATE_PORT: 'http' is not a valid int"),
        ({"THRIFTGATE_PORT": "70000"}, "is not a TCP port"),
        ({"THRIFTGATE_WORKERS": "0"}, "must be at least 1"),
        ({"THRIFTGATE_UPSTREAM_URL": "api.openai.com"}, "is not an http(s) URL"),
        ({"THRIFTGATE_CONNECT_TIMEOUT_S": "-1"}, "must be positive"),
        ({"REDIS_URL": "http://x"}, "redis://"),
    ],
)
def test_bad_values_say_where(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as caught:
        load_settings(env=env)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown setting server.prot"),
        ("[srever]\n", "unknown section [srever]"),
        ("[server\n", "not valid TOML"),
        ('[server]\nport = "x"\n', "server.port: 'x' is not a valid int"),
        ("[server]\nport = 8080.5\n", "is not a valid int"),
    ],
)
def test_bad_files_say_where(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={}, config_file=str(cfg))
    assert message in str(caught.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={"THRIFTGATE_CONFIG": "/nonexistent/x.toml"})


def test_budget_and_rate_limit_env_for_sidecars() -> None:
    s = load_settings(
        env={
            "THRIFTGATE_TOKENS_PER_DAY": "100000",
            "THRIFTGATE_TOKENS_PER_MONTH": "2000000",
            "THRIFTGATE_USD_PER_DAY": "5",
            "THRIFTGATE_USD_PER_MONTH": "100.5",
            "THRIFTGATE_RPM": "60",
            "THRIFTGATE_TPM": "90000",
            "THRIFTGATE_RATE_LIMIT_MODE": "queue",
        }
    )
    assert (s.budget.tokens_per_day, s.budget.tokens_per_month) == (100000, 2000000)
    assert (s.budget.usd_per_day, s.budget.usd_per_month) == (5.0, 100.5)
    assert (s.ratelimit.rpm, s.ratelimit.tpm, s.ratelimit.mode) == (60, 90000, "queue")
    with pytest.raises(ConfigError, match="THRIFTGATE_TOKENS_PER_DAY"):
        load_settings(env={"THRIFTGATE_TOKENS_PER_DAY": "-1"})
    with pytest.raises(ConfigError, match="THRIFTGATE_RATE_LIMIT_MODE"):
        load_settings(env={"THRIFTGATE_RATE_LIMIT_MODE": "drop"})


def test_key_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        '[keys."ci-bot"]\nfingerprint = "0123456789AB"\ntokens_per_day = 10\nrpm = 5\n'
        '[keys."abcdefabcdef"]\nusd_per_month = 2.5\n'
    )
    s = load_settings(env={}, config_file=str(cfg))
    assert [(k.alias, k.fingerprint, k.tokens_per_day, k.rpm) for k in s.keys] == [
        ("ci-bot", "0123456789ab", 10, 5),
        ("abcdefabcdef", "abcdefabcdef", None, None),
    ]
    for text, message in [
        ('[keys."ci"]\ntokens_per_day = 1\n', "is not a key fingerprint"),
        ('[keys."ci"]\nfingerprint = "0123456789ab"\nspeed = 1\n', "unknown setting speed"),
        ('[keys."ci"]\nfingerprint = "0123456789ab"\nrpm = -3\n', "must not be negative"),
        (
            '[keys."a"]\nfingerprint = "0123456789ab"\n[keys."b"]\nfingerprint = "0123456789ab"\n',
            "same fingerprint",
        ),
    ]:
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_settings(env={}, config_file=str(cfg))


def test_the_floors_ci_installs_are_the_floors_pyproject_allows() -> None:
    """.ci/run tests the lowest versions allowed; they must be the ones pyproject.toml names."""
    import re
    import tomllib

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    floors = {}
    for spec in project["dependencies"]:
        match = re.match(r"^([A-Za-z0-9_.-]+)>=([0-9.]+)", spec)
        assert match, spec
        floors[match.group(1).lower()] = match.group(2)
    pinned = {}
    for line in (root / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[name.strip().lower()] = version.strip()
    assert pinned == floors


def test_redis_topologies_from_urls_and_env(tmp_path: Path) -> None:
    from proxy.config import redact_url, sentinel_parts

    found = sentinel_parts("redis+sentinel://app:s3cret@s1:26379,s2:26380/mymaster/2")
    assert found.sentinels == (("s1", 26379), ("s2", 26380))
    assert (found.service, found.db, found.username, found.password) == (
        "mymaster",
        2,
        "app",
        "s3cret",
    )
    assert not found.tls and sentinel_parts("rediss+sentinel://s1/m").tls
    shown = redact_url("redis+sentinel://app:s3cret@s1:26379,s2:26380/mymaster/2")
    assert "s3cret" not in shown and "s1:26379,s2:26380/mymaster" in shown
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    settings = load_settings(
        env={
            "REDIS_URL": "rediss://redis.example:6380/0",
            "THRIFTGATE_REDIS_MODE": "cluster",
            "THRIFTGATE_REDIS_USERNAME": "thriftgate",
            "THRIFTGATE_REDIS_PASSWORD": "pw",
            "THRIFTGATE_REDIS_CA_FILE": str(ca),
        }
    )
    r = settings.redis
    assert (r.mode, r.username, r.password, r.ca_file) == ("cluster", "thriftgate", "pw", str(ca))
    assert "pw" not in repr(settings)
    for env, message in (
        ({"REDIS_URL": "http://x"}, "or redis\\+sentinel:// URL"),
        ({"REDIS_URL": "redis+sentinel://s1:26379"}, "service name is missing"),
        ({"REDIS_URL": "redis://x", "THRIFTGATE_REDIS_MODE": "ring"}, "is not one of"),
        (
            {"REDIS_URL": "redis://x", "THRIFTGATE_REDIS_MODE": "sentinel"},
            "needs a redis\\+sentinel",
        ),
        ({"REDIS_URL": "rediss://x", "THRIFTGATE_REDIS_CA_FILE": "/nope.crt"}, "not a readable"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(env=env)
