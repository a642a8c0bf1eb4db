"""Broker configuration: one frozen dataclass, loaded once from a TOML file plus environment.

Each setting is declared once, as a field of :class:`Config` whose metadata is a :class:`Key`:
its TOML section and key, its environment variable, its bounds, its help. Reading the file and
the environment, the checks, and the README's configuration reference (``scripts/docgen.py``,
``make docs``) all iterate :data:`SETTINGS`, so no setting can be in one and missing from another.

With no file, every default describes the embedded setup: SQLite audit log, in-process demo
adapters, the shipped policies, the development identity provider of the state directory.
``[audit] dsn`` moves the audit log to PostgreSQL (one log shared by several brokers), and
with it the controls and the adapter registry (a cluster: :mod:`certbroker.cluster`).
Environment variables override the file; command-line flags override both (via ``overrides``).
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import KW_ONLY, MISSING, Field, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

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


#: The shipped policy set: package data, so an installed wheel finds it as a checkout does.
DEFAULT_POLICY_DIR = Path(str(resources.files("certbroker") / "policies"))

#: Upper bound of ``[server] workers``: each worker holds its own connections and caches.
MAX_WORKERS = 64
#: ``[server] log_format`` and ``log_level`` values (certbroker.logs).
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

#: Route modes: the in-process demo adapter, one fixed gRPC endpoint, or the instances that
#: departments registered with the Registry.
ROUTE_MODES = ("inprocess", "grpc", "registry")


class ConfigError(ValueError):
    """The configuration file or environment is invalid; the message says where."""


# --- the declaration ----------------------------------------------------------------------------

_KEY = "certbroker.config.Key"  # the metadata entry of a field that holds its Key


@dataclass(frozen=True)
class Key:
    """How one setting is written, checked and documented: the metadata of its field.

    A field is declared as ``field(default=..., metadata=Key(...).meta)``. ``section`` and
    ``name`` place it in the TOML file, ``env`` names the variable that sets it ("" = the file
    only). The checks (``ge``, ``gt``, ``le``, ``choices``, ``pattern``) apply to a value from
    any source: file, environment or flag. The field's type says how a value is parsed; a
    :class:`~pathlib.Path` in the file is relative to the file's directory.

    The rest serves the generated docs. ``unset`` describes what applies when a default of None
    or "" is kept (``<state_dir>/audit.sqlite``): such a key is shown commented out, with
    ``example`` as its value. ``example`` also gives the example tables of a structure
    (``[[auth.issuers]]``), and ``env_value`` how a variable is written when that is not simply
    the value (``CERTBROKER_ADAPTER_<RECORD_TYPE>``).
    """

    section: str
    name: str
    help: str
    _: KW_ONLY
    env: str = ""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] = ()
    pattern: re.Pattern[str] | None = None
    pattern_help: str = ""
    unset: str = ""
    example: Any = None
    env_value: str = ""

    @property
    def meta(self) -> Mapping[str, Key]:
        """The ``metadata`` of the field this key declares."""
        return {_KEY: self}

    @property
    def dotted(self) -> str:
        """``section.name``, the TOML dotted key: how every message names the setting."""
        return f"{self.section}.{self.name}"

    @property
    def bounds(self) -> str:
        """The numeric bounds, short (``1..64``, ``>= 1``, ``> 0``), or ""."""
        if self.ge is not None and self.le is not None:
            return f"{self.ge:g}..{self.le:g}"
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le))
            if bound is not None
        ]
        return " and ".join(parts)

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (already of the field's type), or None."""
        number = isinstance(value, int | float) and not isinstance(value, bool)
        # `not value >= bound` rather than `value < bound`: NaN compares false, so it is refused.
        if number and (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
        ):
            if self.ge is not None and self.le is not None:
                return f"must be between {self.ge:g} and {self.le:g}, got {value!r}"
            return f"must be {self.bounds}, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}; got {value!r}"
        if self.pattern is not None and not (
            isinstance(value, str) and self.pattern.fullmatch(value)
        ):
            return f"must be {self.pattern_help}, got {value!r}"
        return None


def key_of(f: Field[Any]) -> Key:
    """The declaration of a field (KeyError if it has none: a test requires one on each)."""
    key = f.metadata[_KEY]
    if not isinstance(key, Key):
        raise TypeError(f"{f.name}: metadata {_KEY} is not a Key")
    return key


#: Default longest lifetime (``exp - iat``) of a token, per issuer: 12 h, a working day and more.
MAX_TOKEN_LIFETIME_S = 12 * 3600.0
#: No issuer may be allowed tokens living longer than a week.
MAX_TOKEN_LIFETIME_CAP_S = 7 * 24 * 3600.0

#: Each section of plain values, described in one line (the docs' ``[section]`` comment).
SECTIONS: Mapping[str, str] = {
    "server": "the gRPC server: address, processes, metrics",
    "policy": "the policy set",
    "datasets": "the in-process demo adapters' synthetic data",
    "audit": "the tamper-evident log: an SQLite file, or PostgreSQL with dsn (below)",
    "auth": "who may call: token checks and trusted issuers",
    "cache": "the record cache (TTL per record type: cache_ttl_s in the policy's catalogue)",
    "routing": "broker -> department calls",
    "console": "the web console (`certbroker console`): a client of this broker's gRPC services",
    "citizen": "the citizens' own service (Citizen): their issuer and resident ID claim",
    "notify": "access notices: the outbox relay to a message broker (none = kept, not sent)",
}


@dataclass(frozen=True)
class IssuerConfig:
    """A trusted token issuer (one ``[[auth.issuers]]`` table): its public keys as PEM files
    and/or a JWKS file."""

    issuer: str = field(metadata=Key("auth.issuers", "issuer", "the iss of its tokens").meta)
    audience: str = field(
        metadata=Key("auth.issuers", "audience", "the aud its tokens must carry").meta
    )
    public_keys: tuple[Path, ...] = field(
        default=(),
        metadata=Key("auth.issuers", "public_keys", "its public keys, PEM files").meta,
    )
    jwks: Path | None = field(
        default=None,
        metadata=Key("auth.issuers", "jwks", "and/or a JWKS file (one of the two is needed)").meta,
    )
    max_token_lifetime_s: float = field(
        default=MAX_TOKEN_LIFETIME_S,
        metadata=Key(
            "auth.issuers",
            "max_token_lifetime_s",
            "longest exp - iat of its tokens; longer: TOKEN_LIFETIME_TOO_LONG",
            gt=0,
            le=MAX_TOKEN_LIFETIME_CAP_S,
        ).meta,
    )


@dataclass(frozen=True)
class AdapterRoute:
    """Where one record type is fetched: in process, a gRPC endpoint, or registered instances."""

    mode: str = field(
        default="inprocess",
        metadata=Key(
            "adapters.<record_type>",
            "mode",
            "the demo adapter in this process (default), the endpoint, or registered instances",
            choices=ROUTE_MODES,
        ).meta,
    )
    endpoint: str = field(
        default="",
        metadata=Key("adapters.<record_type>", "endpoint", "host:port, mode grpc only").meta,
    )


@dataclass(frozen=True)
class ArchiveSchedule:
    """When the broker archives on its own (``[audit] archive_after_days`` > 0): entries older
    than ``after_days`` move to export files in ``directory``, checked every ``every_s``."""

    after_days: float
    directory: Path
    every_s: float = 3600.0


@dataclass(frozen=True)
class Config:
    """The broker's settings. Each field declares its setting in its metadata (a :class:`Key`):
    :func:`load`, its checks and the README's reference (``make docs``) all come from these.

    One flat class rather than one per section: the rest of the code reads ``cfg.port``,
    ``cfg.audit_dsn`` ...; the section is part of each field's declaration instead.
    """

    # [server]
    host: str = field(
        default="127.0.0.1",
        metadata=Key("server", "host", "address to listen on", env="CERTBROKER_HOST").meta,
    )
    port: int = field(
        default=50051,
        metadata=Key(
            "server", "port", "gRPC port; 0 = any free port", env="CERTBROKER_PORT", ge=0, le=65535
        ).meta,
    )
    metrics_port: int = field(
        default=9464,
        metadata=Key(
            "server",
            "metrics_port",
            "Prometheus /metrics (worker i: metrics_port + i); 0 = any free port",
            env="CERTBROKER_METRICS_PORT",
            ge=0,
            le=65535,
        ).meta,
    )
    state_dir: Path = field(
        default=Path(".certbroker"),
        metadata=Key(
            "server",
            "state_dir",
            "keys, and by default the SQLite audit log and the datasets",
            env="CERTBROKER_STATE_DIR",
        ).meta,
    )
    # Worker processes sharing the gRPC port (SO_REUSEPORT; certbroker.server.workers).
    workers: int = field(
        default=1,
        metadata=Key(
            "server",
            "workers",
            "worker processes sharing the port (below)",
            env="CERTBROKER_WORKERS",
            ge=1,
            le=MAX_WORKERS,
        ).meta,
    )
    # Off only to measure what the metrics cost (the benchmark).
    metrics_enabled: bool = field(
        default=True,
        metadata=Key(
            "server",
            "metrics_enabled",
            "false only to measure what metrics cost: /metrics is then empty",
            env="CERTBROKER_METRICS_ENABLED",
        ).meta,
    )
    # On SIGTERM: health NOT_SERVING, no new calls, in-flight calls get this long to finish (with
    # their audit entries) before they are cancelled. Twice the default adapter timeout.
    shutdown_grace_s: float = field(
        default=10.0,
        metadata=Key(
            "server",
            "shutdown_grace_s",
            "on SIGTERM, in-flight calls get this long to finish before they are cancelled",
            env="CERTBROKER_SHUTDOWN_GRACE_S",
            ge=0,
        ).meta,
    )
    log_format: str = field(
        default="text",
        metadata=Key(
            "server",
            "log_format",
            "text, or json: one JSON object per line for log shippers",
            env="CERTBROKER_LOG_FORMAT",
            choices=LOG_FORMATS,
        ).meta,
    )
    log_level: str = field(
        default="info",
        metadata=Key(
            "server",
            "log_level",
            "debug also logs every successful call",
            env="CERTBROKER_LOG_LEVEL",
            choices=LOG_LEVELS,
        ).meta,
    )
    # [policy]
    policy_dir: Path = field(
        default=DEFAULT_POLICY_DIR,
        metadata=Key(
            "policy",
            "dir",
            "the rules, and catalogue.yaml (each record type's cache_ttl_s)",
            env="CERTBROKER_POLICY_DIR",
            unset="the shipped set",
            example="policies",
        ).meta,
    )
    # [datasets]
    dataset_dir: Path | None = field(
        default=None,
        metadata=Key(
            "datasets",
            "dir",
            "the demo adapters' synthetic data",
            env="CERTBROKER_DATASET_DIR",
            unset="<state_dir>/datasets",
            example="datasets",
        ).meta,
    )
    # [audit]
    audit_path: Path | None = field(
        default=None,
        metadata=Key(
            "audit",
            "path",
            "the SQLite audit log",
            env="CERTBROKER_AUDIT_PATH",
            unset="<state_dir>/audit.sqlite",
            example="audit.sqlite",
        ).meta,
    )
    # A libpq DSN or URL; it may hold a password, hence no repr.
    audit_dsn: str = field(
        default="",
        repr=False,
        metadata=Key(
            "audit",
            "dsn",
            "PostgreSQL instead of the SQLite file: a libpq DSN or URL",
            env="CERTBROKER_AUDIT_DSN",
            unset="none (SQLite)",
            example="postgresql://certbroker_app@db.example/audit",
        ).meta,
    )
    audit_schema: str = field(
        default=DEFAULT_SCHEMA,
        metadata=Key(
            "audit",
            "schema",
            "PostgreSQL only: the schema of its tables",
            env="CERTBROKER_AUDIT_SCHEMA",
            pattern=SCHEMA_RE,
            pattern_help="lowercase letters, digits and _ (at most 63, not a digit first)",
        ).meta,
    )
    checkpoint_interval_s: float = field(
        default=60.0,
        metadata=Key(
            "audit",
            "checkpoint_interval_s",
            "sign a checkpoint this often (when the log grew)",
            gt=0,
        ).meta,
    )
    # PKCS#8 PEM, created if missing; its public key <name>.pub.pem beside it.
    checkpoint_key: Path | None = field(
        default=None,
        metadata=Key(
            "audit",
            "checkpoint_key",
            "checkpoint signing key (created if missing)",
            unset="<state_dir>/checkpoint-key/signing-key.pem",
            example="keys/checkpoint.pem",
        ).meta,
    )
    archive_after_days: float = field(
        default=0.0,
        metadata=Key(
            "audit",
            "archive_after_days",
            "move entries older than this to archive files; 0 = never",
            env="CERTBROKER_AUDIT_ARCHIVE_AFTER_DAYS",
            ge=0,
        ).meta,
    )
    archive_retention_days: float = field(
        default=0.0,
        metadata=Key(
            "audit",
            "archive_retention_days",
            "archive files older than this may be removed (`audit remove-archives`, which "
            "leaves a signed tombstone); 0 = keep for ever",
            env="CERTBROKER_AUDIT_ARCHIVE_RETENTION_DAYS",
            ge=0,
        ).meta,
    )
    archive_dir: Path | None = field(
        default=None,
        metadata=Key(
            "audit",
            "archive_dir",
            "where the archive files go",
            env="CERTBROKER_AUDIT_ARCHIVE_DIR",
            unset="<state_dir>/audit-archive",
            example="audit-archive",
        ).meta,
    )
    archive_interval_s: float = field(
        default=3600.0,
        metadata=Key(
            "audit",
            "archive_interval_s",
            "how often the broker looks for entries to archive",
            gt=0,
        ).meta,
    )
    # Group commit: a batch takes what queued during the previous commit, and is held open up to
    # audit_batch_wait_ms more.
    audit_max_batch: int = field(
        default=256,
        metadata=Key(
            "audit", "max_batch", "group commit: at most this many entries per transaction", ge=1
        ).meta,
    )
    audit_batch_wait_ms: float = field(
        default=0.0,
        metadata=Key(
            "audit",
            "batch_wait_ms",
            "hold a batch open this much longer for more entries; 0 = never",
            env="CERTBROKER_AUDIT_BATCH_WAIT_MS",
            ge=0,
            le=MAX_WAIT_S * 1000,
        ).meta,
    )
    audit_entry_format: int = field(
        default=2,
        metadata=Key(
            "audit",
            "entry_format",
            "format version of new entries: 2 = compact (every value stored once), 1 = JSON "
            "body with indexed copies (the format before 2); a log holding compact entries "
            "stays compact",
            env="CERTBROKER_AUDIT_ENTRY_FORMAT",
            ge=1,
            le=2,
        ).meta,
    )
    # Calls refused before a caller is known get no entry each (anyone could fill the log):
    # one summary entry per address per interval, and at shutdown.
    unauthenticated_summary_interval_s: float = field(
        default=10.0,
        metadata=Key(
            "audit",
            "unauthenticated_summary_interval_s",
            "one entry per address for the calls refused before a caller was known",
            gt=0,
            le=3600,
        ).meta,
    )
    # [auth]
    leeway_s: int = field(
        default=30,
        metadata=Key(
            "auth", "leeway_s", "clock skew allowed on a token's exp, nbf and iat", ge=0, le=60
        ).meta,
    )
    dev_idp: bool = field(
        default=True,
        metadata=Key(
            "auth",
            "dev_idp",
            "trust the tokens `certbroker token issue` prints for this state dir",
            env="CERTBROKER_DEV_IDP",
        ).meta,
    )
    token_cache_max_age_s: float = field(
        default=300.0,
        metadata=Key(
            "auth",
            "token_cache_max_age_s",
            "a verified token is verified again after this long; 0 = no cache",
            env="CERTBROKER_TOKEN_CACHE_MAX_AGE_S",
            ge=0,
        ).meta,
    )
    token_cache_max_entries: int = field(
        default=10_000,
        metadata=Key("auth", "token_cache_max_entries", "verified tokens kept", ge=1).meta,
    )
    dev_idp_max_token_lifetime_s: float = field(
        default=MAX_TOKEN_LIFETIME_S,
        metadata=Key(
            "auth",
            "dev_idp_max_token_lifetime_s",
            "longest exp - iat of the dev IdP's tokens",
            gt=0,
            le=MAX_TOKEN_LIFETIME_CAP_S,
        ).meta,
    )
    # Calls refused before a caller is known (no or bad token, undecodable request), per peer
    # (IP address; IPv6 by /64): then RESOURCE_EXHAUSTED UNAUTHENTICATED_RATE_LIMITED.
    unauthenticated_rate_per_s: float = field(
        default=5.0,
        metadata=Key(
            "auth",
            "unauthenticated_rate_per_s",
            "per address: calls refused before a caller is known, a second on average",
            env="CERTBROKER_UNAUTHENTICATED_RATE_PER_S",
            gt=0,
            le=1_000_000,
        ).meta,
    )
    unauthenticated_burst: int = field(
        default=20,
        metadata=Key(
            "auth",
            "unauthenticated_burst",
            "and at once; past that RESOURCE_EXHAUSTED UNAUTHENTICATED_RATE_LIMITED",
            ge=1,
        ).meta,
    )
    issuers: tuple[IssuerConfig, ...] = field(
        default=(),
        metadata=Key(
            "auth",
            "issuers",
            "a trusted token issuer; one table each",
            example=(
                IssuerConfig(
                    "https://idp.example.gov.cn",
                    "certbroker",
                    (Path("keys/idp-es256.pem"),),
                    Path("keys/idp.jwks.json"),
                ),
            ),
        ).meta,
    )
    # [cache]: each record type's TTL comes from the policy's catalogue.yaml.
    record_cache_max_entries: int = field(
        default=10_000,
        metadata=Key(
            "cache",
            "max_entries",
            "records kept; at most max_bytes",
            env="CERTBROKER_RECORD_CACHE_MAX_ENTRIES",
            ge=1,
        ).meta,
    )
    record_cache_max_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=Key(
            "cache",
            "max_bytes",
            "their estimated size (64 MiB)",
            env="CERTBROKER_RECORD_CACHE_MAX_BYTES",
            ge=1,
        ).meta,
    )
    # [routing]
    adapter_timeout_s: float = field(
        default=5.0,
        metadata=Key(
            "routing",
            "timeout_s",
            "per department call",
            env="CERTBROKER_ADAPTER_TIMEOUT_S",
            gt=0,
        ).meta,
    )
    lease_s: int = field(
        default=15,
        metadata=Key(
            "routing",
            "lease_s",
            "a registered instance leaves routing this long after its last heartbeat",
            env="CERTBROKER_LEASE_S",
            ge=1,
        ).meta,
    )
    breaker_failures: int = field(
        default=5,
        metadata=Key(
            "routing",
            "breaker_failures",
            "consecutive failures that open a department's circuit breaker",
            env="CERTBROKER_BREAKER_FAILURES",
            ge=1,
        ).meta,
    )
    breaker_reset_s: float = field(
        default=10.0,
        metadata=Key(
            "routing",
            "breaker_reset_s",
            "an open breaker lets one probe call through after this",
            env="CERTBROKER_BREAKER_RESET_S",
            gt=0,
        ).meta,
    )
    # Broker -> adapter TLS: on when tls_ca is set; mutual when tls_cert and tls_key are too.
    tls_ca: Path | None = field(
        default=None,
        metadata=Key(
            "routing",
            "tls_ca",
            "broker -> adapter TLS, adapters' certificates checked against this CA",
            env="CERTBROKER_TLS_CA",
            unset="plaintext",
            example="tls/ca.pem",
        ).meta,
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=Key(
            "routing",
            "tls_cert",
            "mutual TLS: the broker's certificate (with tls_key and tls_ca)",
            env="CERTBROKER_TLS_CERT",
            unset="none",
            example="tls/broker.pem",
        ).meta,
    )
    tls_key: Path | None = field(
        default=None,
        metadata=Key(
            "routing",
            "tls_key",
            "mutual TLS: the broker's private key",
            env="CERTBROKER_TLS_KEY",
            unset="none",
            example="tls/broker.key",
        ).meta,
    )
    # [console]: the web console is a client of the broker (certbroker.console); it reads the
    # same file so that `certbroker console` finds the broker, its state dir and the keys.
    console_host: str = field(
        default="127.0.0.1",
        metadata=Key(
            "console", "host", "address the console listens on", env="CERTBROKER_CONSOLE_HOST"
        ).meta,
    )
    console_port: int = field(
        default=8080,
        metadata=Key(
            "console",
            "port",
            "HTTP port of the console; 0 = any free port",
            env="CERTBROKER_CONSOLE_PORT",
            ge=0,
            le=65535,
        ).meta,
    )
    console_broker: str = field(
        default="",
        metadata=Key(
            "console",
            "broker",
            "host:port of the broker the console calls",
            env="CERTBROKER_CONSOLE_BROKER",
            unset="[server] host and port",
            example="broker.example.gov.cn:50051",
        ).meta,
    )
    console_session_s: float = field(
        default=8 * 3600.0,
        metadata=Key(
            "console",
            "session_s",
            "a sign-in lasts this long at most (and never past its token's exp)",
            gt=0,
            le=86400,
        ).meta,
    )
    console_oidc_issuer: str = field(
        default="",
        metadata=Key(
            "console",
            "oidc_issuer",
            "OpenID Connect issuer to sign in with (the iss of its ID tokens)",
            unset="the development IdP's sign-in page, when [auth] dev_idp",
            example="https://idp.example.gov.cn",
        ).meta,
    )
    console_oidc_authorize_url: str = field(
        default="",
        metadata=Key(
            "console",
            "oidc_authorize_url",
            "the IdP's authorization endpoint (with oidc_issuer)",
            unset="none",
            example="https://idp.example.gov.cn/authorize",
        ).meta,
    )
    console_oidc_token_url: str = field(
        default="",
        metadata=Key(
            "console",
            "oidc_token_url",
            "the IdP's token endpoint (with oidc_issuer)",
            unset="none",
            example="https://idp.example.gov.cn/token",
        ).meta,
    )
    console_oidc_client_id: str = field(
        default="certbroker-console",
        metadata=Key("console", "oidc_client_id", "the console's client id at the IdP").meta,
    )
    console_oidc_client_secret_file: Path | None = field(
        default=None,
        metadata=Key(
            "console",
            "oidc_client_secret_file",
            "a file holding the console's client secret (a public client with PKCE when unset)",
            unset="none",
            example="keys/console-client-secret",
        ).meta,
    )
    console_checkpoint_public_key: Path | None = field(
        default=None,
        metadata=Key(
            "console",
            "checkpoint_public_key",
            "the broker's checkpoint public key: the console's verify checks use it",
            unset="<state_dir>/checkpoint-key/public-key.pem",
            example="keys/checkpoint-public-key.pem",
        ).meta,
    )
    # [citizen] The provincial app's identity provider: its own issuer and audience, so a
    # clerk's token is never a citizen's and the reverse. The dev IdP's citizen issuer is
    # trusted besides it while [auth] dev_idp is on.
    citizen_issuer: str = field(
        default="",
        metadata=Key(
            "citizen",
            "issuer",
            "the iss of citizens' tokens (with public_key)",
            env="CERTBROKER_CITIZEN_ISSUER",
            unset="the dev IdP's citizen issuer only",
            example="https://id.gd.gov.cn/app",
        ).meta,
    )
    citizen_audience: str = field(
        default="certbroker-citizen",
        metadata=Key("citizen", "audience", "the aud citizens' tokens must carry").meta,
    )
    citizen_public_key: Path | None = field(
        default=None,
        metadata=Key(
            "citizen",
            "public_key",
            "the citizen issuer's public key (PEM)",
            env="CERTBROKER_CITIZEN_PUBLIC_KEY",
            unset="none",
            example="keys/citizen-idp.pem",
        ).meta,
    )
    citizen_id_claim: str = field(
        default="resident_id",
        metadata=Key(
            "citizen",
            "id_claim",
            "the claim holding the citizen's resident ID",
            pattern=re.compile(r"[a-z_][a-z0-9_]{0,63}"),
            pattern_help="lowercase letters, digits and _",
        ).meta,
    )
    # [notify]
    nats_url: str = field(
        default="",
        metadata=Key(
            "notify",
            "nats_url",
            "NATS JetStream server the outbox relay publishes to",
            env="CERTBROKER_NATS_URL",
            unset="no broker: notices stay in the outbox",
            example="nats://127.0.0.1:4222",
        ).meta,
    )
    notify_subject: str = field(
        default="certbroker.notices",
        metadata=Key(
            "notify",
            "subject",
            "subject prefix; a notice goes to <subject>.<record_type>",
            pattern=re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*"),
            pattern_help="dot-separated tokens of letters, digits, _ and -",
        ).meta,
    )
    notify_stream: str = field(
        default="CERTBROKER_NOTICES",
        metadata=Key(
            "notify",
            "stream",
            "the JetStream stream (created if missing) holding the notices",
            pattern=re.compile(r"[A-Za-z0-9_-]{1,64}"),
            pattern_help="letters, digits, _ and -",
        ).meta,
    )
    notify_interval_s: float = field(
        default=0.5,
        metadata=Key(
            "notify",
            "interval_s",
            "how often the relay looks for unsent notices (and retries)",
            gt=0,
            le=60,
        ).meta,
    )
    # [adapters.<record_type>]
    adapters: Mapping[str, AdapterRoute] = field(
        default_factory=lambda: {rt: AdapterRoute() for rt in RECORD_TYPES},
        metadata=Key(
            "adapters",
            "<record_type>",
            "where one record type is fetched",
            env="CERTBROKER_ADAPTER_<RECORD_TYPE>",
            env_value="`inprocess`, `registry` or `grpc://host:port`",
            example={"marriage": AdapterRoute("grpc", "127.0.0.1:7004")},
        ).meta,
    )

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
    def console_target(self) -> str:
        """host:port of the broker the console calls."""
        return self.console_broker or f"{self.host}:{self.port}"

    @property
    def checkpoint_public_key(self) -> Path:
        """The checkpoint public key verifiers use (the broker writes it beside its key)."""
        return self.console_checkpoint_public_key or (
            self.state_dir / "checkpoint-key" / "public-key.pem"
        )

    @property
    def datasets(self) -> Path:
        return self.dataset_dir or self.state_dir / "datasets"


# --- what the declaration gives -----------------------------------------------------------------

#: The types a plain setting may have (``X | None`` too, for a default that is computed).
PLAIN_KINDS: tuple[type, ...] = (str, int, float, bool, Path)


@dataclass(frozen=True)
class Setting:
    """One field of :class:`Config` with its declaration, as :data:`SETTINGS` lists them.

    ``shape`` is ``"value"`` for a plain setting of type ``kind``; ``"tables"`` for an array of
    tables (``[[auth.issuers]]``) and ``"named"`` for one table per name
    (``[adapters.<record_type>]``), ``kind`` being then the dataclass of one table.
    """

    attr: str
    key: Key
    kind: type
    default: Any
    shape: str = "value"

    def from_toml(self, where: str, value: Any, base: Path) -> Any:
        """A plain value as TOML gave it: of the field's type, within its bounds."""
        return self.check(where, _toml_value(self.kind, where, value, base))

    def from_env(self, where: str, text: str) -> Any:
        """A plain value from an environment variable (a relative path: to the working dir)."""
        return self.check(where, _env_value(self.kind, where, text))

    def check(self, where: str, value: Any) -> Any:
        """``value``, if its declaration allows it; else ConfigError naming ``where``."""
        problem = self.key.problem(value)
        if problem is not None:
            raise ConfigError(f"{where}: {problem}")
        return value


def _declared() -> tuple[Setting, ...]:
    """:class:`Config`'s fields as settings: how each is parsed comes from its type hint."""
    hints = get_type_hints(Config)
    found: list[Setting] = []
    for f in fields(Config):
        hint = hints[f.name]
        origin, args = get_origin(hint), get_args(hint)
        if origin is tuple:  # tuple[Table, ...]
            kind, shape = args[0], "tables"
        elif origin is Mapping:  # Mapping[str, Table]
            kind, shape = args[1], "named"
        elif origin is UnionType:  # X | None
            (kind,) = (a for a in args if a is not type(None))
            shape = "value"
        else:
            kind, shape = hint, "value"
        if shape == "value" and kind not in PLAIN_KINDS:
            raise TypeError(f"{f.name}: a setting of type {hint} cannot be read from text")
        default = f.default if f.default_factory is MISSING else f.default_factory()
        found.append(Setting(f.name, key_of(f), kind, default, shape))
    return tuple(found)


#: Every setting, in the order of the fields (= the order of the docs).
SETTINGS = _declared()


def _by_section() -> dict[str, dict[str, Setting]]:
    """section -> TOML key -> setting; a key or variable declared twice is a programming error."""
    found: dict[str, dict[str, Setting]] = {}
    variables: set[str] = set()
    for setting in SETTINGS:
        table = found.setdefault(setting.key.section, {})
        if setting.key.name in table or (setting.key.env and setting.key.env in variables):
            raise TypeError(f"{setting.attr}: {setting.key.dotted} or its variable declared twice")
        table[setting.key.name] = setting
        variables.add(setting.key.env)
    return found


_BY_ATTR = {s.attr: s for s in SETTINGS}
_BY_SECTION = _by_section()
#: The one "named" setting: [adapters.<record_type>] and CERTBROKER_ADAPTER_<RECORD_TYPE>.
_ROUTES = next(s for s in SETTINGS if s.shape == "named")
#: Where a record type's name goes in the routes' variable name.
RECORD_TYPE_PLACEHOLDER = "<RECORD_TYPE>"


def route_variable(record_type: str) -> str:
    """The environment variable that routes ``record_type`` (``CERTBROKER_ADAPTER_MARRIAGE``)."""
    return _ROUTES.key.env.replace(RECORD_TYPE_PLACEHOLDER, record_type.upper())


_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


def _toml_value(kind: type, where: str, value: Any, base: Path) -> Any:
    """``value`` as the TOML file gave it, if it is of ``kind`` (no strings for numbers: a typo
    such as ``port = "5O051"`` should not pass, nor ``workers = 1.5`` become 1)."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if math.isfinite(value):
            return float(value)
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if kind is str and isinstance(value, str):
        return value
    if kind is Path and isinstance(value, str) and value:
        return base / value  # an absolute value stays itself
    raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")


def _env_value(kind: type, where: str, text: str) -> Any:
    """``text``, an environment variable's value, as a ``kind``."""
    if kind is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{where}: expected true/false, 1/0 or yes/no, got {text!r}")
    if kind is int or kind is float:
        try:
            number = kind(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {text!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {text!r}")
        return number
    if kind is Path:
        return Path.cwd() / text
    return text


# --- loading ------------------------------------------------------------------------------------


def load(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Config:
    """Load the configuration: defaults, then ``path`` (TOML), then ``env``, then ``overrides``.

    Relative paths in the file are relative to the file's directory. ``overrides`` are
    :class:`Config` attribute names (the command line's flags); None means "not given".
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    routes: dict[str, AdapterRoute] = dict(_ROUTES.default)
    if path is not None:
        _read_file(path, values, routes)
    _read_env(env, values, routes)
    for name, value in overrides.items():
        setting = _BY_ATTR.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            setting.check(setting.key.dotted, value)
            values[name] = value
    values.setdefault(_ROUTES.attr, routes)
    config = replace(Config(), **values)
    _check_together(config)
    return config


def _read_file(path: Path, values: dict[str, Any], routes: dict[str, AdapterRoute]) -> None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    base = path.resolve().parent
    for section, table in data.items():
        keys = _BY_SECTION.get(section)
        if keys is None or not isinstance(table, dict):
            raise ConfigError(f"{path}: [{section}]: unknown section")
        if section == _ROUTES.key.section:
            for record_type, value in table.items():
                where = f"{path}: {section}.{record_type}"
                if record_type not in _ROUTES.default:
                    raise ConfigError(f"{where}: unknown record type {record_type!r}")
                routes[record_type] = _route(where, value)
            continue
        for name, value in table.items():
            setting = keys.get(name)
            if setting is None:
                raise ConfigError(f"{path}: [{section}]: unknown key {name!r}")
            where = f"{path}: {setting.key.dotted}"
            if setting.shape == "tables":  # [[auth.issuers]], the one array of tables
                if not isinstance(value, list):
                    raise ConfigError(f"{where}: expected [[{setting.key.dotted}]] tables")
                values[setting.attr] = tuple(
                    _issuer(f"{where}[{i}]", item, base) for i, item in enumerate(value)
                )
            else:
                values[setting.attr] = setting.from_toml(where, value, base)


def _read_env(
    env: Mapping[str, str], values: dict[str, Any], routes: dict[str, AdapterRoute]
) -> None:
    """The declared variables that are set; an empty one counts as unset."""
    for setting in SETTINGS:
        if setting.shape == "value" and setting.key.env and env.get(setting.key.env):
            where = f"{setting.key.env} ({setting.key.dotted})"
            values[setting.attr] = setting.from_env(where, env[setting.key.env])
    for record_type in _ROUTES.default:
        var = route_variable(record_type)
        if env.get(var):
            routes[record_type] = _route(f"{var} ({_ROUTES.key.section}.{record_type})", env[var])


def _route(where: str, value: Any) -> AdapterRoute:
    if isinstance(value, str):  # "inprocess", "registry" or "grpc://host:port"
        value = (
            {"mode": value}
            if value in ROUTE_MODES
            else {"mode": "grpc", "endpoint": value.removeprefix("grpc://")}
        )
    names = [f.name for f in fields(AdapterRoute)]
    if not isinstance(value, dict) or set(value) - set(names):
        raise ConfigError(f"{where}: expected a table with {' and '.join(names)}")
    for f in fields(AdapterRoute):
        if f.name in value:
            if not isinstance(value[f.name], str):
                raise ConfigError(f"{where}.{f.name}: expected str, got {value[f.name]!r}")
            problem = key_of(f).problem(value[f.name])
            if problem is not None:
                raise ConfigError(f"{where}.{f.name}: {problem}")
    route = AdapterRoute(**value)
    if route.mode == "grpc" and not route.endpoint:
        raise ConfigError(f"{where}.endpoint: required when mode is 'grpc'")
    if route.mode != "grpc" and route.endpoint:
        raise ConfigError(f"{where}.endpoint: only for mode 'grpc'")
    return route


def _issuer(where: str, item: Any, base: Path) -> IssuerConfig:
    required = [f.name for f in fields(IssuerConfig) if f.default is MISSING]
    if not isinstance(item, dict) or not set(required) <= set(item):
        raise ConfigError(f"{where}: needs {' and '.join(required)}")
    unknown = set(item) - {f.name for f in fields(IssuerConfig)}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    issuer, audience = (_toml_value(str, f"{where}.{n}", item[n], base) for n in required)
    keys = item.get("public_keys", [])
    if not isinstance(keys, list):
        raise ConfigError(f"{where}.public_keys: expected an array of paths, got {keys!r}")
    public_keys = tuple(_toml_value(Path, f"{where}.public_keys", p, base) for p in keys)
    jwks = _toml_value(Path, f"{where}.jwks", item["jwks"], base) if "jwks" in item else None
    if not public_keys and jwks is None:
        raise ConfigError(f"{where}: needs public_keys or jwks")
    lifetime = MAX_TOKEN_LIFETIME_S
    if "max_token_lifetime_s" in item:
        lifetime = _toml_value(
            float, f"{where}.max_token_lifetime_s", item["max_token_lifetime_s"], base
        )
        declared = next(f for f in fields(IssuerConfig) if f.name == "max_token_lifetime_s")
        problem = key_of(declared).problem(lifetime)
        if problem is not None:
            raise ConfigError(f"{where}.max_token_lifetime_s: {problem}")
    return IssuerConfig(issuer, audience, public_keys, jwks, lifetime)


def _check_together(config: Config) -> None:
    """The rules that tie two settings together (each value alone was checked as it was read)."""
    if config.audit_dsn and config.audit_path is not None:
        raise ConfigError("audit: set either path (SQLite) or dsn (PostgreSQL), not both")
    if config.record_cache_max_entries > config.record_cache_max_bytes:
        raise ConfigError(
            f"cache.max_entries ({config.record_cache_max_entries}) must be at most"
            f" cache.max_bytes ({config.record_cache_max_bytes})"
        )
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("routing.tls_cert and routing.tls_key go together (mutual TLS)")
    if config.tls_cert is not None and config.tls_ca is None:
        raise ConfigError("routing.tls_cert needs routing.tls_ca (mutual TLS is TLS first)")
    oidc = (config.console_oidc_authorize_url, config.console_oidc_token_url)
    if config.console_oidc_issuer and not all(oidc):
        raise ConfigError("console.oidc_issuer needs oidc_authorize_url and oidc_token_url")
    if any(oidc) and not config.console_oidc_issuer:
        raise ConfigError("console.oidc_authorize_url and oidc_token_url need oidc_issuer")
