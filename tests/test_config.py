from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from certbroker import config
from certbroker.config import (
    AdapterRoute,
    ArchiveSchedule,
    Config,
    ConfigError,
    IssuerConfig,
    PostgresLocation,
    Setting,
)
from certbroker.contract.fields import RECORD_TYPES
from scripts import docgen


def test_defaults_are_the_embedded_setup() -> None:
    cfg = config.load(None, env={})
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("127.0.0.1", 50051, 9464)
    assert cfg.state_dir == Path(".certbroker")
    assert cfg.audit_file == Path(".certbroker/audit.sqlite")
    assert all(route.mode == "inprocess" for route in cfg.adapters.values())
    assert set(cfg.adapters) == {"household", "social_security", "property", "marriage"}
    assert (cfg.policy_dir / "tests").is_dir()


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[server]\nport = 6000\nstate_dir = "state"\n'
        "[auth]\nleeway_s = 10\n"
        '[adapters.marriage]\nmode = "grpc"\nendpoint = "127.0.0.1:7004"\n'
    )
    cfg = config.load(
        path,
        env={
            "CERTBROKER_METRICS_PORT": "9999",
            "CERTBROKER_ADAPTER_PROPERTY": "grpc://127.0.0.1:7003",
        },
    )
    assert cfg.port == 6000
    assert cfg.state_dir == tmp_path / "state"  # relative to the file
    assert cfg.leeway_s == 10
    assert cfg.metrics_port == 9999
    assert cfg.adapters["marriage"] == AdapterRoute("grpc", "127.0.0.1:7004")
    assert cfg.adapters["property"] == AdapterRoute("grpc", "127.0.0.1:7003")
    assert cfg.adapters["household"] == AdapterRoute("inprocess", "")
    assert config.load(path, env={}, port=0).port == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nprot = 1\n", "unknown key 'prot'"),
        ("[nope]\n", "unknown section"),
        ('[server]\nport = "x"\n', "expected int"),
        ("[auth]\nleeway_s = 120\n", "leeway_s"),
        ('[adapters.pets]\nmode = "grpc"\n', "unknown record type"),
        ('[adapters.marriage]\nmode = "grpc"\n', "endpoint"),
        ('[[auth.issuers]]\nissuer = "a"\naudience = "b"\n', "public_keys or jwks"),
        ("[server\n", "broker.toml"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path, env={})


def test_issuers_from_file(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(
        '[[auth.issuers]]\nissuer = "https://idp.example"\naudience = "certbroker"\n'
        'public_keys = ["keys/a.pem"]\n'
    )
    (issuer,) = config.load(path, env={}).issuers
    assert issuer.public_keys == (tmp_path / "keys/a.pem",)


def test_audit_backend_and_archival_settings(tmp_path: Path) -> None:
    cfg = config.load(None, env={"CERTBROKER_AUDIT_DSN": "postgresql://u:pw@db/audit"})
    assert cfg.audit_location == PostgresLocation("postgresql://u:pw@db/audit", "certbroker")
    assert "pw" not in repr(cfg)  # the DSN may carry a password
    assert "pw" not in str(cfg.audit_location)
    assert config.load(None, env={}).audit_location == Path(".certbroker/audit.sqlite")
    assert config.load(None, env={}).archive is None
    path = tmp_path / "broker.toml"
    path.write_text(
        '[audit]\ndsn = "host=db dbname=audit"\nschema = "hall_7"\n'
        'archive_after_days = 30\narchive_dir = "old"\n'
    )
    cfg = config.load(path, env={"CERTBROKER_AUDIT_SCHEMA": "hall_8"})
    assert cfg.audit_location == PostgresLocation("host=db dbname=audit", "hall_8")
    assert cfg.archive == ArchiveSchedule(30.0, tmp_path / "old")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CERTBROKER_AUDIT_DSN": "x", "CERTBROKER_AUDIT_SCHEMA": "Bad-Name"}, "schema"),
        ({"CERTBROKER_AUDIT_DSN": "x", "CERTBROKER_AUDIT_PATH": "a.sqlite"}, "not both"),
        ({"CERTBROKER_AUDIT_ARCHIVE_AFTER_DAYS": "-1"}, "archive_after_days"),
        ({"CERTBROKER_AUDIT_ARCHIVE_AFTER_DAYS": "nan"}, "archive_after_days"),
    ],
)
def test_bad_audit_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, env=env)


# --- the declaration ----------------------------------------------------------------------------
# Every setting is declared once (certbroker.config.Key in the field's metadata); these tests
# take their cases from the declarations, so a new setting is covered as soon as it is declared.

PLAIN = [s for s in config.SETTINGS if s.shape == "value"]
VARIABLES = [s for s in PLAIN if s.key.env]
# Settings that cannot be set alone (config._check_together): what each needs beside it.
_OIDC = ("console_oidc_issuer", "console_oidc_authorize_url", "console_oidc_token_url")
COMPANIONS = {
    "tls_cert": ("tls_key", "tls_ca"),
    "tls_key": ("tls_cert", "tls_ca"),
    **{name: tuple(other for other in _OIDC if other != name) for name in _OIDC},
}


def _ids(settings: list[Setting]) -> list[str]:
    return [s.key.dotted for s in settings]


def test_every_field_is_declared_completely() -> None:
    for f in fields(Config):
        key = config.key_of(f)  # KeyError: a field without a declaration
        assert all((key.section, key.name, key.help)), f.name
    for table in (IssuerConfig, AdapterRoute):
        for f in fields(table):
            assert config.key_of(f).help, f"{table.__name__}.{f.name}"
    assert {s.key.section for s in PLAIN} == set(config.SECTIONS)
    assert all(config.SECTIONS.values())
    variables = [s.key.env for s in config.SETTINGS if s.key.env]
    assert len(variables) == len(set(variables))
    assert all(re.fullmatch(r"CERTBROKER_[A-Z0-9_<>]+", v) for v in variables), variables
    for setting in PLAIN:
        key = setting.key
        assert setting.kind in config.PLAIN_KINDS, setting.attr
        if setting.default is None or setting.default == "":
            assert key.unset, f"{key.dotted}: say what applies when it is not set"
        if key.unset:  # shown commented out, with an example that must itself be valid
            assert key.example is not None, key.dotted
            setting.from_toml(key.dotted, key.example, Path("/base"))
        else:
            assert setting.check(key.dotted, setting.default) == setting.default
        if key.pattern is not None:
            assert key.pattern_help, key.dotted
    for setting in config.SETTINGS:
        if setting.shape != "value":  # a structure documents itself with example tables
            assert setting.key.example, setting.key.dotted


def _sample(setting: Setting) -> Any:
    """A value of the setting's type within its bounds, other than its default."""
    key, default = setting.key, setting.default
    if setting.kind is bool:
        return not default
    if setting.kind in (int, float):
        step = 1 if setting.kind is int else 0.5
        value = default + step
        return value if key.le is None or value <= key.le else default - step
    if setting.kind is Path:
        return Path("sub/file")
    if key.choices:
        return next(c for c in key.choices if c != default)
    return "hall_7" if key.pattern is not None else "example.org"


def _env_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _toml(values: dict[Setting, Any]) -> str:
    sections: dict[str, list[str]] = {}
    for setting, value in values.items():
        sections.setdefault(setting.key.section, []).append(
            f"{setting.key.name} = {docgen.toml(value)}"
        )
    return "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())


def _with_companions(setting: Setting) -> dict[Setting, Any]:
    by_attr = {s.attr: s for s in config.SETTINGS}
    together = [setting, *(by_attr[a] for a in COMPANIONS.get(setting.attr, ()))]
    return {s: _sample(s) for s in together}


@pytest.mark.parametrize("setting", PLAIN, ids=_ids(PLAIN))
def test_every_key_round_trips_through_the_file(tmp_path: Path, setting: Setting) -> None:
    values = _with_companions(setting)
    path = tmp_path / "broker.toml"
    path.write_text(_toml(values))
    expected = values[setting]
    if setting.kind is Path:
        expected = tmp_path / expected  # relative to the file
    assert getattr(config.load(path, env={}), setting.attr) == expected


@pytest.mark.parametrize("setting", VARIABLES, ids=[s.key.env for s in VARIABLES])
def test_every_variable_round_trips(setting: Setting) -> None:
    values = _with_companions(setting)
    env = {s.key.env: _env_text(v) for s, v in values.items()}
    expected = values[setting]
    if setting.kind is Path:
        expected = Path.cwd() / expected  # relative to the working directory
    assert getattr(config.load(None, env=env), setting.attr) == expected
    assert getattr(config.load(None, env={s: "" for s in env}), setting.attr) == setting.default


@pytest.mark.parametrize("record_type", sorted(RECORD_TYPES))
def test_every_route_variable_round_trips(record_type: str) -> None:
    var = config.route_variable(record_type)
    for text, route in [
        ("registry", AdapterRoute("registry")),
        ("grpc://10.0.0.7:7001", AdapterRoute("grpc", "10.0.0.7:7001")),
    ]:
        assert config.load(None, env={var: text}).adapters[record_type] == route


def _just_outside(setting: Setting) -> list[tuple[float, float]]:
    """(a value just outside a bound, the nearest value inside it) for each declared bound."""
    key, whole = setting.key, setting.kind is int

    def below(x: float) -> float:
        return x - 1 if whole else math.nextafter(x, -math.inf)

    def above(x: float) -> float:
        return x + 1 if whole else math.nextafter(x, math.inf)

    cases = []
    if key.ge is not None:
        cases.append((below(key.ge), key.ge))
    if key.gt is not None:
        cases.append((key.gt, above(key.gt)))
    if key.le is not None:
        cases.append((above(key.le), key.le))
    kind = int if whole else float
    return [(kind(out), kind(inside)) for out, inside in cases]


BOUNDS = [(s, out, inside) for s in PLAIN for out, inside in _just_outside(s)]


def test_the_bounds_are_declared() -> None:
    bounded = {s.attr for s, _, _ in BOUNDS}
    assert {"port", "workers", "leeway_s", "audit_batch_wait_ms", "lease_s"} <= bounded


@pytest.mark.parametrize(
    ("setting", "outside", "inside"),
    BOUNDS,
    ids=[f"{s.key.dotted}={out!r}" for s, out, _ in BOUNDS],
)
def test_a_value_just_outside_a_bound_is_refused_naming_the_key(
    tmp_path: Path, setting: Setting, outside: float, inside: float
) -> None:
    key = setting.key
    assert setting.check(key.dotted, inside) == inside
    path = tmp_path / "broker.toml"
    path.write_text(_toml({setting: outside}))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {key.dotted}: must be ")):
        config.load(path, env={})
    if key.env:
        with pytest.raises(ConfigError, match=re.escape(f"{key.env} ({key.dotted}): must be ")):
            config.load(None, env={key.env: str(outside)})
    with pytest.raises(ConfigError, match=re.escape(f"{key.dotted}: must be ")):
        config.load(None, env={}, **{setting.attr: outside})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nworkers = 1.5\n", r"server\.workers: expected int, got 1\.5"),  # not 1
        ('[server]\nport = "50051"\n', r"server\.port: expected int"),
        ('[server]\nmetrics_enabled = "false"\n', r"server\.metrics_enabled: expected bool"),
        ("[routing]\ntimeout_s = inf\n", r"routing\.timeout_s: expected a finite number"),
        ('[audit]\nschema = "Hall-7"\n', r"audit\.schema: must be lowercase letters"),
        ('[server]\nstate_dir = ""\n', r"server\.state_dir: expected Path"),
        ('[auth]\nissuers = "x"\n', r"auth\.issuers: expected \[\[auth\.issuers\]\] tables"),
        ("[adapters.marriage]\nmode = 1\n", r"adapters\.marriage\.mode: expected str"),
        ("[cache]\nmax_entries = 10\nmax_bytes = 5\n", r"cache\.max_entries \(10\) must be at"),
    ],
)
def test_values_of_the_wrong_type_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: {message}|^{message}"):
        config.load(path, env={})


def test_flags_must_be_settings() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        config.load(None, env={}, prot=1)
    assert config.load(None, env={}, port=None).port == 50051  # None: the flag is not given


# --- the generated reference --------------------------------------------------------------------


def test_the_reference_is_a_valid_configuration_of_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "broker.toml"
    path.write_text("\n".join(docgen.toml_block()) + "\n")
    cfg = config.load(path, env={})
    for setting in PLAIN:
        expected = setting.default
        if setting.key.unset:  # commented out in the reference
            assert getattr(cfg, setting.attr) == expected, setting.key.dotted
            continue
        if setting.kind is Path:
            expected = tmp_path / expected
        assert getattr(cfg, setting.attr) == expected, setting.key.dotted
    (issuer,) = cfg.issuers
    (example,) = next(s for s in config.SETTINGS if s.attr == "issuers").key.example
    assert issuer.public_keys == tuple(tmp_path / p for p in example.public_keys)
    assert cfg.adapters["marriage"] == AdapterRoute("grpc", "127.0.0.1:7004")


def test_the_reference_names_every_key_and_variable() -> None:
    text = docgen.reference()
    for setting in config.SETTINGS:
        if setting.shape == "value":
            assert f"{setting.key.name} = " in text, setting.key.dotted
        if setting.key.env:
            assert f"| `{setting.key.env}` |" in text, setting.key.env


def test_readme_is_in_sync_and_drift_is_caught(tmp_path: Path) -> None:
    assert docgen.main(["--check"]) == 0, "run `make docs`"
    readme = tmp_path / "README.md"
    readme.write_text(docgen.README.read_text(encoding="utf-8").replace("port = 50051", "port = 1"))
    assert docgen.main(["--check"], readme) == 1
    assert docgen.main([], readme) == 0  # regenerates
    assert docgen.main(["--check"], readme) == 0
    readme.write_text("no markers\n")
    assert docgen.main(["--check"], readme) == 2


def test_caller_hardening_settings(tmp_path: Path) -> None:
    cfg = config.load(None, env={})
    assert cfg.dev_idp_max_token_lifetime_s == 12 * 3600
    assert (cfg.unauthenticated_rate_per_s, cfg.unauthenticated_burst) == (5.0, 20)
    assert cfg.unauthenticated_summary_interval_s == 10.0
    path = tmp_path / "broker.toml"
    path.write_text(
        "[auth]\ndev_idp_max_token_lifetime_s = 3600\nunauthenticated_rate_per_s = 2.5\n"
        "unauthenticated_burst = 4\n"
        "[audit]\nunauthenticated_summary_interval_s = 30\n"
        '[[auth.issuers]]\nissuer = "https://idp.example"\naudience = "certbroker"\n'
        'public_keys = ["a.pem"]\nmax_token_lifetime_s = 28800\n'
    )
    cfg = config.load(path, env={"CERTBROKER_UNAUTHENTICATED_RATE_PER_S": "3"})
    assert cfg.dev_idp_max_token_lifetime_s == 3600
    assert (cfg.unauthenticated_rate_per_s, cfg.unauthenticated_burst) == (3.0, 4)
    assert cfg.unauthenticated_summary_interval_s == 30
    assert cfg.issuers[0].max_token_lifetime_s == 28800
    path.write_text(
        '[[auth.issuers]]\nissuer = "a"\naudience = "b"\njwks = "j"\nmax_token_lifetime_s = -5\n'
    )
    with pytest.raises(ConfigError, match="max_token_lifetime_s"):
        config.load(path, env={})
