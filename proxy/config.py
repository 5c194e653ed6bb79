"""Configuration: one frozen object, built once from defaults, a TOML file, env and flags.

Precedence, lowest first: built-in defaults < TOML file < environment < command-line flags.
This is the only module that reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import unquote

from yarl import URL


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


# -- the rules a setting's value must follow, written beside its field ---------------------------
# ``Annotated[int, at_least(1)]``: each check returns what is wrong with a value, or None. Choices
# are typed literals (``Literal["reject", "queue"]``), checked when the value is read.

Check = Callable[[Any], "str | None"]


def positive(value: float) -> str | None:
    return None if value > 0 else "must be positive"


def not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def at_least(least: int) -> Check:
    def check(value: int) -> str | None:
        return None if value >= least else f"must be at least {least}"

    return check


def tcp_port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else f"{value} is not a TCP port"


def not_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def http_url(value: str) -> str | None:
    url = URL(value)
    if url.scheme in {"http", "https"} and url.host:
        return None
    return f"{redact_url(value)!r} is not an http(s) URL"


def redis_url(value: str) -> str | None:
    scheme = value.split("://", 1)[0] if "://" in value else ""
    if scheme not in REDIS_SCHEMES:
        return "must be a redis://, rediss://, unix:// or redis+sentinel:// URL"
    if scheme.endswith("+sentinel"):
        try:
            sentinel_parts(value)
        except ValueError as exc:
            return str(exc)
    return None


def readable_file(value: str) -> str | None:
    return None if os.path.isfile(value) else f"{value} is not a readable file"


REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")

Seconds = Annotated[float, positive]  # a time that must pass
Wait = Annotated[float, not_negative]  # a time that may be zero
Count = Annotated[int, not_negative]  # a limit or a size (0: none, unless said otherwise)
Amount = Annotated[float, not_negative]  # USD, a fraction, a rate
Size = Annotated[int, positive]
LogFormat = Literal["auto", "console", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_FORMATS: tuple[str, ...] = typing.get_args(LogFormat)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"  # address to listen on (the Docker image: 0.0.0.0)
    port: Annotated[int, tcp_port] = 8080  # port to listen on (0: any free port)
    workers: Annotated[int, at_least(1)] = 1  # processes sharing the port (SO_REUSEPORT)
    shutdown_grace_s: Wait = 30.0  # on SIGTERM, in-flight requests run on this long
    max_body_bytes: Size = 100 * 1024 * 1024  # a larger request body (decoded) gets 413
    admin_token: str | None = field(default=None, repr=False)  # protects /metrics when set
    dashboard: bool = True  # /dashboard (off: not served, and nothing counted for it)
    dashboard_refresh_s: Annotated[int, at_least(1)] = 10  # how often the page reloads itself
    metrics_dir: str | None = None  # workers share their counters here (set by --workers N)
    # the HMAC key of the tenant scope (cache, budgets, limits); every replica sharing a Redis
    # must use the same one. The default is public: set your own so that what is stored in Redis
    # cannot even be checked against a candidate API key.
    scope_secret: Annotated[str, not_empty] = field(default="thriftgate-scope-v1", repr=False)
    header_timeout_s: Seconds = 10.0  # a request's headers must arrive whole within this
    body_timeout_s: Seconds = 60.0  # ...and its body without a pause longer than this
    express: bool = True  # cache hits found in memory answered as they arrive (proxy.express)


@dataclass(frozen=True, slots=True)
class LogSettings:
    """The operational log on stderr (the usage log is separate: ``[usage]``)."""

    format: LogFormat = "auto"  # auto: console on a terminal, JSON otherwise | console | json
    level: LogLevel = "info"  # debug | info | warning | error


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: Annotated[str, http_url] = (
        "https://api.openai.com/v1"  # the OpenAI-compatible base URL, ending in /v1
    )
    # sent upstream instead of the client's key (a sidecar)
    api_key: str | None = field(default=None, repr=False)
    connect_timeout_s: Seconds = 10.0  # to open a connection
    first_byte_timeout_s: Seconds = (
        600.0  # from the request sent to the answer's status and headers
    )
    total_timeout_s: Seconds = 1800.0  # a whole answer, stream included
    idle_timeout_s: Seconds = 300.0  # streams: the longest silence between two chunks
    max_connections: Count = 0  # 0: unlimited
    breaker_failures: Annotated[int, at_least(1)] = (
        5  # consecutive failures that take an upstream out of the rotation
    )
    breaker_cooldown_s: float = 30.0  # ...for this long; then one probe request is let through


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One OpenAI-compatible base URL of several (``[[upstreams]]`` in the TOML file)."""

    url: Annotated[
        str, http_url
    ]  # the upstream's base URL (credentials in it are used, never shown)
    api_key: str | None = field(default=None, repr=False)  # its own key (default: upstream.api_key)
    weight: Annotated[float, positive] = 1.0  # share of the traffic, relative to the others
    name: str = ""  # default: host[:port]


@dataclass(frozen=True, slots=True)
class UsageSettings:
    log_path: str | None = None  # None: one JSON line per request on stdout
    enabled: bool = True  # false: no usage log (metrics and alerts still see every request)
    redis_stream: str | None = None  # also XADD each record to this Redis stream (needs Redis)
    redis_stream_maxlen: int = 1_000_000  # the stream is trimmed to about this many records
    force_stream_usage: bool = False  # ask for the usage chunk, strip it before the client sees it


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Redis: one server, a Redis Cluster, or a primary found through Sentinel; TLS and ACL
    users. Shared by every replica: cache, budgets, rate limits, alerts, the usage stream."""

    # redis://, rediss:// (TLS), unix://, or redis+sentinel://host:26379,host2:26379/service/db
    url: Annotated[str | None, redis_url] = field(default=None, repr=False)
    # auto: a Redis Cluster node is recognised at start | standalone | cluster | sentinel
    mode: Literal["auto", "standalone", "cluster", "sentinel"] = "auto"
    username: str | None = None  # an ACL user (default: the URL's, else "default")
    password: str | None = field(default=None, repr=False)  # default: the URL's
    sentinel_password: str | None = field(default=None, repr=False)  # the sentinels' own
    ca_file: Annotated[str | None, readable_file] = (
        None  # rediss://: the CA that signed the server's certificate
    )
    cert_file: Annotated[str | None, readable_file] = (
        None  # rediss:// with client certificates: this client's...
    )
    key_file: Annotated[str | None, readable_file] = None  # ...and its key
    timeout_s: Seconds = 0.25  # one operation; past it the operation is skipped, never the request
    retry_after_s: Seconds = 1.0  # after a failure Redis is left alone this long, then tried again
    # budgets while Redis is unreachable: local (per-process counters) | closed (refuse, 503)
    on_failure: Literal["local", "closed"] = "local"


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True  # the exact-match response cache
    backend: Literal["auto", "memory", "redis"] = (
        "auto"  # auto (redis when a Redis URL is set, else memory) | memory | redis
    )
    ttl_s: Seconds = 3600.0  # how long an answer is served again
    scope: Literal["key", "shared"] = (
        "key"  # key: per API key + organization + project | shared: across keys
    )
    max_bytes: Size = 256 * 1024 * 1024  # memory backend: total size of the stored answers
    max_entry_bytes: Size = 8 * 1024 * 1024  # a larger answer is passed through, not stored
    local_max_bytes: Count = 64 * 1024 * 1024  # with Redis: in-process copy of hot answers (0: off)
    exclude_models: tuple[str, ...] = ()  # names or shell patterns ("gpt-4o-audio*")
    only_temperature_zero: bool = False  # cache chat and completions only at temperature 0
    redis_prefix: str = "thriftgate:cache:"  # Redis key prefix of cached answers
    compress_min_bytes: int = 1024  # Redis values at least this large are stored zlib-compressed


@dataclass(frozen=True, slots=True)
class RetrySettings:
    enabled: bool = True  # retry transient upstream failures
    max_attempts: Annotated[int, at_least(1)] = (
        3  # per request: x-thriftgate-max-retries (retries, so attempts - 1)
    )
    initial_wait_s: Wait = 0.5  # full jitter: a random wait up to initial * 2^(n-1)...
    max_wait_s: Wait = 8.0  # ...and never more than this
    retry_after_cap_s: Wait = 30.0  # the upstream's retry-after is honoured up to this
    deadline_s: Wait = 300.0  # no retry starts (or waits) past this, counted from the first try
    tell_client_not_to_retry: bool = True  # x-should-retry: false on a final failure


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    """Per-key spending limits (0: unlimited); ``[keys."..."]`` tables override them per key."""

    tokens_per_day: Count = 0  # every key's token budget per UTC day (0: none)
    tokens_per_month: Count = 0  # ...per UTC month
    usd_per_day: Amount = 0.0  # every key's USD budget per UTC day (0: none)
    usd_per_month: Amount = 0.0  # ...per UTC month
    output_reserve_tokens: Count = 1024  # reserved for the answer of a request that sets no limit
    redis_prefix: str = "thriftgate:budget:"  # Redis key prefix of budget counters


@dataclass(frozen=True, slots=True)
class OptimizeSettings:
    """Opt-in changes to requests (both change what is sent upstream)."""

    dynamic_max_tokens: bool = False  # set an output limit on chat requests that have none
    max_tokens_cap: Count = 4096  # ...min(this, the context window left, the model's output limit)
    trim: bool = False  # history trimming for every chat request (per request: x-thriftgate-trim)
    trim_keep: Annotated[int, at_least(1)] = (
        10  # the most recent messages kept (system/developer messages always are)
    )
    trim_threshold_tokens: Count = 0  # trim only prompts larger than this


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    """Token buckets per key (0: unlimited); overrides in ``[keys."..."]``, globals per model in
    ``[model_limits."pattern"]``."""

    rpm: Count = 0  # requests per minute, the refill rate...
    rpm_burst: Count = 0  # ...and the bucket's capacity (0: one minute's worth)
    tpm: Count = 0  # tokens per minute
    tpm_burst: Count = 0  # the token bucket's capacity (0: one minute's worth)
    mode: Literal["reject", "queue"] = "reject"  # reject | queue
    max_wait_s: Wait = 30.0  # queue mode: the longest a request waits for room
    default_output_tokens: Count = 1024  # charged for the answer of a request that sets no limit
    expose_headers: bool = False  # x-ratelimit-* of the proxy's own buckets on successful answers
    adaptive: bool = True  # hold requests back when the upstream says its limits are nearly spent
    adaptive_min_remaining: Amount = 0.02  # ...below this fraction of the upstream's limit
    redis_prefix: str = "thriftgate:rl:"  # Redis key prefix of the buckets


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """Alert rules (0: off); a rule fires once per ``cooldown_s`` per scope."""

    webhook_url: Annotated[str | None, http_url] = field(
        default=None, repr=False
    )  # POST {"text": ...} (Slack-style)
    webhook_timeout_s: Seconds = 5.0  # a webhook POST gives up after this
    cooldown_s: Wait = 3600.0  # an alert fires at most once per rule and scope in this time
    spend_usd_per_hour: Amount = 0.0  # everything spent in the current UTC hour
    spend_usd_per_day: Amount = 0.0  # ...in the current UTC day
    key_spend_usd_per_hour: Amount = 0.0  # any one key, in the current UTC hour
    key_spend_usd_per_day: Amount = 0.0  # ...in the current UTC day
    budget_warn_fraction: Amount = 0.8  # a key's budget this far used (and when it is spent)
    error_rate: Amount = 0.0  # share of requests failing upstream (5xx) within window_s
    cache_hit_rate_below: Amount = 0.0  # hit rate of cacheable requests within window_s
    window_s: Seconds = 300.0  # the window of the error-rate and hit-rate rules
    min_requests: Count = 20  # the window rules need this many requests first


@dataclass(frozen=True, slots=True)
class MicrobatchSettings:
    """Embeddings micro-batching in the proxy (opt-in: merged answers are re-serialised)."""

    embeddings: bool = False  # merge concurrent embeddings requests (opt-in)
    window_ms: Wait = 5.0  # requests arriving this soon after the first are merged with it
    max_inputs: Size = 2048  # OpenAI's limit of inputs per embeddings request
    max_tokens: Size = 300_000  # ...and of tokens summed over them


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """``thriftgate batch``: where to send, and how."""

    base_url: str = "http://127.0.0.1:8080/v1"  # thriftgate itself by default
    # the key thriftgate batch sends (OPENAI_API_KEY)
    api_key: str | None = field(default=None, repr=False)
    concurrency: Annotated[int, at_least(1)] = 16  # --via proxy: requests in flight at once
    poll_initial_s: float = 5.0  # --via api: the first wait between polls of the batch...
    poll_max_s: float = 60.0  # ...growing 1.5x up to this


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """A ``[keys."alias"]`` table: who a key is and its own limits (None: the default)."""

    alias: str
    fingerprint: str  # the key's 12-hex fingerprint or full SHA-256 (thriftgate fingerprint)
    # this key's own budgets and limits ([budget] and [ratelimit] keys); unset: the defaults
    tokens_per_day: int | None = None  # tokens per UTC day
    tokens_per_month: int | None = None  # tokens per UTC month
    usd_per_day: float | None = None  # USD per UTC day
    usd_per_month: float | None = None  # USD per UTC month
    rpm: int | None = None  # requests per minute
    rpm_burst: int | None = None  # the request bucket's capacity
    tpm: int | None = None  # tokens per minute
    tpm_burst: int | None = None  # the token bucket's capacity


@dataclass(frozen=True, slots=True)
class ModelLimit:
    """A ``[model_limits."pattern"]`` table: a bucket shared by every key for matching models
    (the organisation's own upstream limits)."""

    pattern: str
    rpm: int = 0  # requests per minute for every key together (0: none)
    tpm: int = 0  # tokens per minute, likewise


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens (``[prices."model"]`` tables and ``prices.toml``), and for images and
    audio the other units OpenAI bills by."""

    name: str
    input: float = 0.0  # text input tokens
    output: float = 0.0  # output tokens (text, image or audio: what the model makes)
    cached_input: float | None = None  # None: the input price
    image_input: float | None = None  # image input tokens (None: the input price)
    audio_input: float | None = None  # audio input tokens (None: the input price)
    per_minute: float = 0.0  # audio transcribed or translated, per minute
    per_million_characters: float = 0.0  # speech, per 1M input characters
    # per image, a table of "<quality> <size>" = USD ("standard 1024x1024" = 0.04)
    per_image: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's limits: the catalogue's entries and the config's ``[models."name"]`` tables."""

    name: str
    context_window: Annotated[int, at_least(1)]  # prompt plus output, in tokens
    max_output_tokens: Count = 0  # the most output tokens (0: unknown)


_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "log": LogSettings,
    "upstream": UpstreamSettings,
    "usage": UsageSettings,
    "redis": RedisSettings,
    "cache": CacheSettings,
    "retry": RetrySettings,
    "budget": BudgetSettings,
    "optimize": OptimizeSettings,
    "ratelimit": RateLimitSettings,
    "alerts": AlertSettings,
    "batch": BatchSettings,
    "microbatch": MicrobatchSettings,
}
# sections made of named tables: [keys."alias"], [models."name"], [model_limits."p"], [prices."m"]
_TABLES = ("keys", "models", "model_limits", "prices")


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    log: LogSettings = field(default_factory=LogSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    usage: UsageSettings = field(default_factory=UsageSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    retry: RetrySettings = field(default_factory=RetrySettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    optimize: OptimizeSettings = field(default_factory=OptimizeSettings)
    ratelimit: RateLimitSettings = field(default_factory=RateLimitSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)
    batch: BatchSettings = field(default_factory=BatchSettings)
    microbatch: MicrobatchSettings = field(default_factory=MicrobatchSettings)
    keys: tuple[KeyPolicy, ...] = ()
    model_limits: tuple[ModelLimit, ...] = ()
    prices: tuple[Price, ...] = ()  # additions to / overrides of the shipped price table
    upstreams: tuple[UpstreamTarget, ...] = ()  # empty: the one upstream.url
    models: tuple[ModelInfo, ...] = ()  # additions to / overrides of the shipped catalogue
    config_file: str | None = None

    def targets(self) -> tuple[UpstreamTarget, ...]:
        """The upstreams to spread requests over: ``[[upstreams]]``, else ``upstream.url``."""
        if self.upstreams:
            return self.upstreams
        return (
            UpstreamTarget(self.upstream.url, self.upstream.api_key, 1.0, _name(self.upstream.url)),
        )


_SECRET_PARAM = ("key", "token", "secret", "password", "passwd", "pwd", "auth", "sig", "credential")


def redact_url(url: str) -> str:
    """``url`` fit to show: user-info replaced by ``***`` and the values of secret-looking query
    parameters (api-key, token, sig, ...) by ``***``. What cannot be parsed is hidden whole."""
    if "+sentinel://" in url:  # several hosts: not a URL yarl parses
        scheme, _, rest = url.partition("://")
        _, at, hosts = rest.rpartition("@")
        return f"{scheme}://{'***@' if at else ''}{hosts if at else rest}"
    try:
        parsed = URL(url)
        if parsed.user is not None or parsed.password is not None:
            parsed = parsed.with_user(None).with_password(None)
            shown = str(parsed).replace("://", "://***@", 1)
            parsed = URL(shown, encoded=True)
        if parsed.query_string:
            query = [
                (k, "***" if any(w in k.lower() for w in _SECRET_PARAM) else v)
                for k, v in parsed.query.items()
            ]
            parsed = parsed.with_query(query)
        return str(parsed)
    except (ValueError, TypeError):
        return "<unparsable URL>"


def _name(url: str) -> str:
    parsed = URL(url)
    return f"{parsed.host}:{parsed.port}" if parsed.explicit_port else str(parsed.host)


# (section, key) -> environment variables, first set one wins.
ENV_VARS: dict[tuple[str, str], tuple[str, ...]] = {
    ("server", "host"): ("THRIFTGATE_HOST",),
    ("server", "port"): ("THRIFTGATE_PORT",),
    ("server", "workers"): ("THRIFTGATE_WORKERS",),
    ("server", "shutdown_grace_s"): ("THRIFTGATE_SHUTDOWN_GRACE_S",),
    ("server", "max_body_bytes"): ("THRIFTGATE_MAX_BODY_BYTES",),
    ("server", "admin_token"): ("THRIFTGATE_ADMIN_TOKEN",),
    ("server", "dashboard"): ("THRIFTGATE_DASHBOARD",),
    ("server", "dashboard_refresh_s"): ("THRIFTGATE_DASHBOARD_REFRESH_S",),
    ("server", "metrics_dir"): ("THRIFTGATE_METRICS_DIR",),
    ("server", "scope_secret"): ("THRIFTGATE_SCOPE_SECRET",),
    ("server", "header_timeout_s"): ("THRIFTGATE_HEADER_TIMEOUT_S",),
    ("server", "body_timeout_s"): ("THRIFTGATE_BODY_TIMEOUT_S",),
    ("server", "express"): ("THRIFTGATE_EXPRESS",),
    ("log", "format"): ("THRIFTGATE_LOG_FORMAT",),
    ("log", "level"): ("THRIFTGATE_LOG_LEVEL",),
    ("upstream", "url"): ("THRIFTGATE_UPSTREAM_URL",),
    ("upstream", "api_key"): ("THRIFTGATE_UPSTREAM_API_KEY",),
    ("upstream", "connect_timeout_s"): ("THRIFTGATE_CONNECT_TIMEOUT_S",),
    ("upstream", "first_byte_timeout_s"): ("THRIFTGATE_FIRST_BYTE_TIMEOUT_S",),
    ("upstream", "total_timeout_s"): ("THRIFTGATE_TOTAL_TIMEOUT_S",),
    ("upstream", "idle_timeout_s"): ("THRIFTGATE_IDLE_TIMEOUT_S",),
    ("usage", "log_path"): ("THRIFTGATE_USAGE_LOG",),
    ("usage", "redis_stream"): ("THRIFTGATE_USAGE_REDIS_STREAM",),
    ("usage", "force_stream_usage"): ("THRIFTGATE_FORCE_STREAM_USAGE",),
    ("redis", "url"): ("THRIFTGATE_REDIS_URL", "REDIS_URL"),
    ("redis", "timeout_s"): ("THRIFTGATE_REDIS_TIMEOUT_S",),
    ("redis", "on_failure"): ("THRIFTGATE_REDIS_ON_FAILURE",),
    ("redis", "mode"): ("THRIFTGATE_REDIS_MODE",),
    ("redis", "username"): ("THRIFTGATE_REDIS_USERNAME",),
    ("redis", "password"): ("THRIFTGATE_REDIS_PASSWORD",),
    ("redis", "sentinel_password"): ("THRIFTGATE_REDIS_SENTINEL_PASSWORD",),
    ("redis", "ca_file"): ("THRIFTGATE_REDIS_CA_FILE",),
    ("redis", "cert_file"): ("THRIFTGATE_REDIS_CERT_FILE",),
    ("redis", "key_file"): ("THRIFTGATE_REDIS_KEY_FILE",),
    ("cache", "enabled"): ("THRIFTGATE_CACHE",),
    ("cache", "backend"): ("THRIFTGATE_CACHE_BACKEND",),
    ("cache", "ttl_s"): ("THRIFTGATE_CACHE_TTL", "OPENAI_CACHE_TTL"),
    ("cache", "scope"): ("THRIFTGATE_CACHE_SCOPE",),
    ("cache", "max_bytes"): ("THRIFTGATE_CACHE_MAX_BYTES",),
    ("cache", "local_max_bytes"): ("THRIFTGATE_CACHE_LOCAL_MAX_BYTES",),
    ("cache", "exclude_models"): ("THRIFTGATE_CACHE_EXCLUDE_MODELS",),
    ("cache", "only_temperature_zero"): ("THRIFTGATE_CACHE_ONLY_TEMPERATURE_ZERO",),
    ("retry", "enabled"): ("THRIFTGATE_RETRY",),
    ("retry", "max_attempts"): ("THRIFTGATE_RETRY_MAX_ATTEMPTS",),
    ("retry", "deadline_s"): ("THRIFTGATE_RETRY_DEADLINE_S",),
    ("budget", "tokens_per_day"): ("THRIFTGATE_TOKENS_PER_DAY",),
    ("budget", "tokens_per_month"): ("THRIFTGATE_TOKENS_PER_MONTH",),
    ("budget", "usd_per_day"): ("THRIFTGATE_USD_PER_DAY",),
    ("budget", "usd_per_month"): ("THRIFTGATE_USD_PER_MONTH",),
    ("optimize", "dynamic_max_tokens"): ("THRIFTGATE_DYNAMIC_MAX_TOKENS",),
    ("optimize", "trim"): ("THRIFTGATE_TRIM",),
    ("ratelimit", "rpm"): ("THRIFTGATE_RPM",),
    ("ratelimit", "tpm"): ("THRIFTGATE_TPM",),
    ("ratelimit", "mode"): ("THRIFTGATE_RATE_LIMIT_MODE",),
    ("ratelimit", "max_wait_s"): ("THRIFTGATE_RATE_LIMIT_MAX_WAIT_S",),
    ("alerts", "webhook_url"): ("THRIFTGATE_ALERT_WEBHOOK",),
    ("alerts", "spend_usd_per_day"): ("THRIFTGATE_ALERT_SPEND_USD_PER_DAY",),
    ("microbatch", "embeddings"): ("THRIFTGATE_EMBEDDINGS_MICROBATCH",),
    ("microbatch", "window_ms"): ("THRIFTGATE_MICROBATCH_WINDOW_MS",),
    ("batch", "base_url"): ("THRIFTGATE_BATCH_BASE_URL", "OPENAI_BASE_URL"),
    ("batch", "api_key"): ("OPENAI_API_KEY",),
}

# command-line flag name -> (section, key)
FLAGS: dict[str, tuple[str, str]] = {
    "host": ("server", "host"),
    "port": ("server", "port"),
    "workers": ("server", "workers"),
    "upstream": ("upstream", "url"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Convert a TOML or environment value to the field's type, or raise ConfigError."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required")
    if typing.get_origin(annotation) is Literal:  # one of a few words
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return value
    if typing.get_origin(annotation) is tuple:  # a list of strings: TOML array or "a,b,c"
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ConfigError(f"{where}: {value!r} is not a list of strings")
        return tuple(i.strip() for i in items if i.strip())
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is str:
            if not isinstance(value, str | int | float):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a valid {annotation.__name__}") from None
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")


@dataclass(frozen=True, slots=True)
class SentinelURL:
    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    tls: bool


def sentinel_parts(url: str) -> SentinelURL:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``: the sentinels,
    the service (the primary's name in the sentinels' config), the database, the primary's
    credentials; ``rediss+sentinel`` for TLS."""
    scheme, _, rest = url.partition("://")
    userinfo, at, hosts_path = rest.rpartition("@")
    if not at:
        userinfo, hosts_path = "", rest
    hosts, _, path = hosts_path.partition("/")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host:
            host, port = item.strip(), "26379"
        if not host or not port.isdigit():
            raise ValueError(f"{item!r} is not a sentinel host:port")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("the service name is missing (redis+sentinel://host:26379/mymaster)")
    db = parts[1] if len(parts) > 1 else "0"
    if not db.isdigit():
        raise ValueError(f"{db!r} is not a database number")
    user, _, password = userinfo.partition(":")
    return SentinelURL(
        tuple(sentinels),
        parts[0],
        int(db),
        unquote(user) or None,
        unquote(password) or None,
        scheme.startswith("rediss"),
    )


def _redis_url_from_parts(env: Mapping[str, str]) -> str | None:
    host = env.get("REDIS_HOST")
    if not host:
        return None
    port = env.get("REDIS_PORT") or "6379"
    db = env.get("REDIS_DB") or "0"
    return f"redis://{host}:{port}/{db}"


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path!r} cannot be read: {exc}") from None
    for section, values in data.items():
        if section == "upstreams":
            if not isinstance(values, list) or not all(isinstance(v, dict) for v in values):
                raise ConfigError(f"{path}: upstreams must be an array of tables ([[upstreams]])")
            continue
        if section in _TABLES:
            if not isinstance(values, dict) or not all(
                isinstance(v, dict) for v in values.values()
            ):
                raise ConfigError(f'{path}: {section} must be tables ([{section}."name"])')
            continue
        if section not in _SECTIONS:
            known = ", ".join(sorted(_SECTIONS))
            raise ConfigError(f"{path}: unknown section [{section}] (known: {known})")
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] must be a table")
        allowed = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        for key in values:
            if key not in allowed:
                raise ConfigError(
                    f"{path}: unknown setting {section}.{key} (known: {', '.join(sorted(allowed))})"
                )
    return data


def _table(
    where: str,
    cls: type,
    fixed: dict[str, Any],
    table: dict[str, Any],
    *,
    required: tuple[str, ...] = (),
    nonnegative: bool = True,
) -> Any:
    """One table as a ``cls``: unknown keys refused, ``required`` ones demanded, values coerced
    to the field types (and numbers refused below zero unless ``nonnegative`` is off)."""
    hints = _field_types(cls)
    allowed = set(hints) - set(fixed)
    unknown = set(table) - allowed
    if unknown:
        known = ", ".join(sorted(allowed))
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]} (known: {known})")
    for key in required:
        if key not in table:
            raise ConfigError(f"{where}: {key} is required")
    values = {k: _coerce(f"{where}.{k}", v, hints[k]) for k, v in table.items()}
    for key, value in values.items():
        if nonnegative and isinstance(value, int | float) and value < 0:
            raise ConfigError(f"{where}.{key}: must not be negative")
    made = cls(**fixed, **values)
    for key, problem in _problems(made):
        raise ConfigError(f"{where}.{key}: {problem}")
    return made


def _problems(values: Any) -> Iterator[tuple[str, str]]:
    """What each field's own rules (its ``Annotated`` checks) find wrong with ``values``."""
    for name, hint in typing.get_type_hints(type(values), include_extras=True).items():
        value = getattr(values, name)
        for check in getattr(hint, "__metadata__", ()):
            problem = check(value) if value is not None else None
            if problem:
                yield name, problem


def parse_models(where: str, tables: dict[str, Any]) -> tuple[ModelInfo, ...]:
    """``{"name": {"context_window": N, "max_output_tokens": M}}`` → ModelInfo entries."""
    out = []
    for name, table in tables.items():
        info = _table(
            f"{where}: models.{name}",
            ModelInfo,
            {"name": name},
            table,
            required=("context_window",),
            nonnegative=False,
        )
        out.append(info)
    return tuple(out)


_FINGERPRINT = frozenset("0123456789abcdef")


def parse_keys(where: str, tables: dict[str, Any]) -> tuple[KeyPolicy, ...]:
    """``[keys."alias"]`` tables; ``fingerprint`` defaults to the alias when that is one."""
    out = []
    for alias, table in tables.items():
        table = dict(table)
        fp = str(table.pop("fingerprint", alias)).lower()
        if len(fp) not in (12, 64) or not set(fp) <= _FINGERPRINT:
            raise ConfigError(
                f"{where}: keys.{alias}.fingerprint: {fp!r} is not a key fingerprint (12 hex "
                "digits, or the key's whole SHA-256 in 64; `thriftgate fingerprint [--full]` "
                "prints them)"
            )
        out.append(
            _table(f"{where}: keys.{alias}", KeyPolicy, {"alias": alias, "fingerprint": fp}, table)
        )
    fps = [k.fingerprint for k in out]
    if len(set(fps)) != len(fps):
        raise ConfigError(f"{where}: two [keys] tables name the same fingerprint")
    return tuple(out)


def parse_prices(where: str, tables: dict[str, Any]) -> tuple[Price, ...]:
    """``{"model": {"input": 2.5, "cached_input": 1.25, "output": 10}}`` (USD per 1M tokens);
    image models may add ``per_image = {"<quality> <size>" = usd}``."""
    out = []
    for name, table in tables.items():
        at = f"{where}: prices.{name}"
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: must be a table")
        table = dict(table)
        images = table.pop("per_image", {})
        if not isinstance(images, dict):
            raise ConfigError(f'{at}.per_image: must be a table of "<quality> <size>" = USD')
        per_image = []
        for label, usd in images.items():
            parts = label.split()
            if len(parts) != 2 or not re.fullmatch(r"\d+x\d+", parts[1]):
                raise ConfigError(f'{at}.per_image: {label!r} is not "<quality> <width>x<height>"')
            value = _coerce(f"{at}.per_image.{label}", usd, float)
            if value < 0:
                raise ConfigError(f"{at}.per_image.{label}: must not be negative")
            per_image.append((f"{parts[0]} {parts[1]}", value))
        if not table and not per_image:
            raise ConfigError(f"{at}: no price given (input, output, per_image, ...)")
        fixed = {"name": name, "per_image": tuple(per_image)}
        out.append(_table(at, Price, fixed, table))
    return tuple(out)


def _target(path: str, index: int, table: dict[str, Any]) -> UpstreamTarget:
    where = f"{path}: upstreams[{index}]"
    target: UpstreamTarget = _table(
        where, UpstreamTarget, {}, table, required=("url",), nonnegative=False
    )
    return dataclasses.replace(target, name=target.name or _name(target.url))


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Build the settings: defaults < TOML file < environment < flags.

    ``flags`` uses the command-line names (host, port, workers, upstream, log_format, log_level);
    ``None`` values are ignored. ``env`` defaults to the process environment.
    """
    env = os.environ if env is None else env
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    path = config_file or env.get("THRIFTGATE_CONFIG") or None
    raw: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    where: dict[tuple[str, str], str] = {}
    targets: tuple[UpstreamTarget, ...] = ()
    models: tuple[ModelInfo, ...] = ()
    keys: tuple[KeyPolicy, ...] = ()
    model_limits: tuple[ModelLimit, ...] = ()
    prices: tuple[Price, ...] = ()

    if path:
        data = _read_file(path)
        targets = tuple(_target(path, i, t) for i, t in enumerate(data.pop("upstreams", [])))
        models = parse_models(path, data.pop("models", {}))
        keys = parse_keys(path, data.pop("keys", {}))
        model_limits = tuple(
            _table(f"{path}: model_limits.{p}", ModelLimit, {"pattern": p}, t)
            for p, t in data.pop("model_limits", {}).items()
        )
        prices = parse_prices(path, data.pop("prices", {}))
        for section, values in data.items():
            for key, value in values.items():
                raw[section][key] = value
                where[(section, key)] = f"{path}: {section}.{key}"

    redis_parts = _redis_url_from_parts(env)
    if redis_parts:
        raw["redis"]["url"] = redis_parts
        where[("redis", "url")] = "REDIS_HOST/REDIS_PORT/REDIS_DB"
    for (section, key), names in ENV_VARS.items():
        for name in names:
            if name in env:
                raw[section][key] = env[name]
                where[(section, key)] = f"environment variable {name}"
                break

    for flag, value in flags.items():
        section, key = FLAGS[flag]
        raw[section][key] = value
        where[(section, key)] = f"--{flag}"

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        hints = _field_types(cls)
        values = {
            key: _coerce(where.get((name, key), f"{name}.{key}"), value, hints[key])
            for key, value in raw[name].items()
        }
        sections[name] = cls(**values)
    settings = Settings(
        **sections,
        keys=keys,
        model_limits=model_limits,
        prices=prices,
        upstreams=targets,
        models=models,
        config_file=path,
    )
    _validate(settings, where)
    return settings


def _validate(s: Settings, where: Mapping[tuple[str, str], str]) -> None:
    def fail(section: str, key: str, why: str) -> None:
        raise ConfigError(f"{where.get((section, key), f'{section}.{key}')}: {why}")

    for section in _SECTIONS:  # each field's own rules (``Annotated``)
        for name, problem in _problems(getattr(s, section)):
            fail(section, name, problem)
    # the rules that involve more than one setting
    names = [t.name for t in s.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError(f"{s.config_file}: upstreams need distinct names: {names}")
    if s.redis.mode == "sentinel" and s.redis.url and "+sentinel://" not in s.redis.url:
        fail("redis", "mode", "sentinel needs a redis+sentinel:// URL")
    if s.cache.backend == "redis" and s.redis.url is None:
        fail("cache", "backend", "redis needs a Redis URL (REDIS_URL or redis.url)")
    if s.usage.redis_stream and s.redis.url is None:
        fail("usage", "redis_stream", "needs a Redis URL (REDIS_URL or redis.url)")
