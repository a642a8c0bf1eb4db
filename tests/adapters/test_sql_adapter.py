"""The generic SQL adapter over SQLite: in-process, and as a real process over gRPC."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from certbroker.adapters import demo, sdk
from certbroker.adapters.demo import synthetic
from certbroker.adapters.sql import AmbiguousRecord, ConfigError, SqlAdapter, SqlConfig, load
from certbroker.adapters.sql.database import Result, SqliteDatabase
from certbroker.contract import fields as record_fields
from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests.adapters.tokens import BrokerKey
from tests.helpers import ROOT, start_process

EXAMPLES = ROOT / "certbroker" / "adapters" / "sql" / "examples"
SUBJECT = resident_id.make("110101", dt.date(1990, 3, 7), 123)
OWNS_NOTHING = resident_id.make("110101", dt.date(1990, 3, 7), 555)
UNKNOWN = resident_id.make("110101", dt.date(1990, 3, 7), 999)


def example(record_type: str, dataset_dir: Path) -> SqlAdapter:
    url = f"sqlite:///{synthetic.dataset_path(dataset_dir, record_type)}"
    return SqlAdapter.from_file(EXAMPLES / f"{record_type}.toml", url=url)


@pytest.mark.parametrize("record_type", sorted(synthetic.DATASETS))
def test_the_examples_serve_what_the_demo_adapters_serve(
    dataset_dir: Path, unknown_id: str, record_type: str
) -> None:
    # No code: the TOML files reproduce the hand-written demo adapters record for record.
    sql = example(record_type, dataset_dir)
    coded = demo.open_adapter(record_type, dataset_dir)
    paths = record_fields.field_paths(record_type)
    try:
        assert sql.department == coded.department
        subjects = synthetic.sample_citizens(dataset_dir, 40)
        subjects += list(synthetic.sample_couple(dataset_dir))
        for subject in subjects:
            assert sdk.fetch_record(sql, subject, paths) == sdk.fetch_record(coded, subject, paths)
        with pytest.raises(sdk.RecordNotFound):
            sdk.fetch_record(sql, unknown_id, paths)
    finally:
        sql.close()
        demo.close_all([coded])


# -- semantics, over a small database of the test's own ---------------------------------------

SCHEMA = f"""
CREATE TABLE persons (rid TEXT PRIMARY KEY, name TEXT, hh INTEGER, since TEXT);
CREATE TABLE deeds (cert TEXT, rid TEXT, area REAL, pledged INTEGER, coowners TEXT, day TEXT);
INSERT INTO persons VALUES ('{SUBJECT}', '王芳', 330825001, '2001-02-03');
INSERT INTO persons VALUES ('{OWNS_NOTHING}', '无房户', 7, NULL);
INSERT INTO deeds VALUES ('C-2', '{SUBJECT}', 96.5, 1, '李雷,韩梅梅', '2019-06-01');
INSERT INTO deeds VALUES ('C-1', '{SUBJECT}', 50, 0, NULL, '2010-01-01');
"""

CONFIG = """
[adapter]
department = "natural_resources"
record_type = "property"
exists = "SELECT 1 FROM persons WHERE rid = :subject_id"

[database]
url = "sqlite:///dept.sqlite"

[[query]]
sql = "SELECT cert, area, pledged, coowners, day FROM deeds WHERE rid = :subject_id ORDER BY day"
[query.columns]
cert = "holdings.certificate_number"
area = "holdings.area_sqm"
pledged = "holdings.mortgaged"
coowners = { field = "holdings.co_owner_names", split = "," }
day = "holdings.registered_on"
"""


@dataclass
class Counting:
    """A database recording the SQL it runs."""

    inner: SqliteDatabase
    ran: list[str] = field(default_factory=list)

    def query(self, sql: str, subject_id: str) -> Result:
        self.ran.append(sql)
        return self.inner.query(sql, subject_id)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def dept(tmp_path: Path) -> Path:
    db = sqlite3.connect(tmp_path / "dept.sqlite")
    db.executescript(SCHEMA)
    db.close()
    return tmp_path


def adapter_for(dept: Path, text: str) -> tuple[SqlAdapter, Counting]:
    path = dept / "dept.toml"
    path.write_text(text, encoding="utf-8")
    config: SqlConfig = load(path)
    counting = Counting(SqliteDatabase(dept / "dept.sqlite"))
    return SqlAdapter(config, counting), counting


def test_rows_become_list_items_with_converted_values(dept: Path) -> None:
    adapter, _ = adapter_for(dept, CONFIG)
    paths = record_fields.field_paths("property")
    holdings = sdk.fetch_record(adapter, SUBJECT, paths).property.holdings
    assert [h.certificate_number for h in holdings] == ["C-1", "C-2"]  # the query's order
    assert [h.area_sqm for h in holdings] == [50.0, 96.5]
    assert [h.mortgaged for h in holdings] == [False, True]  # 0/1 became booleans
    assert [list(h.co_owner_names) for h in holdings] == [[], ["李雷", "韩梅梅"]]
    assert holdings[1].registered_on == "2019-06-01"
    assert holdings[1].HasField("address")  # asked, not mapped: present and empty
    assert holdings[1].address == ""


def test_exists_tells_owning_nothing_from_unknown(dept: Path) -> None:
    adapter, _ = adapter_for(dept, CONFIG)
    record = sdk.fetch_record(adapter, OWNS_NOTHING, ["holdings.address"])
    assert record.WhichOneof("record") == "property"
    assert list(record.property.holdings) == []
    with pytest.raises(sdk.RecordNotFound):
        sdk.fetch_record(adapter, UNKNOWN, ["holdings.address"])


def test_without_exists_the_first_query_decides(dept: Path) -> None:
    text = CONFIG.replace('exists = "SELECT 1 FROM persons WHERE rid = :subject_id"\n', "")
    adapter, _ = adapter_for(dept, text)
    with pytest.raises(sdk.RecordNotFound):  # known, but no rows: not found without `exists`
        sdk.fetch_record(adapter, OWNS_NOTHING, ["holdings.address"])


HOUSEHOLD = """
[adapter]
department = "public_security"
record_type = "household"

[database]
url = "sqlite:///dept.sqlite"

[[query]]
sql = "SELECT name, hh, since FROM persons WHERE rid = :subject_id"
columns = { name = "name", hh = "household_number", since = "birth_date" }

[[query]]
sql = "SELECT name, rid FROM persons WHERE rid != :subject_id ORDER BY rid"
columns = { name = "members.name", rid = "members.resident_id" }
"""


def test_queries_run_only_for_asked_fields(dept: Path) -> None:
    adapter, counting = adapter_for(dept, HOUSEHOLD)
    assert len(counting.ran) == 2  # the start-up check ran each query once
    counting.ran.clear()
    record = sdk.fetch_record(adapter, SUBJECT, ["household_number"]).household
    assert record.household_number == "330825001"  # an integer column, a text field
    assert len(counting.ran) == 1  # the members query did not run
    record = sdk.fetch_record(adapter, SUBJECT, ["members"]).household
    assert [m.name for m in record.members] == ["无房户"]
    assert len(counting.ran) == 3  # the first query always runs: it decides "known"


def test_several_rows_for_one_record_are_an_error_not_a_guess(dept: Path) -> None:
    # Every person's row, whoever is asked about: a broken query, or duplicated data.
    text = HOUSEHOLD.replace(
        "FROM persons WHERE rid = :subject_id", "FROM persons WHERE :subject_id = :subject_id"
    )
    adapter, _ = adapter_for(dept, text)
    with pytest.raises(AmbiguousRecord, match="query\\[1\\] returned"):
        sdk.fetch_record(adapter, SUBJECT, ["name"])


def test_start_up_checks_the_sql_against_the_database(dept: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        adapter_for(dept, CONFIG.replace('day = "holdings.registered_on"', 'dy = "holdings.usage"'))
    assert caught.value.key == "query[1].columns.dy"
    assert "not a column of the query's result (cert, area, pledged, coowners, day)" in str(
        caught.value
    )
    with pytest.raises(ConfigError) as caught:
        adapter_for(dept, CONFIG.replace("FROM deeds", "FROM deedz"))
    assert caught.value.key == "query[1].sql"
    assert "does not run" in caught.value.problem
    with pytest.raises(ValueError, match="database file not found"):
        SqlAdapter.from_file(EXAMPLES / "marriage.toml", url="sqlite:///nowhere/marriage.sqlite")


def test_the_database_is_read_only(dept: Path) -> None:
    writing = CONFIG.replace(
        'exists = "SELECT 1 FROM persons WHERE rid = :subject_id"',
        'exists = "DELETE FROM persons WHERE rid = :subject_id RETURNING 1"',
    )
    with pytest.raises(ConfigError, match=r"adapter\.exists: does not run"):
        adapter_for(dept, writing)
    db = sqlite3.connect(dept / "dept.sqlite")
    assert db.execute("SELECT count(*) FROM persons").fetchone() == (2,)
    db.close()


# -- a real process -----------------------------------------------------------------------------


def test_runs_as_a_process_over_grpc(dataset_dir: Path, tmp_path: Path) -> None:
    key = BrokerKey()
    key_file = key.write_public(tmp_path / "broker.pem")
    url = f"sqlite:///{synthetic.dataset_path(dataset_dir, 'marriage')}"
    args = ["-m", "certbroker.adapters.sql", "--config", str(EXAMPLES / "marriage.toml")]
    args += ["--database-url", url, "--port", "0", "--broker-public-key", str(key_file)]
    started = start_process(args, tmp_path / "sql.log", "marriage")
    husband, wife = synthetic.sample_couple(dataset_dir)
    fields = ["marital_status", "spouse_resident_id"]
    token = key.mint(
        department="civil_affairs",
        subject_id=husband,
        record_type="marriage",
        fields=fields,
        decision_id="dec-sql",
    )
    request = adapter_pb2.FetchRequest(
        record_type="marriage", subject_id=husband, fields=fields, decision_id="dec-sql"
    )
    try:
        with grpc.insecure_channel(started.target) as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            reply = stub.Fetch(request, metadata=((sdk.METADATA_KEY, token),), timeout=10)
    finally:
        assert started.stop() == 0
    assert reply.department == "civil_affairs"
    assert reply.record.marriage.marital_status == "已婚"
    assert reply.record.marriage.spouse_resident_id == wife
    assert not reply.record.marriage.HasField("spouse_name")
    assert "decision_id='dec-sql'" in started.log.read_text()


def test_a_bad_config_stops_the_process_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(CONFIG.replace('"holdings.area_sqm"', '"holdings.price"'), encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "certbroker.adapters.sql",
            "--config",
            str(path),
            "--no-decision-token",
        ],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert f"{path}: query[1].columns.area: unknown property field 'holdings.price'" in done.stderr
