"""A record type declared in the policy catalogue alone, end to end: files only, no Python.

The test writes a new record type (机动车, ``vehicle``) into a copy of the shipped catalogue,
a matter and a rule that need it, and a SQL adapter configuration with its SQLite data; reloads
the running broker's policies (the SIGHUP path); starts the SQL adapter process, which registers
itself; and looks records up over gRPC. Then a hostile adapter, registered for the same type,
answers with a value of the wrong type, an undeclared field and an oversize value.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from concurrent import futures
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import audit
from certbroker.cli import client
from certbroker.contract import generic, resident_id
from certbroker.v1 import (
    adapter_pb2,
    adapter_pb2_grpc,
    broker_pb2,
    records_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.cache_support import reload_policies, write_policies
from tests.helpers import AdapterProcess, Env, FakeClock, make_config, running_env, start_process

CASE = "GZ20261121-000888"
MATTER = "CL-ZM-001"

CATALOGUE = """
  - name: vehicle              # 机动车: declared here alone
    label: 机动车登记
    department: vehicle_admin
    cache_ttl_s: 600
    limits: {max_string_chars: 64}
    fields:
      - {name: plate, type: string, label: 号牌号码, personal: true, masks: [last4]}
      - {name: brand, type: string, label: 品牌}
      - {name: status, type: enum, label: 状态, values: [正常, 抵押, 查封]}
      - {name: registered_on, type: date, label: 初次登记日期}
      - {name: price, type: decimal, label: 购置价（元）}
      - {name: seats, type: integer, label: 核定载客}
      - {name: electric, type: boolean, label: 新能源}
      - {name: checked_at, type: timestamp, label: 数据时间}
      - name: owner
        type: group
        label: 所有人
        fields:
          - {name: name, type: string, label: 姓名, masks: [surname]}
      - name: transfers
        type: repeated_group
        label: 转移登记
        fields:
          - {name: day, type: date, label: 日期}
          - {name: fee, type: decimal, label: 费用（元）}
"""
DEPARTMENT = """
  - id: vehicle_admin
    name: 公安局交通管理局（车辆管理所）
    endpoints: [{hosts: ["127.0.0.0/8"], ports: ["1024-65535"]}]
"""
MATTER_YAML = f"""
  - code: {MATTER}
    name: 车辆相关证明
    needs:
      vehicle: [plate, brand, status, registered_on, price, electric, checked_at,
                owner.name, transfers.day, transfers.fee]   # not seats
"""
RULE = f"""
  - id: window-clerk-vehicle
    roles: [window_clerk]
    matters: [{MATTER}]
    masks:
      vehicle: {{plate: last4}}
"""
ADAPTER_TOML = """
[adapter]
department = "vehicle_admin"
record_type = "vehicle"
exists = "SELECT 1 FROM vehicles WHERE owner_id = :subject_id"

[database]
url = "sqlite:///vehicle.sqlite"

[schema]
plate = "string"
brand = "string"
status = "enum"
registered_on = "date"
price = "decimal"
seats = "integer"
electric = "boolean"
checked_at = "timestamp"
vin = "string"
owner = { type = "group", fields = { name = "string" } }
transfers = { type = "repeated_group", fields = { day = "date", fee = "decimal" } }

[[query]]
sql = '''SELECT plate, brand, status, registered_on, price, seats, electric, checked_at, vin
         FROM vehicles WHERE owner_id = :subject_id'''
[query.columns]
plate = "plate"
brand = "brand"
status = "status"
registered_on = "registered_on"
price = "price"
seats = "seats"
electric = "electric"
checked_at = "checked_at"
vin = "vin"

[[query]]
sql = "SELECT owner_name FROM vehicles WHERE owner_id = :subject_id"
[query.columns]
owner_name = "owner.name"

[[query]]
sql = "SELECT day, fee FROM transfers WHERE owner_id = :subject_id ORDER BY day"
[query.columns]
day = "transfers.day"
fee = "transfers.fee"
"""


def add_vehicle_type(policy_dir: Path) -> None:
    """Declare the type, its department, a matter and a rule: YAML only."""
    catalogue = policy_dir / "catalogue.yaml"
    text = catalogue.read_text(encoding="utf-8")
    text = text.replace("\nrecord_types:\n", DEPARTMENT + "\nrecord_types:\n", 1)
    catalogue.write_text(text + CATALOGUE, encoding="utf-8")
    (policy_dir / "vehicle.yaml").write_text(
        "matters:" + MATTER_YAML + "rules:" + RULE, encoding="utf-8"
    )


def write_adapter(directory: Path, owner: str) -> Path:
    """The department's side: a SQLite file and the SQL adapter's configuration."""
    directory.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(directory / "vehicle.sqlite")) as db:
        db.executescript(
            """
            CREATE TABLE vehicles (owner_id TEXT, owner_name TEXT, plate TEXT, brand TEXT,
              status TEXT, registered_on TEXT, price TEXT, seats INTEGER, electric INTEGER,
              checked_at TEXT, vin TEXT);
            CREATE TABLE transfers (owner_id TEXT, day TEXT, fee TEXT);
            """
        )
        db.execute(
            "INSERT INTO vehicles VALUES (?, '王伟', '粤A12345', '比亚迪', '正常', "
            "'2021-05-06', '189800.00', 5, 1, '2026-06-30T08:00:00+08:00', 'LGXC16DF9M0000001')",
            (owner,),
        )
        db.executemany(
            "INSERT INTO transfers VALUES (?, ?, ?)",
            [(owner, "2022-01-10", "500.00"), (owner, "2024-03-02", "500.00")],
        )
        db.commit()
    config = directory / "vehicle.toml"
    config.write_text(ADAPTER_TOML, encoding="utf-8")
    return config


def lookup(env: Env, subject: str, fields: tuple[str, ...] = ()) -> broker_pb2.LookupResponse:
    token = env.token(("window_clerk",), "gz-haizhu-hall-01")
    request = client.lookup_request("vehicle", subject, MATTER, CASE, "id_card_read", "", fields)
    response: broker_pb2.LookupResponse = env.stub.Lookup(
        request, metadata=env.md(token), timeout=30
    )
    return response


def register(env: Env, endpoint: str) -> str:
    """Register an instance of vehicle_admin at ``endpoint`` (what --register does)."""
    stub = registry_pb2_grpc.RegistryStub(env.channel)
    reply = stub.Register(
        registry_pb2.RegisterRequest(
            department="vehicle_admin",
            record_types=["vehicle"],
            endpoint=endpoint,
            schema_version="certbroker.v1",
        ),
        metadata=client.bearer(env.idp.issue_department("vehicle_admin")),
        timeout=10,
    )
    return str(reply.instance_id)


def deregister(env: Env, instance_id: str) -> None:
    stub = registry_pb2_grpc.RegistryStub(env.channel)
    stub.Deregister(
        registry_pb2.DeregisterRequest(instance_id=instance_id),
        metadata=client.bearer(env.idp.issue_department("vehicle_admin")),
        timeout=10,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("declared")
    policy_dir = write_policies(tmp / "policies")
    # One failure opens a breaker; the fake clock lets each test start with it half-open.
    cfg = make_config(
        tmp, dataset_dir, policy_dir=policy_dir, adapter_timeout_s=30.0, breaker_failures=1
    )
    clock = FakeClock(0.0)
    # The test's rule has no conditions: hall hours do not matter here.
    with running_env(cfg, dataset_dir, breaker_clock=clock) as env:
        yield tmp, policy_dir, env, clock


def owner_id() -> str:
    return resident_id.make("440106", dt.date(1990, 2, 3), 17)


def test_a_record_type_declared_in_files_only_is_served_end_to_end(world: Any) -> None:
    tmp, policy_dir, env, _clock = world
    subject = owner_id()
    with pytest.raises(grpc.RpcError) as before:  # not declared yet
        lookup(env, subject)
    assert client.call_error(before.value).reason == "UNKNOWN_RECORD_TYPE"

    add_vehicle_type(policy_dir)
    reload_policies(env.broker)  # the SIGHUP path: no restart
    config = write_adapter(tmp / "vehicle_admin", subject)
    adapter = start_sql_adapter(env, config, tmp)
    try:
        first = lookup(env, subject)
        assert first.record.WhichOneof("record") == "generic"
        data = generic.to_dict(first.record.generic)
        assert first.record.generic.record_type == "vehicle"
        assert data["plate"] == "*" * (len("粤A12345") - 4) + "2345"  # masked, last4
        assert data["brand"] == "比亚迪"
        assert data["status"] == "正常"
        assert data["registered_on"] == "2021-05-06"
        assert data["price"] == "189800.00"
        assert data["electric"] is True
        assert "seats" not in data  # the matter does not need it
        assert list(first.withheld_fields) == ["seats"]
        assert data["checked_at"] == dt.datetime(2026, 6, 30, 0, 0, tzinfo=dt.UTC)
        assert data["owner"] == {"name": "王伟"}
        assert data["transfers"] == [
            {"day": "2022-01-10", "fee": "500.00"},
            {"day": "2024-03-02", "fee": "500.00"},
        ]
        assert "vin" not in data  # the adapter serves it; the catalogue does not declare it
        assert list(first.masked_fields) == ["plate"]
        assert not first.from_cache

        # A field the request does not need is withheld, and named as such.
        narrow = lookup(env, subject, ("brand", "transfers.fee"))
        narrow_data = generic.to_dict(narrow.record.generic)
        assert narrow_data == {"brand": "比亚迪", "transfers": [{"fee": "500.00"}] * 2}
        assert "plate" not in narrow_data
        assert list(narrow.withheld_fields) == []  # both requested fields were released

        again = lookup(env, subject)
        assert again.from_cache  # cache_ttl_s 600
        assert again.record == first.record
        calls = adapter.log.read_text().count("decision_id=")
        assert calls == 2  # the full and the narrow release; the cache answered the third

        entries = audit.query(env.broker.config.audit_file, audit.QueryFilter())
        mine = {e.entry_id: e.event for e in entries}
        event = mine[first.receipt.entry_id]
        assert (event.kind, event.record_type, event.decision, event.outcome) == (
            "lookup",
            "vehicle",
            "allow",
            "OK",
        )
        assert event.department == "vehicle_admin"
        assert mine[again.receipt.entry_id].from_cache

        described = env.stub.DescribeRecordType(
            broker_pb2.DescribeRecordTypeRequest(record_type="vehicle"),
            metadata=env.md(env.token()),
            timeout=10,
        )
        (schema,) = described.record_types
        assert (schema.name, schema.label, schema.generic) == ("vehicle", "机动车登记", True)
        plate = schema.fields[0]
        assert (plate.label, plate.type, plate.personal, list(plate.masks)) == (
            "号牌号码",
            "string",
            True,
            ["last4"],
        )
        assert client.labels_of(described)["transfers.fee"] == "费用（元）"
    finally:
        adapter.stop()


def start_sql_adapter(env: Env, config: Path, tmp: Path) -> AdapterProcess:
    credential = tmp / "vehicle_admin.jwt"
    credential.write_text(env.idp.issue_department("vehicle_admin") + "\n")
    assert env.broker.broker is not None
    return start_process(
        [
            "-m",
            "certbroker.adapters.sql",
            "--config",
            str(config),
            "--port",
            "0",
            "--register",
            env.broker.target,
            "--credential-file",
            str(credential),
            "--broker-public-key",
            str(env.broker.broker.signer.public_key_path),
        ],
        tmp / "vehicle_admin.log",
        "vehicle",
    )


# --- a hostile adapter for a declared type -----------------------------------------------


def value(name: str, **kw: Any) -> records_pb2.FieldValue:
    return records_pb2.FieldValue(name=name, **kw)


HOSTILE = {
    "wrong_type": [value("seats", string_value="five")],
    "undeclared": [value("brand", string_value="x"), value("engine_number", string_value="E1")],
    "undeclared_in_group": [
        value(
            "owner", group_value=records_pb2.FieldGroup(fields=[value("phone", string_value="1")])
        )
    ],
    "oversize": [value("brand", string_value="比" * 65)],
    "bad_enum": [value("status", enum_value="报废")],
    "bad_decimal": [value("price", decimal_value="1e9")],
    "duplicate": [value("brand", string_value="a"), value("brand", string_value="b")],
    "typed_instead": None,
}
PROBLEMS = {
    "wrong_type": ("WRONG_TYPE", "seats"),
    "undeclared": ("UNDECLARED_FIELD", "engine_number"),
    "undeclared_in_group": ("UNDECLARED_FIELD", "owner.phone"),
    "oversize": ("STRING_TOO_LONG", "brand"),
    "bad_enum": ("BAD_VALUE", "status"),
    "bad_decimal": ("BAD_VALUE", "price"),
    "duplicate": ("DUPLICATE_FIELD", "brand"),
    "typed_instead": ("WRONG_RECORD_TYPE", ""),
}


class HostileVehicles(adapter_pb2_grpc.DepartmentAdapterServicer):
    mode = "wrong_type"

    def Fetch(self, request: adapter_pb2.FetchRequest, context: Any) -> adapter_pb2.FetchResponse:
        reply = adapter_pb2.FetchResponse(department="vehicle_admin", subject_id=request.subject_id)
        reply.as_of.FromDatetime(dt.datetime.now(dt.UTC))
        fields = HOSTILE[self.mode]
        if fields is None:
            reply.record.marriage.marital_status = "已婚"
        else:
            reply.record.generic.record_type = "vehicle"
            reply.record.generic.fields.extend(fields)
        return reply


@pytest.mark.parametrize("mode", list(HOSTILE))
def test_hostile_answers_for_a_declared_type_are_refused(world: Any, mode: str) -> None:
    _tmp, policy_dir, env, clock = world
    clock.advance(60)  # past breaker_reset_s: an earlier test's open breaker lets one call by
    if "vehicle" not in (policy_dir / "catalogue.yaml").read_text(encoding="utf-8"):
        add_vehicle_type(policy_dir)
        reload_policies(env.broker)
    service = HostileVehicles()
    service.mode = mode
    server = grpc.server(futures.ThreadPoolExecutor(2))
    adapter_pb2_grpc.add_DepartmentAdapterServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    instance = register(env, f"127.0.0.1:{port}")
    subject = resident_id.make("440106", dt.date(1991, 4, 5), 100 + list(HOSTILE).index(mode))
    try:
        with pytest.raises(grpc.RpcError) as info:
            lookup(env, subject)
        err = client.call_error(info.value)
        problem, field = PROBLEMS[mode]
        assert (err.code, err.reason) == ("UNAVAILABLE", "ADAPTER_BAD_RESPONSE")
        assert err.metadata["problem"] == problem
        assert err.metadata.get("field", "") == field
        assert err.metadata["department"] == "vehicle_admin"
        entries = audit.query(env.broker.config.audit_file, audit.QueryFilter())
        (entry,) = [e for e in entries if e.entry_id == err.metadata["audit_entry_id"]]
        assert (entry.event.record_type, entry.event.outcome, entry.event.decision) == (
            "vehicle",
            "ADAPTER_BAD_RESPONSE",
            "allow",
        )
        assert env.broker.broker is not None
        assert str(env.broker.broker.breakers.state("vehicle_admin")) == "open"  # counted
    finally:
        deregister(env, instance)
        server.stop(0)


def test_the_embedded_default_serves_the_shipped_declared_types(
    tmp_path: Path, dataset_dir: Path
) -> None:
    """GJJ-TQ-001 with the demo data: housing_fund and credit from the in-process SQL adapter,
    decided on a Wednesday morning (the rule keeps the staffed hall's opening hours)."""
    wednesday_10 = dt.datetime(2026, 11, 18, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    cfg = make_config(tmp_path, dataset_dir)
    with running_env(cfg, dataset_dir, decision_clock=lambda: wednesday_10) as env:
        token = env.token(("window_clerk",), "gz-haizhu-hall-01")
        found: dict[str, dict[str, object]] = {}
        # Citizens with a housing-fund account and a credit report in the demo data.
        with closing(sqlite3.connect(env.dataset_dir / "housing_fund.sqlite")) as db:
            db.execute("ATTACH DATABASE ? AS credit", (str(env.dataset_dir / "credit.sqlite"),))
            both = [
                row[0]
                for row in db.execute(
                    "SELECT a.resident_id FROM accounts a JOIN credit.reports r"
                    " USING (resident_id) ORDER BY a.resident_id LIMIT 3"
                )
            ]
        assert both, "the demo data has citizens with both records"
        for husband in both:
            request = client.lookup_matter_request(
                "GJJ-TQ-001", CASE, [(husband, "applicant")], "id_card_read", ""
            )
            reply = env.stub.LookupMatter(request, metadata=env.md(token), timeout=60)
            by_type = {item.record_type: item for item in reply.items}
            assert set(by_type) == {"property", "marriage", "housing_fund", "credit"}
            for record_type in ("housing_fund", "credit"):
                item = by_type[record_type]
                assert item.WhichOneof("result") == "response", item.error
                assert item.response.record.generic.record_type == record_type
                found.setdefault(record_type, generic.to_dict(item.response.record.generic))
        assert set(found) == {"housing_fund", "credit"}, found  # both served, in process
        assert "name" not in found["credit"]  # not a field the matter needs
        assert "report_number" not in found["credit"]
        account = found["housing_fund"]["account_number"]
        assert isinstance(account, str)
        assert account.startswith("*")  # masked last4
        assert "opened_on" not in found["housing_fund"]
