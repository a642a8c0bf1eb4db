"""certbroker.contract.generic: building, checking, minimizing and masking generic records."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest

from certbroker.contract import fields, generic
from certbroker.v1 import records_pb2

SCHEMA = generic.RecordSchema(
    "housing_fund",
    (
        generic.FieldSpec("account_number", "string", masks=("last4",)),
        generic.FieldSpec("account_status", "enum", values=("正常", "封存")),
        generic.FieldSpec("balance", "decimal"),
        generic.FieldSpec("months", "integer"),
        generic.FieldSpec("loan", "boolean"),
        generic.FieldSpec("opened_on", "date"),
        generic.FieldSpec("updated_at", "timestamp"),
        generic.FieldSpec("employer", "group", fields=(generic.FieldSpec("name", "string"),)),
        generic.FieldSpec(
            "deposits",
            "repeated_group",
            fields=(generic.FieldSpec("month", "date"), generic.FieldSpec("amount", "decimal")),
        ),
    ),
)
DATA = {
    "account_number": "440100001234",
    "account_status": "正常",
    "balance": decimal.Decimal("1234.50"),
    "months": 12.0,
    "loan": 1,
    "opened_on": dt.date(2020, 1, 2),
    "updated_at": "2026-06-30T10:00:00+08:00",
    "employer": {"name": "某公司"},
    "deposits": [{"month": "2026-06-01", "amount": 100}, {"month": "2026-05-01", "amount": "99.5"}],
    "undeclared": "never sent",
}


def test_paths_cover_leaves_in_declaration_order() -> None:
    assert SCHEMA.paths == (
        "account_number",
        "account_status",
        "balance",
        "months",
        "loan",
        "opened_on",
        "updated_at",
        "employer.name",
        "deposits.month",
        "deposits.amount",
    )
    assert "deposits=repeated_group" in SCHEMA.shape()


def test_build_converts_to_declared_types_and_keeps_only_wanted_paths() -> None:
    record = generic.build(SCHEMA, DATA, SCHEMA.paths)
    generic.check(record, SCHEMA, max_string_chars=100, max_repeated=10)
    assert generic.to_dict(record) == {
        "account_number": "440100001234",
        "account_status": "正常",
        "balance": "1234.50",
        "months": 12,
        "loan": True,
        "opened_on": "2020-01-02",
        "updated_at": dt.datetime(2026, 6, 30, 2, 0, tzinfo=dt.UTC),
        "employer": {"name": "某公司"},
        "deposits": [
            {"month": "2026-06-01", "amount": "100"},
            {"month": "2026-05-01", "amount": "99.5"},
        ],
    }
    narrow = generic.build(SCHEMA, DATA, ("balance", "deposits.amount", "employer.name"))
    assert generic.to_dict(narrow) == {
        "balance": "1234.50",
        "employer": {"name": "某公司"},
        "deposits": [{"amount": "100"}, {"amount": "99.5"}],
    }


def test_a_wanted_field_without_a_value_is_present_without_one() -> None:
    record = generic.build(SCHEMA, {}, ("balance", "deposits.month"))
    assert generic.to_dict(record) == {"balance": None, "deposits": []}


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("months", "twelve"),
        ("loan", 2),
        ("opened_on", "2020-02-30"),
        ("balance", "1e3"),
        ("account_status", "销户"),
        ("updated_at", 5),
    ],
)
def test_build_refuses_values_that_cannot_be_of_the_declared_type(key: str, raw: object) -> None:
    with pytest.raises(generic.ValueTypeError, match=key):
        generic.build(SCHEMA, {key: raw}, (key,))


def _check(*values: records_pb2.FieldValue) -> str:
    record = records_pb2.GenericRecord(record_type="housing_fund", fields=values)
    try:
        generic.check(record, SCHEMA, max_string_chars=12, max_repeated=1)
    except generic.SchemaViolation as bad:
        return f"{bad.problem} {bad.path}"
    return "ok"


V = records_pb2.FieldValue


def test_check_refuses_what_the_schema_does_not_declare() -> None:
    assert _check(V(name="balance", decimal_value="-1.50")) == "ok"
    assert _check(V(name="balance")) == "ok"  # no value
    assert _check(V(name="balance", string_value="1")) == "WRONG_TYPE balance"
    assert _check(V(name="vin", string_value="1")) == "UNDECLARED_FIELD vin"
    assert _check(V(name="months", integer_value=1), V(name="months")) == "DUPLICATE_FIELD months"
    assert _check(V(name="account_number", string_value="1234567890123")) == (
        "STRING_TOO_LONG account_number"
    )
    assert _check(V(name="account_status", enum_value="x")) == "BAD_VALUE account_status"
    assert _check(V(name="opened_on", date_value="2020-13-01")) == "BAD_VALUE opened_on"
    group = records_pb2.FieldGroup(fields=[V(name="iban", string_value="x")])
    assert _check(V(name="employer", group_value=group)) == "UNDECLARED_FIELD employer.iban"
    items = records_pb2.FieldGroupList(items=[records_pb2.FieldGroup()] * 2)
    assert _check(V(name="deposits", group_list_value=items)) == "TOO_MANY_ITEMS deposits"


def test_keep_and_mask_work_on_the_record_a_record_holds() -> None:
    record = records_pb2.Record(generic=generic.build(SCHEMA, DATA, SCHEMA.paths))
    fields.keep_record(record, ("account_number", "deposits.month"))
    fields.mask_record(record, {"account_number": "last4"})
    assert fields.record_type_of(record) == "housing_fund"
    assert generic.to_dict(record.generic) == {
        "account_number": "********1234",
        "deposits": [{"month": "2026-06-01"}, {"month": "2026-05-01"}],
    }
    assert fields.case_of("housing_fund") == "generic"
    assert fields.case_of("marriage") == "marriage"
    assert "generic" not in fields.RECORD_TYPES
