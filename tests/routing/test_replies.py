"""The rules every adapter reply passes (certbroker.routing.replies), one by one."""

from __future__ import annotations

import datetime as dt

import pytest

from certbroker.adapters import sdk
from certbroker.adapters.sql.database import SourceUnavailable
from certbroker.contract.reasons import ADAPTER_REASONS
from certbroker.policy import RecordLimits
from certbroker.routing import replies
from certbroker.v1 import adapter_pb2, records_pb2

SUBJECT = "110105194912310021"
NOW = dt.datetime(2026, 5, 1, 8, 0, tzinfo=dt.UTC)


def reply(**changes: object) -> adapter_pb2.FetchResponse:
    out = adapter_pb2.FetchResponse(
        record=records_pb2.Record(marriage=records_pb2.MarriageRecord(marital_status="已婚")),
        department="civil_affairs",
        subject_id=SUBJECT,
    )
    out.as_of.FromDatetime(NOW)
    for name, value in changes.items():
        if value is None:
            out.ClearField(name)
        else:
            setattr(out, name, value)
    return out


DEFAULTS = RecordLimits()


def problem(response: adapter_pb2.FetchResponse, limits: RecordLimits = DEFAULTS) -> str:
    with pytest.raises(replies.BadReply) as info:
        replies.accept(response, record_type="marriage", subject_id=SUBJECT, limits=limits, now=NOW)
    return info.value.problem


def test_a_good_reply_is_accepted() -> None:
    record, as_of = replies.accept(
        reply(), record_type="marriage", subject_id=SUBJECT, limits=RecordLimits(), now=NOW
    )
    assert record.marriage.marital_status == "已婚"
    assert as_of == NOW


def test_the_subject_must_be_echoed() -> None:
    assert problem(reply(subject_id="")) == "SUBJECT_MISSING"
    assert problem(reply(subject_id="11010519491231002X")) == "SUBJECT_MISMATCH"


def test_the_record_type_must_be_the_requested_one() -> None:
    other = reply()
    other.record.household.name = "王伟"
    assert problem(other) == "WRONG_RECORD_TYPE"
    empty = reply()
    empty.ClearField("record")
    assert problem(empty) == "WRONG_RECORD_TYPE"


def test_as_of_must_be_a_real_time_not_far_ahead() -> None:
    assert problem(reply(as_of=None)) == "AS_OF_MISSING"
    bad = reply()
    bad.as_of.nanos = -1
    assert problem(bad) == "AS_OF_INVALID"
    ahead = reply()
    ahead.as_of.FromDatetime(NOW + dt.timedelta(days=2))
    assert problem(ahead) == "AS_OF_INVALID"
    skewed = reply()
    skewed.as_of.FromDatetime(NOW + dt.timedelta(minutes=10))  # clocks drift
    replies.accept(
        skewed, record_type="marriage", subject_id=SUBJECT, limits=RecordLimits(), now=NOW
    )


def test_limits_name_the_field() -> None:
    long = reply()
    long.record.marriage.spouse_name = "王" * 11
    replies.check_record(long.record, "marriage", RecordLimits(max_string_chars=11))  # fits
    assert problem(long, RecordLimits(max_string_chars=10)) == "STRING_TOO_LONG"
    with pytest.raises(replies.BadReply) as info:
        replies.check_record(long.record, "marriage", RecordLimits(max_string_chars=10))
    assert (info.value.problem, info.value.field) == ("STRING_TOO_LONG", "spouse_name")

    household = records_pb2.Record()
    for _ in range(3):
        household.household.members.add(name="张三", resident_id=SUBJECT)
    with pytest.raises(replies.BadReply) as info:
        replies.check_record(household, "household", RecordLimits(max_repeated=2))
    assert (info.value.problem, info.value.field) == ("TOO_MANY_ITEMS", "members")
    with pytest.raises(replies.BadReply) as info:
        replies.check_record(household, "household", RecordLimits(max_string_chars=17))
    assert (info.value.problem, info.value.field) == ("STRING_TOO_LONG", "members.resident_id")

    holdings = records_pb2.Record()
    holdings.property.holdings.add(co_owner_names=["甲", "乙", "丙"])
    with pytest.raises(replies.BadReply) as info:
        replies.check_record(holdings, "property", RecordLimits(max_repeated=2))
    assert info.value.field == "holdings.co_owner_names"
    with pytest.raises(replies.BadReply) as info:
        replies.check_record(holdings, "property", RecordLimits(max_record_bytes=8))
    assert (info.value.problem, info.value.field) == ("RECORD_TOO_LARGE", "")
    replies.check_record(holdings, "property", RecordLimits())


def test_unknown_fields_are_dropped_and_count_towards_the_size() -> None:
    data = reply().SerializeToString()
    smuggled = b"\xfa\x06\x05hello"  # field 111, length-delimited, unknown to the contract
    inner = records_pb2.MarriageRecord(marital_status="已婚").SerializeToString() + smuggled
    record = b"\x22" + bytes([len(inner)]) + inner  # Record.marriage = 4
    parsed = replies.parse(data + b"\x0a" + bytes([len(record)]) + record)
    assert b"hello" in parsed.SerializeToString()
    with pytest.raises(replies.BadReply):  # as sent: 18 bytes with the unknown field
        replies.check_record(parsed.record, "marriage", RecordLimits(max_record_bytes=14))
    record_out, _ = replies.accept(
        parsed, record_type="marriage", subject_id=SUBJECT, limits=RecordLimits(), now=NOW
    )
    assert b"hello" not in record_out.SerializeToString()


def test_bytes_that_are_no_reply_are_malformed() -> None:
    for data in (b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x02\x22\x02\x0a\xff", b"\xff"):
        with pytest.raises(replies.BadReply) as info:
            replies.parse(data)
        assert info.value.problem == "MALFORMED"


def test_bad_response_is_unavailable_naming_the_problem() -> None:
    err = replies.bad_response("civil_affairs", replies.BadReply("STRING_TOO_LONG", "spouse_name"))
    assert (err.code.name, err.reason) == ("UNAVAILABLE", "ADAPTER_BAD_RESPONSE")
    assert err.metadata == {
        "department": "civil_affairs",
        "problem": "STRING_TOO_LONG",
        "field": "spouse_name",
    }


# --- adapter error text --------------------------------------------------------------------------


def test_only_the_contracts_reasons_are_forwarded() -> None:
    assert replies.forwarded_reason("DECISION_TOKEN_INVALID") == "DECISION_TOKEN_INVALID"
    for other in ("", "decision_token_invalid", "SUBJECT_NOT_FOUND ", "EVIL\x1b[2J", "A" * 2000):
        assert replies.forwarded_reason(other) is None


def test_every_reason_the_sdk_reports_is_in_the_contract() -> None:
    raised = [
        sdk.RecordNotFound(),
        sdk.DecisionTokenMissing(),
        sdk.DecisionTokenInvalid("x"),
        sdk.DecisionTokenMismatch("x"),
        SourceUnavailable(),
    ]
    reasons = {e.reason for e in raised} | {"UNKNOWN_RECORD_TYPE", "UNKNOWN_FIELD", "INTERNAL"}
    reasons.add("BAD_SUBJECT_ID")
    assert reasons <= ADAPTER_REASONS
    with pytest.raises(sdk.InvalidRequest) as info:
        sdk.check_fields("vehicle", [])
    assert info.value.reason in ADAPTER_REASONS


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("db down", "db down"),
        ("line\nbreak\r\x1b[2J\x00", "line\\nbreak\\r\\x1b[2J\\x00"),
        (f"subject {SUBJECT} unknown", "subject ****************** unknown"),
        ("old id 110105491231002 here", "old id *************** here"),
        ("order 12345678901234 ok", "order 12345678901234 ok"),  # 14 digits: not ID-like
        ("民政局\u2028错误", "民政局\\u2028错误"),
        ("A" * 250, "A" * 200 + "..."),
    ],
)
def test_adapter_text_is_cleaned_for_the_log(text: str, logged: str) -> None:
    assert replies.for_log(text) == logged


def test_an_id_across_the_cut_is_masked_too() -> None:
    text = "x" * 190 + SUBJECT
    assert replies.for_log(text) == "x" * 190 + "*" * 10 + "..."
