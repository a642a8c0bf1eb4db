from __future__ import annotations

from pathlib import Path

import pytest

from certbroker import config
from certbroker.config import AdapterRoute, ArchiveSchedule, ConfigError, PostgresLocation


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


@pytest.mark.parametrize(
    "text",
    [
        "[auth]\ndev_idp_max_token_lifetime_s = 0\n",
        "[auth]\nunauthenticated_rate_per_s = 0\n",
        "[auth]\nunauthenticated_burst = 0\n",
        "[audit]\nunauthenticated_summary_interval_s = -1\n",
        '[[auth.issuers]]\nissuer = "a"\naudience = "b"\njwks = "j"\nmax_token_lifetime_s = -5\n',
    ],
)
def test_bad_caller_hardening_settings(tmp_path: Path, text: str) -> None:
    path = tmp_path / "broker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        config.load(path, env={})
