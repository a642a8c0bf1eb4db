"""The synthetic datasets: determinism, atomic generation, and cross-department consistency."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from certbroker.adapters import demo
from certbroker.adapters.demo import synthetic
from certbroker.adapters.demo.population import AS_OF, age_on
from certbroker.adapters.sdk import Adapter, fetch_record
from certbroker.contract import resident_id

Query = Callable[..., list[sqlite3.Row]]


def dump(path: Path) -> list[str]:
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


@pytest.fixture(scope="module")
def full_adapters(full_dataset_dir: Path) -> Iterator[dict[str, Adapter]]:
    built = demo.build(full_dataset_dir)
    yield built
    demo.close_all(built.values())


# -- generation ------------------------------------------------------------------------------


def test_same_seed_gives_identical_datasets(full_dataset_dir: Path, tmp_path: Path) -> None:
    synthetic.generate(tmp_path)  # the default size and seed, like full_dataset_dir
    for record_type in synthetic.DATASETS:
        ours = synthetic.dataset_path(tmp_path, record_type)
        theirs = synthetic.dataset_path(full_dataset_dir, record_type)
        assert dump(ours) == dump(theirs)  # row for row
        assert ours.read_bytes() == theirs.read_bytes()  # and byte for byte


def test_other_seed_gives_other_people(dataset_dir: Path, tmp_path: Path) -> None:
    synthetic.generate(tmp_path, citizens=300, seed=1)
    household = synthetic.dataset_path(tmp_path, "household")
    assert dump(household) != dump(synthetic.dataset_path(dataset_dir, "household"))


def test_each_dataset_holds_only_its_department(full_dataset_dir: Path, query: Query) -> None:
    for record_type, (_, department) in synthetic.DATASETS.items():
        meta = dict(query(full_dataset_dir, record_type, "SELECT key, value FROM meta"))
        assert meta["record_type"] == record_type
        assert meta["department"] == department
        assert meta["citizens"] == str(synthetic.DEFAULT_CITIZENS)
        assert meta["seed"] == str(synthetic.DEFAULT_SEED)
    tables = {
        rt: {r[0] for r in query(full_dataset_dir, rt, "SELECT name FROM sqlite_master")}
        for rt in synthetic.DATASETS
    }
    assert "residents" in tables["household"]
    assert "residents" not in tables["marriage"] | tables["property"] | tables["social_security"]
    assert "insured" not in tables["household"] | tables["marriage"] | tables["property"]


def test_generate_skips_a_current_dataset_and_replaces_a_stale_one(tmp_path: Path) -> None:
    synthetic.generate(tmp_path, citizens=50)
    paths = [synthetic.dataset_path(tmp_path, rt) for rt in synthetic.DATASETS]
    stamps = [p.stat().st_ino for p in paths]
    synthetic.generate(tmp_path, citizens=50)
    assert [p.stat().st_ino for p in paths] == stamps  # untouched
    synthetic.generate(tmp_path, citizens=60)
    assert all(a != b for a, b in zip([p.stat().st_ino for p in paths], stamps, strict=True))
    paths[0].write_bytes(b"not a database")
    synthetic.generate(tmp_path, citizens=60)
    assert dump(paths[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_generate_rejects_an_empty_population(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        synthetic.generate(tmp_path, citizens=0)


# -- consistency (default size) --------------------------------------------------------------


def test_population_has_exactly_the_asked_size(full_dataset_dir: Path, query: Query) -> None:
    (count,) = query(full_dataset_dir, "household", "SELECT count(*) FROM residents")
    assert count[0] == synthetic.DEFAULT_CITIZENS
    (count,) = query(full_dataset_dir, "property", "SELECT count(*) FROM persons")
    assert count[0] == synthetic.DEFAULT_CITIZENS


def test_every_resident_id_in_every_dataset_is_valid(full_dataset_dir: Path, query: Query) -> None:
    columns = {
        "household": ["residents.resident_id", "households.head_resident_id"],
        "social_security": ["insured.resident_id", "insured.social_security_number"],
        "property": ["persons.resident_id", "owners.resident_id"],
        "marriage": ["persons.resident_id", "registrations.husband_id", "registrations.wife_id"],
    }
    checked = 0
    for record_type, names in columns.items():
        for name in names:
            table, column = name.split(".")
            for (value,) in query(full_dataset_dir, record_type, f"SELECT {column} FROM {table}"):
                assert resident_id.problem(value) is None, (record_type, name, value)
                checked += 1
    assert checked > 10_000


def test_resident_ids_agree_with_gender_and_birth_date(
    full_dataset_dir: Path, query: Query
) -> None:
    for row in query(full_dataset_dir, "household", "SELECT * FROM residents"):
        rid = row["resident_id"]
        assert row["birth_date"] == resident_id.birth_date(rid).isoformat()
        assert row["gender"] == ("男" if int(rid[16]) % 2 else "女")
        assert resident_id.birth_date(rid) <= AS_OF


def test_households_have_one_head(full_dataset_dir: Path, query: Query) -> None:
    heads = query(
        full_dataset_dir,
        "household",
        "SELECT h.head_resident_id, group_concat(r.resident_id) FROM households h JOIN residents"
        " r ON r.household_number = h.household_number AND r.relation_to_head = '户主'"
        " GROUP BY h.household_number",
    )
    (households,) = query(full_dataset_dir, "household", "SELECT count(*) FROM households")
    assert len(heads) == households[0]
    assert all(head == members for head, members in heads)


def test_spouses_are_married_to_each_other_in_one_household(
    full_dataset_dir: Path, query: Query, full_adapters: dict[str, Adapter]
) -> None:
    married = query(
        full_dataset_dir,
        "marriage",
        "SELECT resident_id FROM persons WHERE marital_status = '已婚'",
    )
    assert len(married) > 1000
    marriage, household = full_adapters["marriage"], full_adapters["household"]
    wanted = ["marital_status", "spouse_resident_id", "certificate_number"]
    home = ["household_number", "relation_to_head", "gender"]
    for (subject,) in married:
        mine = fetch_record(marriage, subject, wanted).marriage
        theirs = fetch_record(marriage, mine.spouse_resident_id, wanted).marriage
        assert theirs.marital_status == "已婚"
        assert theirs.spouse_resident_id == subject
        assert theirs.certificate_number == mine.certificate_number
        a = fetch_record(household, subject, home).household
        b = fetch_record(household, mine.spouse_resident_id, home).household
        assert a.household_number == b.household_number
        assert {a.relation_to_head, b.relation_to_head} == {"户主", "配偶"}
        assert {a.gender, b.gender} == {"男", "女"}


def test_divorced_pairs_share_a_divorce_certificate(full_dataset_dir: Path, query: Query) -> None:
    status = dict(
        query(full_dataset_dir, "marriage", "SELECT resident_id, marital_status FROM persons")
    )
    divorces = query(
        full_dataset_dir, "marriage", "SELECT * FROM registrations WHERE kind = '离婚'"
    )
    assert divorces
    for row in divorces:
        assert status[row["husband_id"]] == status[row["wife_id"]] == "离婚"


def test_every_status_and_property_situation_occurs(full_dataset_dir: Path, query: Query) -> None:
    statuses = Counter(
        r[0] for r in query(full_dataset_dir, "marriage", "SELECT marital_status FROM persons")
    )
    assert set(statuses) == {"未婚", "已婚", "离婚", "丧偶"}
    flags = query(
        full_dataset_dir, "property", "SELECT sum(mortgaged), sum(seized), count(*) FROM holdings"
    )
    mortgaged, seized, total = flags[0]
    assert 0 < seized < mortgaged < total
    ethnicities = Counter(
        r[0] for r in query(full_dataset_dir, "household", "SELECT ethnicity FROM residents")
    )
    assert ethnicities.most_common(1)[0][0] == "汉族"
    assert len(ethnicities) > 2


def test_joint_owners_are_spouses_naming_each_other(
    full_dataset_dir: Path, query: Query, full_adapters: dict[str, Adapter]
) -> None:
    joint = query(
        full_dataset_dir,
        "property",
        "SELECT certificate_number FROM holdings WHERE ownership = '共同共有'",
    )
    assert len(joint) > 100
    marriage, prop = full_adapters["marriage"], full_adapters["property"]
    wanted = ["holdings.certificate_number", "holdings.co_owner_names"]
    for (certificate,) in joint:
        owners = query(
            full_dataset_dir,
            "property",
            "SELECT resident_id, name FROM owners WHERE certificate_number = ?",
            (certificate,),
        )
        assert len(owners) == 2
        (a, a_name), (b, b_name) = owners
        assert fetch_record(marriage, a, ["spouse_resident_id"]).marriage.spouse_resident_id == b
        for subject, other in ((a, b_name), (b, a_name)):
            holdings = fetch_record(prop, subject, wanted).property.holdings
            (holding,) = [h for h in holdings if h.certificate_number == certificate]
            assert list(holding.co_owner_names) == [other]
    sole = query(
        full_dataset_dir,
        "property",
        "SELECT h.certificate_number FROM holdings h JOIN owners o USING (certificate_number)"
        " WHERE h.ownership = '单独所有' GROUP BY h.certificate_number HAVING count(*) != 1",
    )
    assert sole == []


def test_pensions_go_to_people_past_retirement_age(full_dataset_dir: Path, query: Query) -> None:
    insured = query(full_dataset_dir, "social_security", "SELECT * FROM insured")
    assert len(insured) > 1500
    retired = 0
    for row in insured:
        rid = row["resident_id"]
        age = age_on(resident_id.birth_date(rid), AS_OF)
        assert age >= 18
        assert row["social_security_number"] == rid
        if age >= (60 if int(rid[16]) % 2 else 55):
            retired += 1
            assert row["pension_status"] == "领取中"
            assert row["monthly_pension_fen"] > 0
        else:
            assert row["pension_status"] == "未领取"
            assert row["monthly_pension_fen"] is None
    assert retired > 300


def test_samples_for_the_demo(full_dataset_dir: Path, query: Query) -> None:
    husband, wife = synthetic.sample_couple(full_dataset_dir)
    assert (int(husband[16]) % 2, int(wife[16]) % 2) == (1, 0)
    rows = query(full_dataset_dir, "social_security", "SELECT resident_id FROM insured")
    insured = {r[0] for r in rows}
    assert {husband, wife} <= insured
    citizens = synthetic.sample_citizens(full_dataset_dir, 25)
    assert len(set(citizens)) == 25
    assert citizens == synthetic.sample_citizens(full_dataset_dir, 25)  # stable
    adults = {r[0] for r in query(full_dataset_dir, "marriage", "SELECT resident_id FROM persons")}
    assert set(citizens) <= adults & insured
    with pytest.raises(LookupError):
        synthetic.sample_citizens(full_dataset_dir, 100_000)
