"""The generic SQL adapter against the real PostgreSQL on 127.0.0.1:5432 (database ``test``).

Each test works in a schema of its own (``t_<random>``), dropped afterwards. When the server is
unreachable the tests skip -- or fail when ``CI=true``, where it must be there.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.adapters import sdk
from certbroker.adapters.sql import ConfigError, SourceUnavailable, SqlAdapter
from certbroker.adapters.sql.database import PostgresDatabase
from certbroker.contract import fields as record_fields
from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests.adapters.tokens import BrokerKey
from tests.helpers import start_process

psycopg = pytest.importorskip("psycopg")

#: Tried in order; the first that connects is used.
URLS = [
    os.environ.get("CERTBROKER_TEST_POSTGRES", ""),
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
]
SUBJECT = resident_id.make("310104", dt.date(1975, 11, 30), 7)
OWNS_NOTHING = resident_id.make("310104", dt.date(1975, 11, 30), 8)
UNKNOWN = resident_id.make("310104", dt.date(1975, 11, 30), 9)


@dataclass
class Schema:
    """A fresh schema, and the adapter URL whose search_path points at it."""

    admin: Any  # a psycopg connection (autocommit) for setting up and inspecting
    name: str
    base_url: str

    @property
    def url(self) -> str:
        return f"{self.base_url}?options=-csearch_path%3D{self.name}"

    def run(self, sql: str, params: Any = None) -> list[Any]:
        with self.admin.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []


def _connect() -> tuple[Any, str]:
    errors = []
    for url in filter(None, URLS):
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=3), url
        except psycopg.OperationalError as exc:
            errors.append(f"{url}: {str(exc).strip().splitlines()[0]}")
    message = "PostgreSQL unreachable: " + "; ".join(errors)
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def schema() -> Iterator[Schema]:
    admin, url = _connect()
    name = f"t_{secrets.token_hex(6)}"
    admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield Schema(admin, name, url)
    finally:
        admin.execute(f"DROP SCHEMA {name} CASCADE")
        admin.close()


def property_tables(schema: Schema) -> None:
    schema.run(
        f"""
        CREATE TABLE {schema.name}.persons (rid text PRIMARY KEY, name text NOT NULL);
        CREATE TABLE {schema.name}.deeds (
            cert text PRIMARY KEY, rid text NOT NULL, addr text, area numeric(10, 2),
            kind text, pledged boolean, seized boolean, coowners text[], day date);
        INSERT INTO {schema.name}.persons VALUES
            ('{SUBJECT}', '赵敏'), ('{OWNS_NOTHING}', '钱程');
        INSERT INTO {schema.name}.deeds VALUES
            ('沪(2021)徐汇区不动产权第0000002号', '{SUBJECT}', '上海市徐汇区漕溪北路88号1201室',
             88.40, '住宅', true, false, ARRAY['孙立', '周芸'], DATE '2021-09-15'),
            ('沪(2012)徐汇区不动产权第0000001号', '{SUBJECT}', '上海市徐汇区天钥桥路12号地下车位',
             12.00, '车位', false, false, ARRAY[]::text[], DATE '2012-03-01');
        """
    )


PROPERTY = """
[adapter]
department = "natural_resources"
record_type = "property"
exists = "SELECT 1 FROM persons WHERE rid = :subject_id"

[database]
url = "{url}"

[[query]]
# A cast (::) and a literal % must reach PostgreSQL untouched.
sql = '''
SELECT cert, addr, area, kind, pledged, seized, coowners, day::date AS day,
       addr LIKE '%室' AS is_flat
FROM deeds WHERE rid = :subject_id::text ORDER BY day
'''
[query.columns]
cert = "holdings.certificate_number"
addr = "holdings.address"
area = "holdings.area_sqm"
kind = "holdings.usage"
pledged = "holdings.mortgaged"
seized = "holdings.seized"
coowners = "holdings.co_owner_names"
day = "holdings.registered_on"
"""


def configure(tmp_path: Path, text: str, **values: Any) -> Path:
    path = tmp_path / "dept.toml"
    path.write_text(text.format(**values), encoding="utf-8")
    return path


@pytest.mark.postgres
def test_rows_of_typed_columns_become_holdings(schema: Schema, tmp_path: Path) -> None:
    property_tables(schema)
    adapter = SqlAdapter.from_file(configure(tmp_path, PROPERTY, url=schema.url))
    try:
        paths = record_fields.field_paths("property")
        holdings = sdk.fetch_record(adapter, SUBJECT, paths).property.holdings
        assert [h.registered_on for h in holdings] == ["2012-03-01", "2021-09-15"]  # date → text
        assert [h.area_sqm for h in holdings] == [12.0, 88.4]  # numeric → double
        assert [h.mortgaged for h in holdings] == [False, True]
        assert [list(h.co_owner_names) for h in holdings] == [[], ["孙立", "周芸"]]  # text[]
        assert holdings[1].usage == "住宅"
        nothing = sdk.fetch_record(adapter, OWNS_NOTHING, paths)
        assert list(nothing.property.holdings) == []
        with pytest.raises(sdk.RecordNotFound):
            sdk.fetch_record(adapter, UNKNOWN, paths)
    finally:
        adapter.close()


SOCIAL = """
[adapter]
department = "human_resources_social_security"
record_type = "social_security"

[database]
url = "{url}"

[[query]]
sql = "SELECT name, months, pension, since FROM insured WHERE rid = :subject_id"
[query.columns]
name = "name"
months = "contribution_months"
pension = "monthly_pension_fen"
since = "insured_since"
"""


@pytest.mark.postgres
def test_one_row_records_with_integers_and_nulls(schema: Schema, tmp_path: Path) -> None:
    schema.run(
        f"""
        CREATE TABLE {schema.name}.insured (
            rid text PRIMARY KEY, name text, months integer, pension bigint, since timestamp);
        INSERT INTO {schema.name}.insured VALUES
            ('{SUBJECT}', '赵敏', 300, NULL, TIMESTAMP '1998-07-01 00:00:00');
        """
    )
    adapter = SqlAdapter.from_file(configure(tmp_path, SOCIAL, url=schema.url))
    try:
        fields = ["name", "contribution_months", "monthly_pension_fen", "insured_since"]
        record = sdk.fetch_record(adapter, SUBJECT, fields).social_security
        assert record.contribution_months == 300
        assert record.HasField("monthly_pension_fen")  # NULL: asked, no value
        assert record.monthly_pension_fen == 0
        assert record.insured_since == "1998-07-01T00:00:00"  # a timestamp stays a timestamp
        with pytest.raises(sdk.RecordNotFound):
            sdk.fetch_record(adapter, UNKNOWN, fields)
    finally:
        adapter.close()


@pytest.mark.postgres
def test_the_adapter_cannot_write(schema: Schema, tmp_path: Path) -> None:
    property_tables(schema)
    writing = PROPERTY.replace(
        "SELECT 1 FROM persons WHERE rid = :subject_id",
        "DELETE FROM persons WHERE rid = :subject_id RETURNING 1",
    )
    with pytest.raises(ConfigError) as caught:
        SqlAdapter.from_file(configure(tmp_path, writing, url=schema.url))
    assert caught.value.key == "adapter.exists"
    assert "read-only transaction" in caught.value.problem
    assert schema.run(f"SELECT count(*) FROM {schema.name}.persons") == [(2,)]


@pytest.mark.postgres
def test_slow_statements_are_cancelled_and_broken_connections_reopened(schema: Schema) -> None:
    db = PostgresDatabase(schema.url, statement_timeout_ms=200)
    try:
        with pytest.raises(SourceUnavailable, match="timed out"):
            db.query("SELECT pg_sleep(2), :subject_id::text", SUBJECT)
        assert db.query("SELECT :subject_id::text AS s", SUBJECT).rows == [(SUBJECT,)]
        # The server drops the connection (a restart, an operator): the next call reconnects.
        pid = db.query("SELECT pg_backend_pid() AS p, :subject_id::text", SUBJECT).rows[0][0]
        schema.run("SELECT pg_terminate_backend(%s)", (pid,))
        assert db.query("SELECT :subject_id::text AS s", SUBJECT).rows == [(SUBJECT,)]
    finally:
        db.close()


def test_an_unreachable_server_fails_at_start_without_echoing_the_password() -> None:
    with pytest.raises(ValueError, match="cannot connect to PostgreSQL") as caught:
        PostgresDatabase("postgresql://u:s3cret@127.0.0.1:1/none", statement_timeout_ms=100)
    assert "s3cret" not in str(caught.value)


@pytest.mark.postgres
def test_runs_as_a_process_over_grpc(schema: Schema, tmp_path: Path) -> None:
    property_tables(schema)
    key = BrokerKey()
    key_file = key.write_public(tmp_path / "broker.pem")
    config = configure(tmp_path, PROPERTY, url="postgresql://ignored@127.0.0.1/none")
    args = ["-m", "certbroker.adapters.sql", "--config", str(config), "--database-url", schema.url]
    args += ["--port", "0", "--broker-public-key", str(key_file)]
    started = start_process(args, tmp_path / "pg.log", "property")
    fields = ["holdings.certificate_number", "holdings.co_owner_names"]
    token = key.mint(
        department="natural_resources",
        subject_id=SUBJECT,
        record_type="property",
        fields=fields,
        decision_id="dec-pg",
    )
    request = adapter_pb2.FetchRequest(
        record_type="property", subject_id=SUBJECT, fields=fields, decision_id="dec-pg"
    )
    try:
        with grpc.insecure_channel(started.target) as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            reply = stub.Fetch(request, metadata=((sdk.METADATA_KEY, token),), timeout=10)
    finally:
        assert started.stop() == 0
    holdings = reply.record.property.holdings
    assert [list(h.co_owner_names) for h in holdings] == [[], ["孙立", "周芸"]]
    assert all(not h.HasField("address") for h in holdings)
    assert reply.department == "natural_resources"
