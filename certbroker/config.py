"""Broker configuration: one frozen dataclass, loaded once from a TOML file plus environment.

With no file, every default describes the embedded setup: SQLite audit log, in-process demo
adapters, the shipped policies, the development identity provider of the state directory.
``[audit] dsn`` moves the audit log to PostgreSQL (one log shared by several brokers).
Environment variables override the file; command-line flags override both (via ``overrides``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from certbroker.contract.fields import RECORD_TYPES

#: Upper bound of the audit batching window: a response is never held longer for company.
MAX_WAIT_S = 0.05

DEFAULT_SCHEMA = "certbroker"
#: A PostgreSQL schema name we create and embed in DDL: lowercase, no quoting games.
SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")


@dataclass(frozen=True)
class PostgresLocation:
    """An audit log in PostgreSQL: libpq connection string (or URL) and schema.

    The DSN may hold a password, so it never appears in ``repr`` or messages: use
    :attr:`display`.
    """

    dsn: str = field(repr=False)
    schema: str = DEFAULT_SCHEMA

    def __post_init__(self) -> None:
        if not self.dsn:
            raise ValueError("PostgreSQL audit DSN is empty")
        if not SCHEMA_RE.fullmatch(self.schema):
            raise ValueError(
                f"audit schema {self.schema!r}: lowercase letters, digits and _ only (max 63)"
            )

    @property
    def display(self) -> str:
        """Host, database and schema, without user or password (safe for logs)."""
        host, dbname = "?", "?"
        try:
            from psycopg.conninfo import conninfo_to_dict

            info = conninfo_to_dict(self.dsn)
            host, dbname = str(info.get("host", "localhost")), str(info.get("dbname", "?"))
        except Exception:  # noqa: BLE001, S110 - a DSN we cannot parse is still not printed
            pass
        return f"postgresql://{host}/{dbname} schema {self.schema}"

    def __str__(self) -> str:
        return self.display


AuditLocation = Path | PostgresLocation
"""Where an audit log is: an SQLite file path or a PostgreSQL DSN + schema."""


#: The shipped policy set, next to the package in a source checkout or an image built from it.
#: The shipped policy set: package data, so an installed wheel finds it as a checkout does.
DEFAULT_POLICY_DIR = Path(str(resources.files("certbroker") / "policies"))


#: Upper bound of ``[server] workers``: each worker holds its own connections and caches.
MAX_WORKERS = 64


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message says where."""


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted token issuer: its public keys as PEM files and/or a JWKS file."""

    issuer: str
    audience: str
    public_keys: tuple[Path, ...] = ()
    jwks: Path | None = None
    max_token_lifetime_s: float = 12 * 3600.0  # longest exp - iat accepted from this issuer


#: Route modes: the in-process demo adapter, one fixed gRPC endpoint, or the instances that
#: departments registered with the Registry.
ROUTE_MODES = ("inprocess", "grpc", "registry")


@dataclass(frozen=True)
class AdapterRoute:
    """Where one record type is fetched: in process, a gRPC endpoint, or registered instances."""

    mode: str = "inprocess"  # one of ROUTE_MODES
    endpoint: str = ""  # mode "grpc" only


@dataclass(frozen=True)
class ArchiveSchedule:
    """When the broker archives on its own (``[audit] archive_after_days`` > 0): entries older
    than ``after_days`` move to export files in ``directory``, checked every ``every_s``."""

    after_days: float
    directory: Path
    every_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    state_dir: Path = Path(".certbroker")
    policy_dir: Path = DEFAULT_POLICY_DIR
    audit_path: Path | None = None  # default: <state_dir>/audit.sqlite
    # PostgreSQL audit store instead of the SQLite file (libpq DSN/URL; it may hold a password,
    # hence no repr) and the schema its tables live in.
    audit_dsn: str = field(default="", repr=False)
    audit_schema: str = "certbroker"
    archive_after_days: float = 0.0  # move entries older than this to archive files; 0 = off
    archive_dir: Path | None = None  # default: <state_dir>/audit-archive
    archive_interval_s: float = 3600.0  # how often the broker looks for entries to archive
    # Checkpoint signing key (PKCS#8 PEM, created if missing, public key <name>.pub.pem
    # beside it); default <state_dir>/checkpoint-key/signing-key.pem + public-key.pem.
    checkpoint_key: Path | None = None
    checkpoint_interval_s: float = 60.0  # sign a checkpoint this often (when the log grew)
    # Group commit: at most this many entries per transaction; a batch takes what queued during
    # the previous commit, and is held open up to audit_batch_wait_ms more (0 = never held).
    audit_max_batch: int = 256
    audit_batch_wait_ms: float = 0.0
    dataset_dir: Path | None = None  # default: <state_dir>/datasets
    leeway_s: int = 30
    dev_idp: bool = True  # trust tokens printed by `certbroker token issue` for this state dir
    issuers: tuple[IssuerConfig, ...] = ()
    adapters: Mapping[str, AdapterRoute] = field(
        default_factory=lambda: {rt: AdapterRoute() for rt in RECORD_TYPES}
    )
    adapter_timeout_s: float = 5.0
    # Broker -> adapter TLS: on when tls_ca is set; mutual when tls_cert and tls_key are too.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    lease_s: int = 15  # a registered instance leaves routing this long after its last heartbeat
    breaker_failures: int = 5  # consecutive failures that open a department's circuit breaker
    breaker_reset_s: float = 10.0  # open -> half-open (one probe call) after this
    # Off only to measure what the metrics cost (the benchmark); /metrics is then empty.
    metrics_enabled: bool = True
    # Worker processes sharing the gRPC port (SO_REUSEPORT; certbroker.server.workers); 1 = one
    # process.
    workers: int = 1
    # Verified-token cache: a token is re-verified after this long at the latest (0 = no cache).
    token_cache_max_age_s: float = 300.0
    token_cache_max_entries: int = 10_000
    dev_idp_max_token_lifetime_s: float = 12 * 3600.0  # the dev IdP's cap on exp - iat
    # Calls refused before a caller is known (no/bad token, undecodable request): each peer
    # (IP address; IPv6 /64) gets this many per second, bursts up to unauthenticated_burst,
    # then RESOURCE_EXHAUSTED; they are audited as one summary entry per peer per interval.
    unauthenticated_rate_per_s: float = 5.0
    unauthenticated_burst: int = 20
    unauthenticated_summary_interval_s: float = 10.0
    # Record cache bounds (each record type's TTL comes from policies/catalogue.yaml).
    record_cache_max_entries: int = 10_000
    record_cache_max_bytes: int = 64 * 1024 * 1024

    @property
    def audit_file(self) -> Path:
        return self.audit_path or self.state_dir / "audit.sqlite"

    @property
    def audit_location(self) -> AuditLocation:
        """Where the audit log is: PostgreSQL when ``audit_dsn`` is set, else the SQLite file."""
        if self.audit_dsn:
            return PostgresLocation(self.audit_dsn, self.audit_schema)
        return self.audit_file

    @property
    def archive_directory(self) -> Path:
        return self.archive_dir or self.state_dir / "audit-archive"

    @property
    def archive(self) -> ArchiveSchedule | None:
        """The broker's archival schedule, or None when archival is off."""
        if self.archive_after_days <= 0:
            return None
        return ArchiveSchedule(
            self.archive_after_days, self.archive_directory, self.archive_interval_s
        )

    @property
    def datasets(self) -> Path:
        return self.dataset_dir or self.state_dir / "datasets"


_ENV: Mapping[str, tuple[str, type]] = {
    "CERTBROKER_HOST": ("host", str),
    "CERTBROKER_PORT": ("port", int),
    "CERTBROKER_METRICS_PORT": ("metrics_port", int),
    "CERTBROKER_STATE_DIR": ("state_dir", Path),
    "CERTBROKER_POLICY_DIR": ("policy_dir", Path),
    "CERTBROKER_AUDIT_PATH": ("audit_path", Path),
    "CERTBROKER_AUDIT_DSN": ("audit_dsn", str),
    "CERTBROKER_AUDIT_SCHEMA": ("audit_schema", str),
    "CERTBROKER_AUDIT_ARCHIVE_AFTER_DAYS": ("archive_after_days", float),
    "CERTBROKER_AUDIT_ARCHIVE_DIR": ("archive_dir", Path),
    "CERTBROKER_DATASET_DIR": ("dataset_dir", Path),
    "CERTBROKER_DEV_IDP": ("dev_idp", bool),
    "CERTBROKER_ADAPTER_TIMEOUT_S": ("adapter_timeout_s", float),
    "CERTBROKER_TLS_CA": ("tls_ca", Path),
    "CERTBROKER_TLS_CERT": ("tls_cert", Path),
    "CERTBROKER_TLS_KEY": ("tls_key", Path),
    "CERTBROKER_LEASE_S": ("lease_s", int),
    "CERTBROKER_BREAKER_FAILURES": ("breaker_failures", int),
    "CERTBROKER_BREAKER_RESET_S": ("breaker_reset_s", float),
    "CERTBROKER_METRICS_ENABLED": ("metrics_enabled", bool),
    "CERTBROKER_WORKERS": ("workers", int),
    "CERTBROKER_AUDIT_BATCH_WAIT_MS": ("audit_batch_wait_ms", float),
    "CERTBROKER_TOKEN_CACHE_MAX_AGE_S": ("token_cache_max_age_s", float),
    "CERTBROKER_UNAUTHENTICATED_RATE_PER_S": ("unauthenticated_rate_per_s", float),
    "CERTBROKER_RECORD_CACHE_MAX_ENTRIES": ("record_cache_max_entries", int),
    "CERTBROKER_RECORD_CACHE_MAX_BYTES": ("record_cache_max_bytes", int),
}
_SECTIONS: Mapping[str, Mapping[str, tuple[str, type]]] = {
    "server": {
        "host": ("host", str),
        "port": ("port", int),
        "metrics_port": ("metrics_port", int),
        "state_dir": ("state_dir", Path),
        "metrics_enabled": ("metrics_enabled", bool),
        "workers": ("workers", int),
    },
    "policy": {"dir": ("policy_dir", Path)},
    "audit": {
        "path": ("audit_path", Path),
        "dsn": ("audit_dsn", str),
        "schema": ("audit_schema", str),
        "archive_after_days": ("archive_after_days", float),
        "archive_dir": ("archive_dir", Path),
        "archive_interval_s": ("archive_interval_s", float),
        "checkpoint_key": ("checkpoint_key", Path),
        "checkpoint_interval_s": ("checkpoint_interval_s", float),
        "max_batch": ("audit_max_batch", int),
        "batch_wait_ms": ("audit_batch_wait_ms", float),
        "unauthenticated_summary_interval_s": ("unauthenticated_summary_interval_s", float),
    },
    "datasets": {"dir": ("dataset_dir", Path)},
    "auth": {
        "leeway_s": ("leeway_s", int),
        "dev_idp": ("dev_idp", bool),
        "token_cache_max_age_s": ("token_cache_max_age_s", float),
        "token_cache_max_entries": ("token_cache_max_entries", int),
        "dev_idp_max_token_lifetime_s": ("dev_idp_max_token_lifetime_s", float),
        "unauthenticated_rate_per_s": ("unauthenticated_rate_per_s", float),
        "unauthenticated_burst": ("unauthenticated_burst", int),
    },
    "cache": {
        "max_entries": ("record_cache_max_entries", int),
        "max_bytes": ("record_cache_max_bytes", int),
    },
    "routing": {
        "timeout_s": ("adapter_timeout_s", float),
        "tls_ca": ("tls_ca", Path),
        "tls_cert": ("tls_cert", Path),
        "tls_key": ("tls_key", Path),
        "lease_s": ("lease_s", int),
        "breaker_failures": ("breaker_failures", int),
        "breaker_reset_s": ("breaker_reset_s", float),
    },
}


def _convert(where: str, value: Any, kind: type, base: Path) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"1", "true", "yes", "0", "false", "no"}:
            return value.lower() in {"1", "true", "yes"}
    elif kind is Path and isinstance(value, str) and value:
        path = Path(value)
        return path if path.is_absolute() else base / path
    elif kind is int and not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    elif kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _route(where: str, value: Any) -> AdapterRoute:
    if isinstance(value, str):  # "inprocess", "registry" or "grpc://host:port"
        value = (
            {"mode": value}
            if value in ROUTE_MODES
            else {"mode": "grpc", "endpoint": value.removeprefix("grpc://")}
        )
    if not isinstance(value, dict) or set(value) - {"mode", "endpoint"}:
        raise ConfigError(f"{where}: expected a table with mode and endpoint")
    route = AdapterRoute(str(value.get("mode", "inprocess")), str(value.get("endpoint", "")))
    if route.mode not in ROUTE_MODES:
        raise ConfigError(f"{where}.mode: must be one of {ROUTE_MODES}, got {route.mode!r}")
    if route.mode == "grpc" and not route.endpoint:
        raise ConfigError(f"{where}.endpoint: required when mode is 'grpc'")
    if route.mode != "grpc" and route.endpoint:
        raise ConfigError(f"{where}.endpoint: only for mode 'grpc'")
    return route


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Load the configuration: defaults, then ``path`` (TOML), then ``env``, then ``overrides``.

    Relative paths in the file are relative to the file's directory.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    routes = dict(Config().adapters)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        base = path.resolve().parent
        for section, table in data.items():
            where = f"{path}: [{section}]"
            if section == "adapters":
                for rt, value in table.items():
                    if rt not in RECORD_TYPES:
                        raise ConfigError(f"{where}: unknown record type {rt!r}")
                    routes[rt] = _route(f"{where}.{rt}", value)
                continue
            if section == "auth" and "issuers" in table:
                values["issuers"] = tuple(
                    _issuer(f"{where}.issuers[{i}]", item, base)
                    for i, item in enumerate(table.pop("issuers"))
                )
            keys = _SECTIONS.get(section)
            if keys is None or not isinstance(table, dict):
                raise ConfigError(f"{where}: unknown section")
            for key, value in table.items():
                if key not in keys:
                    raise ConfigError(f"{where}: unknown key {key!r}")
                name, kind = keys[key]
                values[name] = _convert(f"{where}.{key}", value, kind, base)
    for var, (name, kind) in _ENV.items():
        if env.get(var):
            values[name] = _convert(var, env[var], kind, Path.cwd())
    for rt in RECORD_TYPES:
        var = f"CERTBROKER_ADAPTER_{rt.upper()}"
        if env.get(var):
            routes[rt] = _route(var, env[var])
    known = {f.name for f in fields(Config)}
    for name, value in overrides.items():
        if name not in known:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = value
    values.setdefault("adapters", routes)
    config = replace(Config(), **values)
    if not 0 <= config.leeway_s <= 60:
        raise ConfigError("auth.leeway_s must be between 0 and 60 seconds")
    _check_routing(config)
    if not 1 <= config.workers <= MAX_WORKERS:
        raise ConfigError(f"server.workers must be between 1 and {MAX_WORKERS}")
    _check_audit(config)
    _check_caches(config)
    _check_batching(config)
    _check_callers(config)
    return config


def _check_callers(config: Config) -> None:
    lifetimes = [config.dev_idp_max_token_lifetime_s]
    lifetimes += [i.max_token_lifetime_s for i in config.issuers]
    if not all(0 < s < float("inf") for s in lifetimes):  # `not <` also refuses NaN
        raise ConfigError("auth: max_token_lifetime_s must be > 0 and finite")
    if not 0 < config.unauthenticated_rate_per_s < float("inf"):
        raise ConfigError("auth.unauthenticated_rate_per_s must be > 0")
    if config.unauthenticated_burst < 1:
        raise ConfigError("auth.unauthenticated_burst must be at least 1")
    if not 0 < config.unauthenticated_summary_interval_s < float("inf"):
        raise ConfigError("audit.unauthenticated_summary_interval_s must be > 0")


def _check_batching(config: Config) -> None:
    if config.audit_max_batch < 1:
        raise ConfigError("audit.max_batch must be at least 1")
    if not 0 <= config.audit_batch_wait_ms <= MAX_WAIT_S * 1000:
        raise ConfigError(f"audit.batch_wait_ms must be between 0 and {MAX_WAIT_S * 1000:g}")


def _check_caches(config: Config) -> None:
    if config.token_cache_max_age_s < 0 or config.token_cache_max_entries < 1:
        raise ConfigError("auth: token_cache_max_age_s must be >= 0, token_cache_max_entries >= 1")
    if not 1 <= config.record_cache_max_entries <= config.record_cache_max_bytes:
        raise ConfigError("cache: need 1 <= max_entries <= max_bytes")


def _check_audit(config: Config) -> None:
    if config.audit_dsn and config.audit_path is not None:
        raise ConfigError("audit: set either path (SQLite) or dsn (PostgreSQL), not both")
    if not SCHEMA_RE.fullmatch(config.audit_schema):
        raise ConfigError(
            f"audit.schema {config.audit_schema!r}: lowercase letters, digits and _ only"
        )
    if not 0 <= config.archive_after_days < float("inf"):  # also refuses NaN
        raise ConfigError("audit.archive_after_days must be >= 0 (0 = no archival)")
    if not config.archive_interval_s > 0:
        raise ConfigError("audit.archive_interval_s must be > 0")
    if not config.checkpoint_interval_s > 0:
        raise ConfigError("audit.checkpoint_interval_s must be > 0")


def _check_routing(config: Config) -> None:
    if not config.adapter_timeout_s > 0:  # `not >` also refuses NaN
        raise ConfigError("routing.timeout_s must be > 0")
    if config.lease_s < 1:
        raise ConfigError("routing.lease_s must be at least 1 second")
    if config.breaker_failures < 1:
        raise ConfigError("routing.breaker_failures must be at least 1")
    if not config.breaker_reset_s > 0:
        raise ConfigError("routing.breaker_reset_s must be > 0")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("routing.tls_cert and routing.tls_key go together (mutual TLS)")
    if config.tls_cert is not None and config.tls_ca is None:
        raise ConfigError("routing.tls_cert needs routing.tls_ca (mutual TLS is TLS first)")


def _issuer(where: str, item: Any, base: Path) -> IssuerConfig:
    if not isinstance(item, dict) or not {"issuer", "audience"} <= set(item):
        raise ConfigError(f"{where}: needs issuer and audience")
    unknown = set(item) - {"issuer", "audience", "public_keys", "jwks", "max_token_lifetime_s"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    lifetime = _convert(
        f"{where}.max_token_lifetime_s",
        item.get("max_token_lifetime_s", IssuerConfig.max_token_lifetime_s),
        float,
        base,
    )
    keys = tuple(
        _convert(f"{where}.public_keys", p, Path, base) for p in item.get("public_keys", [])
    )
    jwks = _convert(f"{where}.jwks", item["jwks"], Path, base) if "jwks" in item else None
    if not keys and jwks is None:
        raise ConfigError(f"{where}: needs public_keys or jwks")
    return IssuerConfig(str(item["issuer"]), str(item["audience"]), keys, jwks, lifetime)
