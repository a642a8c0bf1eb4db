"""The four demo department adapters, in-process over the small synthetic dataset."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from certbroker.adapters import demo
from certbroker.adapters.demo import synthetic
from certbroker.adapters.demo.population import AS_OF, age_on
from certbroker.adapters.sdk import Adapter, RecordNotFound, SqliteSource, fetch_record
from certbroker.contract import fields as record_fields
from certbroker.contract import resident_id
from certbroker.v1 import records_pb2

Query = Callable[..., list[sqlite3.Row]]
DEPARTMENTS = {
    "household": "public_security",
    "social_security": "human_resources_social_security",
    "property": "natural_resources",
    "marriage": "civil_affairs",
}


def fetch_all(adapter: Adapter, subject: str) -> records_pb2.Record:
    return fetch_record(adapter, subject, record_fields.field_paths(adapter.record_type))


def test_build_returns_one_adapter_per_record_type(adapters: dict[str, Adapter]) -> None:
    assert set(adapters) == set(record_fields.RECORD_TYPES)
    for record_type, adapter in adapters.items():
        assert adapter.record_type == record_type
        assert adapter.department == DEPARTMENTS[record_type]


@pytest.mark.parametrize("record_type", sorted(DEPARTMENTS))
def test_known_citizen_has_a_record(
    adapters: dict[str, Adapter], dataset_dir: Path, record_type: str
) -> None:
    for subject in synthetic.sample_citizens(dataset_dir, 5):
        record = fetch_all(adapters[record_type], subject)
        assert record.WhichOneof("record") == record_type


@pytest.mark.parametrize("record_type", sorted(DEPARTMENTS))
def test_unknown_citizen_is_not_found(
    adapters: dict[str, Adapter], unknown_id: str, record_type: str
) -> None:
    with pytest.raises(RecordNotFound):
        fetch_all(adapters[record_type], unknown_id)


def test_household_record(adapters: dict[str, Adapter], dataset_dir: Path, query: Query) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    record = fetch_all(adapters["household"], husband).household
    assert resident_id.problem(husband) is None
    assert record.gender == "男"
    assert record.birth_date == resident_id.birth_date(husband).isoformat()
    members = {m.resident_id: m for m in record.members}
    assert husband not in members  # the other members only
    assert members[wife].relation_to_head in {"户主", "配偶"}
    (row,) = query(
        dataset_dir, "household", "SELECT * FROM residents WHERE resident_id = ?", (wife,)
    )
    assert members[wife].name == row["name"]
    head = [record.name] + [m.name for m in record.members if m.relation_to_head == "户主"]
    assert record.head_of_household in head
    assert record.registration_authority.endswith("派出所")


def test_household_members_are_skipped_unless_asked(
    adapters: dict[str, Adapter], dataset_dir: Path
) -> None:
    husband, _ = synthetic.sample_couple(dataset_dir)
    record = fetch_record(adapters["household"], husband, ["name", "household_number"])
    assert not record.household.members
    assert record.household.household_number


def test_social_security_record(
    adapters: dict[str, Adapter], dataset_dir: Path, query: Query
) -> None:
    insured = query(dataset_dir, "social_security", "SELECT resident_id FROM insured")
    seen = set()
    for (subject,) in insured:
        record = fetch_all(adapters["social_security"], subject).social_security
        assert record.social_security_number == subject
        retired = age_on(resident_id.birth_date(subject), AS_OF) >= (
            60 if int(subject[16]) % 2 else 55
        )
        assert record.pension_status == ("领取中" if retired else "未领取")
        # Asked for and empty before retirement: present, zero.
        assert record.HasField("monthly_pension_fen")
        assert (record.monthly_pension_fen > 0) == retired
        seen.add(record.insured_status)
    assert seen == {"参保缴费", "暂停缴费", "终止缴费"}


def test_child_without_insurance_is_not_found(
    adapters: dict[str, Adapter], dataset_dir: Path, query: Query
) -> None:
    (child, *_) = query(
        dataset_dir,
        "household",
        "SELECT resident_id FROM residents WHERE birth_date > '2012-01-01'",
    )
    with pytest.raises(RecordNotFound):
        fetch_all(adapters["social_security"], child[0])
    with pytest.raises(RecordNotFound):  # nor in the marriage registry
        fetch_all(adapters["marriage"], child[0])
    # The property registry knows everyone: no holdings is an answer (无房), not an error.
    assert not fetch_all(adapters["property"], child[0]).property.holdings


def test_property_record_of_a_couple(adapters: dict[str, Adapter], dataset_dir: Path) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    names = {
        s: fetch_record(adapters["household"], s, ["name"]).household.name for s in (husband, wife)
    }
    address = fetch_record(adapters["household"], husband, ["registered_address"])
    his = fetch_all(adapters["property"], husband).property.holdings
    hers = fetch_all(adapters["property"], wife).property.holdings
    joint = [h for h in his if h.ownership == "共同共有"]
    assert joint
    assert {h.certificate_number for h in joint} <= {h.certificate_number for h in hers}
    for holding in joint:
        assert list(holding.co_owner_names) == [names[wife]]
    home = [h for h in joint if h.address == address.household.registered_address]
    assert home
    assert home[0].usage == "住宅"


def test_marriage_records_of_a_couple_mirror_each_other(
    adapters: dict[str, Adapter], dataset_dir: Path
) -> None:
    husband, wife = synthetic.sample_couple(dataset_dir)
    his = fetch_all(adapters["marriage"], husband).marriage
    hers = fetch_all(adapters["marriage"], wife).marriage
    assert his.marital_status == hers.marital_status == "已婚"
    assert (his.spouse_resident_id, hers.spouse_resident_id) == (wife, husband)
    assert his.certificate_number == hers.certificate_number
    assert his.certificate_number.startswith("J")
    assert his.registration_office.endswith("婚姻登记处")


def test_unmarried_adult_has_empty_but_present_spouse_fields(
    adapters: dict[str, Adapter], dataset_dir: Path, query: Query
) -> None:
    ((single,), *_) = query(
        dataset_dir, "marriage", "SELECT resident_id FROM persons WHERE marital_status = '未婚'"
    )
    record = fetch_record(adapters["marriage"], single, ["marital_status", "spouse_name"])
    assert record.marriage.marital_status == "未婚"
    assert record.marriage.HasField("spouse_name")
    assert record.marriage.spouse_name == ""
    assert not record.marriage.HasField("certificate_number")


def test_divorced_and_widowed_records_name_no_spouse(
    adapters: dict[str, Adapter], dataset_dir: Path, query: Query
) -> None:
    for status, prefix in (("离婚", "L"), ("丧偶", "J")):
        ((subject,), *_) = query(
            dataset_dir,
            "marriage",
            "SELECT resident_id FROM persons WHERE marital_status = ?",
            (status,),
        )
        record = fetch_all(adapters["marriage"], subject).marriage
        assert record.marital_status == status
        assert record.certificate_number.startswith(prefix)
        assert record.spouse_resident_id == ""


def test_adapters_are_safe_to_share_between_threads(
    adapters: dict[str, Adapter], dataset_dir: Path
) -> None:
    subjects = synthetic.sample_citizens(dataset_dir, 20)
    expected = {(rt, s): fetch_all(adapters[rt], s) for rt in adapters for s in subjects}
    keys = list(expected) * 5
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda key: fetch_all(adapters[key[0]], key[1]), keys))
    assert results == [expected[key] for key in keys]


def test_datasets_are_opened_read_only(dataset_dir: Path) -> None:
    source = SqliteSource(synthetic.dataset_path(dataset_dir, "household"))
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            source.rows("DELETE FROM residents")
    finally:
        source.close()


def test_missing_dataset_fails_early(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        demo.open_adapter("marriage", tmp_path)


def test_build_generates_missing_datasets_but_keeps_existing_ones(
    tmp_path: Path, dataset_dir: Path, query: Query
) -> None:
    built = demo.build(tmp_path / "fresh")
    try:
        assert all(synthetic.dataset_path(tmp_path / "fresh", rt).is_file() for rt in built)
    finally:
        demo.close_all(built.values())
    demo.close_all(demo.build(dataset_dir).values())  # a small population stays small
    (row,) = query(dataset_dir, "household", "SELECT value FROM meta WHERE key = 'citizens'")
    assert row[0] == "300"
