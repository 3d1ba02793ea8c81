"""keel's settings registry: every setting declared once, one precedence rule.

Precedence: explicit override (CLI flag) > environment variable > YAML config file > default.
Each :class:`Setting` names its environment variable, its config-file key, its type,
its default and what it means; ``keel serve --help`` and docs/configuration.md are
generated from / checked against this table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from keel.errors import ConfigError

__all__ = [
    "ENCRYPTED_PREFIX",
    "SETTINGS",
    "STRATEGIES",
    "CacheConfig",
    "CooldownConfig",
    "FallbackConfig",
    "GuardrailPolicy",
    "GuardrailRail",
    "GuardrailsConfig",
    "ModelConfig",
    "RetryConfig",
    "RouteRule",
    "RoutingConfig",
    "Setting",
    "Settings",
    "encrypt_secret",
    "generate_secret_key",
    "load_settings",
    "read_secret_key",
    "resolve_secret",
]


@dataclass(frozen=True)
class Setting:
    """One documented setting."""

    name: str
    type: type
    default: Any
    doc: str

    @property
    def env(self) -> str:
        return "KEEL_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting("config", str, None, "Path of the YAML config file (default: ./keel.yaml if present)."),
    Setting(
        "database_url",
        str,
        "sqlite:///.keel/keel.db",
        "`sqlite:///path` or `postgresql://user@host:port/db`.",
    ),
    Setting(
        "redis_url",
        str,
        None,
        "When set, key caches, limits, budgets, caches and cooldowns are shared across replicas.",
    ),
    Setting(
        "redis_prefix",
        str,
        "keel:",
        "Prefix of every Redis key and channel keel uses (several deployments may share one Redis).",
    ),
    Setting(
        "master_key",
        str,
        None,
        "Admin bearer key. When unset, generated into <data_dir>/master_key (mode 0600).",
    ),
    Setting(
        "data_dir",
        str,
        ".keel",
        "Directory for the SQLite database, the generated master key and local state.",
    ),
    Setting(
        "secret_key",
        str,
        None,
        "Key that decrypts `enc:` provider API keys in the config (default: <data_dir>/secret_key; `keel secrets key`).",
    ),
    Setting("host", str, "127.0.0.1", "Address `keel serve` binds."),
    Setting("port", int, 4000, "Port `keel serve` listens on."),
    Setting("workers", int, 1, "Number of server processes."),
    Setting("log_level", str, "info", "Log level: debug, info, warning, error."),
    Setting(
        "max_request_bytes", int, 20 * 1024 * 1024, "Largest accepted request body; larger bodies get 413."
    ),
    Setting(
        "trace_queue_size",
        int,
        100_000,
        "Capacity of the in-memory trace queue; when full, records are dropped and counted.",
    ),
    Setting("trace_batch_size", int, 5000, "Most records the trace writer inserts in one transaction."),
    Setting(
        "trace_flush_interval_s",
        float,
        0.25,
        "Longest a record waits in the queue before the writer flushes.",
    ),
    Setting("store_bodies", bool, True, "Store request and response bodies on spans."),
    Setting(
        "trace_redact_pii",
        bool,
        False,
        "Store span bodies with personal data and secrets masked ([EMAIL], [CARD], ...; guardrails' regex tier).",
    ),
    Setting(
        "trace_writer",
        str,
        "process",
        "`process`: spans are written by a child process, off the serving process (lower tail latency); `thread`: in a thread of the server.",
    ),
    Setting(
        "key_refresh_s",
        float,
        5.0,
        "Interval of the background key-cache refresh (a safety net beside pub/sub).",
    ),
    Setting("upstream_timeout_s", float, 600.0, "Default total timeout of one upstream call."),
    Setting("upstream_connect_timeout_s", float, 10.0, "Default connect timeout of one upstream call."),
    Setting("retention_days", float, 0.0, "Delete traces older than this many days (0 keeps them forever)."),
    Setting(
        "retention_interval_s",
        float,
        3600.0,
        "Interval of the background retention sweep (global and per-project retention).",
    ),
    Setting(
        "rollup_minute_days",
        float,
        14.0,
        "Days of per-minute dashboard rollups kept by the retention sweep; older ranges read hour rows (0 keeps them forever).",
    ),
    Setting(
        "feedback_rpm",
        int,
        60,
        "End-user feedback posts allowed per key per rate-limit window (0: unlimited).",
    ),
    Setting(
        "feedback_cors_origins",
        str,
        "*",
        "Comma-separated origins allowed to post end-user feedback from a browser (`*`: any).",
    ),
    Setting(
        "alert_webhook_url", str, None, "URL that receives a JSON POST when a soft budget limit is crossed."
    ),
    Setting(
        "online_eval_interval_s",
        float,
        5.0,
        "Interval of the background online-evaluation pass over new traces (0 turns it off).",
    ),
    Setting("online_eval_batch_size", int, 200, "Most new LLM spans one online rule reads per pass."),
    Setting("online_eval_concurrency", int, 4, "Traces the online evaluator scores at once."),
)

_BY_NAME = {s.name: s for s in SETTINGS}
_MODEL_KEYS = {"models", "routing", "cache", "guardrails"}


ENCRYPTED_PREFIX = "enc:"


def generate_secret_key() -> str:
    """A new key for encrypting provider secrets at rest (Fernet: AES-128-CBC + HMAC-SHA256)."""
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode("ascii")


def encrypt_secret(plain: str, secret_key: str) -> str:
    """``enc:<token>``: what to put in the config file instead of a provider API key."""
    from cryptography.fernet import Fernet

    return ENCRYPTED_PREFIX + Fernet(secret_key.encode("ascii")).encrypt(plain.encode("utf-8")).decode(
        "ascii"
    )


def read_secret_key(secret_key: str | None, data_dir: str | os.PathLike[str]) -> str | None:
    """The configured secret key, else the one in ``<data_dir>/secret_key``, else None."""
    if secret_key:
        return secret_key.strip()
    path = Path(data_dir) / "secret_key"
    return path.read_text().strip() if path.is_file() else None


def resolve_secret(
    value: str | None, key: str, env: Mapping[str, str] | None = None, secret_key: str | None = None
) -> str | None:
    """Resolve ``os.environ/NAME`` references and decrypt ``enc:`` values; literals pass through.

    Errors name the config key and never include the secret.
    """
    if value is None:
        return value
    if value.startswith("os.environ/"):
        name = value.removeprefix("os.environ/")
        resolved = (os.environ if env is None else env).get(name)
        if resolved is None:
            raise ConfigError(key, f"environment variable {name} is not set")
        value = resolved
    if not value.startswith(ENCRYPTED_PREFIX):
        return value
    if not secret_key:
        raise ConfigError(
            key, "is encrypted (enc:) but no secret key is set (KEEL_SECRET_KEY or <data_dir>/secret_key)"
        )
    from cryptography.fernet import Fernet, InvalidToken

    try:
        return (
            Fernet(secret_key.encode("ascii")).decrypt(value.removeprefix(ENCRYPTED_PREFIX).encode()).decode()
        )
    except (InvalidToken, ValueError):
        raise ConfigError(key, "cannot be decrypted with this secret key (KEEL_SECRET_KEY)") from None


class ModelConfig(BaseModel):
    """One deployment of a public model name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="What clients send as `model`.")
    provider: str = Field(
        min_length=1, description="openai | anthropic | openai-compatible | local | plugin name"
    )
    model: str | None = Field(default=None, description="Upstream model id (defaults to name).")
    api_base: str | None = None
    api_key: str | None = Field(default=None, repr=False)  # never in a repr, a log line or an error
    weight: float = Field(default=1.0, gt=0)
    priority: int = 1
    timeout_s: float | None = Field(default=None, gt=0)
    connect_timeout_s: float | None = Field(default=None, gt=0)
    read_timeout_s: float | None = Field(
        default=None, gt=0, description="Longest wait for the next bytes of a response."
    )
    max_retries: int = Field(
        default=1, ge=0, le=10, description="Retries on this deployment (429, 5xx, timeouts, resets)."
    )
    stream_timeout_s: float | None = Field(
        default=None, gt=0, description="Longest silence between stream chunks."
    )
    max_input_tokens: int | None = Field(
        default=None, gt=0, description="Context window; longer prompts go to context fallbacks."
    )
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    input_cost_per_mtok: float | None = Field(default=None, ge=0)
    output_cost_per_mtok: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(
        default=None, gt=0, description="Default max_tokens (Anthropic requires one)."
    )
    extra: dict[str, Any] = Field(default_factory=dict, description="Provider-specific options.")

    @field_validator("api_base")
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/") if v else v

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


STRATEGIES = ("weighted", "lowest-latency", "least-busy", "lowest-cost", "priority")


class CooldownConfig(BaseModel):
    """Circuit breaker: `allowed_fails` failures within `window_s` take a deployment out for `cooldown_s`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_fails: int = Field(default=3, ge=1)
    window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)


class RetryConfig(BaseModel):
    """Backoff between retries: exponential from `backoff_base_s`, capped, with full jitter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backoff_base_s: float = Field(default=0.1, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)
    max_retry_after_s: float = Field(
        default=30.0, ge=0, description="Longest upstream retry-after keel waits out."
    )


class RouteRule(BaseModel):
    """Send a request to another (typically cheaper) model when every condition given matches.

    Rules are tried in order and the first match wins; a rule with no conditions matches every
    request for its ``models``. The rule that matched is recorded on the trace.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100)
    route_to: str = Field(min_length=1, description="Model name the matching requests are served by.")
    models: list[str] = Field(
        default_factory=list, description="Requested model names the rule applies to (empty: all)."
    )
    max_prompt_tokens: int | None = Field(default=None, ge=0, description="Prompt estimate at most this.")
    min_prompt_tokens: int | None = Field(default=None, ge=0, description="Prompt estimate at least this.")
    tags_any: list[str] = Field(default_factory=list, description="Any of these request tags (x-keel-tags).")
    headers: dict[str, str] = Field(
        default_factory=dict, description='Request header -> value (case-insensitive name; "*": any value).'
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, description="x-keel-metadata key -> value, all of which must match."
    )
    no_tools: bool = Field(default=False, description="Only requests that offer no tools.")

    @field_validator("headers")
    @classmethod
    def _lower_headers(cls, v: dict[str, str]) -> dict[str, str]:
        return {k.lower(): val for k, val in v.items()}


class RoutingConfig(BaseModel):
    """How requests for a public model name are routed, retried and failed over."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    context_window_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    content_policy_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    strategy: str = Field(default="weighted", description="Default strategy for every name.")
    strategies: dict[str, str] = Field(default_factory=dict, description="Strategy per public name.")
    aliases: dict[str, str] = Field(default_factory=dict, description="alias -> public name")
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    rules: list[RouteRule] = Field(
        default_factory=list, description="Cost-aware routing: first matching rule re-targets a request."
    )

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r} (known: {', '.join(STRATEGIES)})")
        return v

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, v: dict[str, str]) -> dict[str, str]:
        for name, strat in v.items():
            if strat not in STRATEGIES:
                raise ValueError(f"{name}: unknown strategy {strat!r} (known: {', '.join(STRATEGIES)})")
        return v


FallbackConfig = RoutingConfig  # the name the first release used


class CacheConfig(BaseModel):
    """Response caching (off by default): exact (normalised request hash) and semantic (MiniLM)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    ttl_s: float = Field(default=3600.0, gt=0)
    semantic: bool = Field(default=False, description="Also match paraphrases of the last user turn.")
    semantic_threshold: float = Field(default=0.92, gt=0, le=1)
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="Semantic threshold per model name."
    )
    models: list[str] | None = Field(
        default=None, description="Only these model names are cached (default: all)."
    )
    cache_tool_calls: bool = Field(default=False, description="Cache tool-calling turns too.")


GUARDRAIL_ACTIONS = ("allow", "flag", "mask", "block", "pseudonymize")


class GuardrailRail(BaseModel):
    """One rail of a guardrail policy: what to look for and what to do when it is found."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rail: str = Field(min_length=1, description="pii, secrets, injection, json, banned, max_length...")
    action: str = Field(default="block", description="allow, flag, mask, block, pseudonymize (input)")
    name: str | None = Field(default=None, description="Shown in errors and traces (default: the rail).")
    roles: list[str] | None = Field(default=None, description="Message roles read on input (None: all).")
    options: dict[str, Any] = Field(default_factory=dict, description="The rail's own options.")

    @field_validator("action")
    @classmethod
    def _known_action(cls, v: str) -> str:
        if v not in GUARDRAIL_ACTIONS:
            raise ValueError(f"unknown action {v!r} (known: {', '.join(GUARDRAIL_ACTIONS)})")
        return v


class GuardrailPolicy(BaseModel):
    """Rails for the requests of some projects, keys and models (empty lists match all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    projects: list[str] = Field(default_factory=list, description="Project ids (proj_...).")
    keys: list[str] = Field(default_factory=list, description="Key ids (key_...) or key names.")
    models: list[str] = Field(default_factory=list, description="Requested model names.")
    input: list[GuardrailRail] = Field(default_factory=list, description="Rails before the provider.")
    output: list[GuardrailRail] = Field(default_factory=list, description="Rails on the answer.")


class GuardrailsConfig(BaseModel):
    """Guardrails: every policy that matches a request applies, in order (off when none is given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    policies: list[GuardrailPolicy] = Field(default_factory=list)


class _FileShape(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(default_factory=list)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    guardrails: GuardrailsConfig = Field(default_factory=GuardrailsConfig)


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with :func:`load_settings`; immutable."""

    config: str | None = None
    database_url: str = "sqlite:///.keel/keel.db"
    redis_url: str | None = None
    redis_prefix: str = "keel:"
    master_key: str | None = field(default=None, repr=False)
    data_dir: str = ".keel"
    secret_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 4000
    workers: int = 1
    log_level: str = "info"
    max_request_bytes: int = 20 * 1024 * 1024
    trace_queue_size: int = 100_000
    trace_batch_size: int = 5000
    trace_flush_interval_s: float = 0.25
    store_bodies: bool = True
    trace_redact_pii: bool = False
    trace_writer: str = "process"
    key_refresh_s: float = 5.0
    upstream_timeout_s: float = 600.0
    upstream_connect_timeout_s: float = 10.0
    retention_days: float = 0.0
    retention_interval_s: float = 3600.0
    rollup_minute_days: float = 14.0
    feedback_rpm: int = 60
    feedback_cors_origins: str = "*"
    alert_webhook_url: str | None = None
    online_eval_interval_s: float = 5.0
    online_eval_batch_size: int = 200
    online_eval_concurrency: int = 4
    rate_limit_window_s: float = 60.0
    models: tuple[ModelConfig, ...] = field(default_factory=tuple)
    fallbacks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig)

    def with_overrides(self, **kw: Any) -> Settings:
        return replace(self, **kw)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


def _coerce(setting: Setting, raw: Any, source: str) -> Any:
    key = f"{source}{setting.name}" if source != "env " else setting.env
    if raw is None:
        return None
    try:
        if setting.type is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(f"expected a boolean, got {raw!r}")
        if setting.type is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(raw)
        if setting.type is float:
            return float(raw)
        if not isinstance(raw, str | int | float):
            raise ValueError(f"expected a string, got {type(raw).__name__}")
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            key, str(exc) if "expected" in str(exc) else f"expected {setting.type.__name__}, got {raw!r}"
        ) from None


def _format_validation_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    parts: list[str] = []
    for loc in err["loc"]:
        if isinstance(loc, int):
            parts[-1] = f"{parts[-1]}[{loc}]" if parts else f"[{loc}]"
        else:
            parts.append(str(loc))
    key = ".".join(parts) or "<root>"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return ConfigError(key, msg)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("config", f"{path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must contain a mapping at the top level")
    return data


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings: overrides > environment > config file > defaults.

    Raises :class:`ConfigError` naming the offending key on any invalid value.
    """
    env = os.environ if env is None else env
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    path_value = overrides.get("config") or env.get("KEEL_CONFIG") or config_path
    if path_value is None and Path("keel.yaml").exists():
        path_value = "keel.yaml"
    file_data: dict[str, Any] = _read_file(Path(path_value)) if path_value else {}

    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.name in overrides:
            values[s.name] = _coerce(s, overrides[s.name], "--")
        elif s.env in env:
            values[s.name] = _coerce(s, env[s.env], "env ")
        elif s.name in file_data:
            values[s.name] = _coerce(s, file_data[s.name], "")
        else:
            values[s.name] = s.default
    values["config"] = str(path_value) if path_value else None

    unknown = set(file_data) - set(_BY_NAME) - _MODEL_KEYS
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown key")
    try:
        shape = _FileShape.model_validate({k: file_data[k] for k in _MODEL_KEYS if k in file_data})
    except ValidationError as exc:
        raise _format_validation_error(exc) from None

    models = []
    seen: set[tuple[str, str, str | None]] = set()
    secret_key = read_secret_key(values["secret_key"], values["data_dir"])
    for i, m in enumerate(shape.models):
        api_key = resolve_secret(m.api_key, f"models[{i}].api_key", env, secret_key)
        ident = (m.name, m.upstream_model, m.api_base)
        if ident in seen:
            raise ConfigError(f"models[{i}]", f"duplicate deployment of {m.name!r}")
        seen.add(ident)
        models.append(m.model_copy(update={"api_key": api_key}))
    names = {m.name for m in models}
    routing = shape.routing
    for alias, target in routing.aliases.items():
        if target not in names:
            raise ConfigError(f"routing.aliases.{alias}", f"unknown model {target!r}")
        if alias in names:
            raise ConfigError(f"routing.aliases.{alias}", "an alias may not shadow a configured model name")
    for section in ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks"):
        for name, targets in getattr(routing, section).items():
            for t in targets:
                if t not in names:
                    raise ConfigError(f"routing.{section}.{name}", f"unknown model {t!r}")
    for name in routing.strategies:
        if name not in names:
            raise ConfigError(f"routing.strategies.{name}", "unknown model")
    for i, rule in enumerate(routing.rules):
        if rule.route_to not in names:
            raise ConfigError(f"routing.rules[{i}].route_to", f"unknown model {rule.route_to!r}")
        for requested in rule.models:
            if requested not in names and requested not in routing.aliases:
                raise ConfigError(f"routing.rules[{i}].models", f"unknown model {requested!r}")
    fallbacks = {name: tuple(targets) for name, targets in routing.fallbacks.items()}

    for s in SETTINGS:
        v = values[s.name]
        if s.type in (int, float) and v is not None and v < 0:
            raise ConfigError(s.name, "must not be negative")
    if values["port"] > 65535:
        raise ConfigError("port", "must be at most 65535")
    if values["trace_writer"] not in ("process", "thread"):
        raise ConfigError("trace_writer", "must be process or thread")
    if values["workers"] < 1:
        raise ConfigError("workers", "must be at least 1")
    db = values["database_url"]
    if not db.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:", "postgres:")):
        raise ConfigError("database_url", "must start with sqlite:/// or postgresql://")

    known = {f.name for f in fields(Settings)}
    return Settings(
        **{k: v for k, v in values.items() if k in known},
        models=tuple(models),
        fallbacks=fallbacks,
        routing=routing,
        cache=shape.cache,
        guardrails=shape.guardrails,
    )
