"""``certbroker audit pg-grants``: the GRANTs for a PostgreSQL role, printed for ``psql``.

The printed script is run on the real server (127.0.0.1:5432, a schema per test): a broker
role it was made for can append and read but not change or delete; an archiver role can also
delete, which the append-only triggers then limit to archived rows.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from certbroker.audit import open_audit_log
from certbroker.cli import main as cli
from certbroker.config import PostgresLocation
from tests.audit.pg_support import admin_url, fresh_schema, run_sql
from tests.audit.test_audit import make_event


def pg_grants(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["audit", "pg-grants", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_audit_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default schema comes from the configuration: none from the test runner's shell."""
    for name in ("CERTBROKER_AUDIT_SCHEMA", "CERTBROKER_AUDIT_DSN", "CERTBROKER_AUDIT_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_prints_one_statement_per_line_for_the_default_schema(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = pg_grants(capsys, "--role", "certbroker_app")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        'GRANT USAGE ON SCHEMA "certbroker" TO "certbroker_app";',
        'GRANT SELECT, INSERT ON "certbroker".audit_log, "certbroker".merkle_nodes, '
        '"certbroker".checkpoints, "certbroker".audit_entries, "certbroker".audit_terms '
        'TO "certbroker_app";',
        'GRANT SELECT ON "certbroker".audit_archives, "certbroker".audit_meta, '
        '"certbroker".audit_tombstones TO "certbroker_app";',
        'GRANT SELECT, INSERT, UPDATE ON "certbroker".audit_outbox TO "certbroker_app";',
    ]


def test_archiver_adds_delete_on_the_log_and_insert_on_archives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _code, broker, _err = pg_grants(capsys, "--role", "r", "--schema", "audit_x")
    code, archiver, err = pg_grants(capsys, "--role", "r", "--schema", "audit_x", "--archiver")
    assert (code, err) == (0, "")
    assert archiver.splitlines()[:4] == broker.splitlines()
    assert archiver.splitlines()[4:] == [
        'GRANT INSERT ON "audit_x".audit_archives, "audit_x".audit_tombstones TO "r";',
        'GRANT DELETE ON "audit_x".audit_log, "audit_x".audit_entries TO "r";',
    ]
    # UPDATE only on the notice outbox (its relay marks notices sent), never an audit table.
    assert [line for line in archiver.splitlines() if "UPDATE" in line] == [
        'GRANT SELECT, INSERT, UPDATE ON "audit_x".audit_outbox TO "r";'
    ]
    assert "TRUNCATE" not in archiver


def test_schema_comes_from_the_configuration_file_and_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text('[audit]\ndsn = "postgresql://db.example/audit"\nschema = "hall_audit"\n')
    code, out, _err = pg_grants(capsys, "--role", "app", "--config", str(toml))
    assert code == 0
    assert out.startswith('GRANT USAGE ON SCHEMA "hall_audit" TO "app";')
    monkeypatch.setenv("CERTBROKER_AUDIT_SCHEMA", "from_env")
    _code, out, _err = pg_grants(capsys, "--role", "app")
    assert out.startswith('GRANT USAGE ON SCHEMA "from_env" TO "app";')
    _code, out, _err = pg_grants(capsys, "--role", "app", "--schema", "flag_wins")
    assert out.startswith('GRANT USAGE ON SCHEMA "flag_wins" TO "app";')


def test_role_names_are_quoted_not_interpolated(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = pg_grants(capsys, "--role", 'x"; DROP SCHEMA certbroker; --')
    assert code == 0
    assert out.splitlines()[0] == (
        'GRANT USAGE ON SCHEMA "certbroker" TO "x""; DROP SCHEMA certbroker; --";'
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--role", ""], "--role: 1 to 63 bytes"),
        (["--role", "r" * 64], "--role: 1 to 63 bytes"),  # PostgreSQL would truncate it
        (["--role", "汉" * 22], "--role: 1 to 63 bytes"),  # 66 bytes in UTF-8
        (["--role", "a\nb"], "printable characters only"),
        (["--role", "r", "--schema", "Audit"], "--schema 'Audit': lowercase letters"),
        (["--role", "r", "--schema", "a;b"], "--schema 'a;b': lowercase letters"),
    ],
)
def test_refuses_names_it_cannot_grant_to_safely(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, out, err = pg_grants(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err


def test_a_broken_configuration_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    toml = tmp_path / "broker.toml"
    toml.write_text('[audit]\nschema = "Not-Valid"\n')
    code, out, err = pg_grants(capsys, "--role", "r", "--config", str(toml))
    assert (code, out) == (2, "")
    assert "audit.schema" in err


def test_without_the_postgresql_driver_it_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command needs psycopg only to quote the names: an SQLite-only install gets a usage
    # error naming the missing driver, not a traceback.
    monkeypatch.setitem(sys.modules, "psycopg", None)
    code, out, err = pg_grants(capsys, "--role", "certbroker_app")
    assert (code, out) == (2, "")
    assert "PostgreSQL driver is not installed" in err


def test_role_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["audit", "pg-grants"])
    assert exc.value.code == 2
    assert "--role" in capsys.readouterr().err


# --- the printed script on the real server --------------------------------------------------


@pytest.fixture
def pg() -> Iterator[PostgresLocation]:
    with fresh_schema() as location:
        append(location, 2, "owner")  # the first writer (here the owner) creates the schema
        yield location


def append(location: PostgresLocation, n: int, clerk: str) -> None:
    async def go() -> None:
        async with open_audit_log(location) as log:
            for i in range(n):
                await log.append(make_event(clerk=f"{clerk}-{i}"))

    asyncio.run(go())


MakeRole = Callable[[], tuple[str, PostgresLocation]]


@pytest.fixture
def make_role(pg: PostgresLocation) -> Iterator[MakeRole]:
    """Creates LOGIN roles (mixed case and a space: the quoting must hold) and drops them."""
    admin = psycopg.connect(admin_url(), autocommit=True)
    made: list[str] = []

    def make() -> tuple[str, PostgresLocation]:
        name = f"Cb Role {secrets.token_hex(5)}"
        admin.execute(f'CREATE ROLE "{name}" LOGIN'.encode())
        made.append(name)
        return name, PostgresLocation(psycopg.conninfo.make_conninfo(pg.dsn, user=name), pg.schema)

    try:
        yield make
    finally:
        for name in made:
            admin.execute(f'DROP OWNED BY "{name}"'.encode())
            admin.execute(f'DROP ROLE IF EXISTS "{name}"'.encode())
        admin.close()


def _grant(capsys: pytest.CaptureFixture[str], role: str, schema: str, *extra: str) -> None:
    """What an operator does: ``certbroker audit pg-grants ... | psql`` as the owner."""
    code, script, _err = pg_grants(capsys, "--role", role, "--schema", schema, *extra)
    assert code == 0
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(script.encode())  # the whole printed script, as psql would run it


@pytest.mark.postgres
def test_printed_grants_let_a_broker_role_append_and_nothing_more(
    capsys: pytest.CaptureFixture[str], pg: PostgresLocation, make_role: MakeRole
) -> None:
    name, as_role = make_role()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # before the grants: nothing
        run_sql(as_role, f"SELECT count(*) FROM {pg.schema}.audit_log")
    _grant(capsys, name, pg.schema)
    append(as_role, 3, "app")
    assert run_sql(as_role, "SELECT count(*) FROM audit_log") == [(5,)]
    for statement in ("DELETE FROM audit_log WHERE seq = 1", "UPDATE audit_log SET clerk = 'x'"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            run_sql(as_role, statement)


@pytest.mark.postgres
def test_printed_archiver_grants_allow_delete_which_the_triggers_then_limit(
    capsys: pytest.CaptureFixture[str], pg: PostgresLocation, make_role: MakeRole
) -> None:
    name, as_role = make_role()
    _grant(capsys, name, pg.schema, "--archiver")
    append(as_role, 1, "archiver")
    # The privilege is there (no "permission denied"): the append-only trigger refuses it,
    # because no entry has been archived yet.
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        run_sql(as_role, "DELETE FROM audit_log WHERE seq = 1")
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
        run_sql(as_role, "UPDATE audit_archives SET file_name = 'x'")
    assert run_sql(as_role, "SELECT count(*) FROM audit_log") == [(3,)]
