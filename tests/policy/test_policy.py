"""The policy engine: decisions of the shipped policy set, and the semantics on small sets."""

from __future__ import annotations

import argparse
import shutil
import textwrap
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grimp
import pytest

from certbroker import config, policy
from certbroker.auth.authenticator import Clerk
from certbroker.cli.main import parser
from certbroker.contract import fields as contract
from certbroker.errors import InvalidArgument
from certbroker.lookup.pipeline import consent_name
from certbroker.policy import model as policy_model
from certbroker.v1 import broker_pb2

POLICY_DIR = config.DEFAULT_POLICY_DIR
CST = timezone(timedelta(hours=8))
MONDAY_10 = datetime(2025, 3, 3, 10, 0, tzinfo=CST)  # 2025-03-03 is a Monday
CASE = "GZ20250303-000123"

HALL = Clerk(sub="c1", roles=("window_clerk",), office="gz-haizhu-hall-01")
HALL_24H = Clerk(sub="c2", roles=("window_clerk",), office="gz-haizhu-24h-01")
PROPERTY = Clerk(sub="c3", roles=("property_clerk",), office="gz-tianhe-hall-02")
PENSION = Clerk(sub="c4", roles=("social_security_clerk",), office="gz-yuexiu-hall-01")
AUDITOR = Clerk(sub="c5", roles=("auditor",), office="gz-haizhu-hall-01")
#: The matters of matters.yaml; matters-hall.yaml adds the rest of a hall's.
CORE_MATTERS = ("BDC-ZY-001", "SB-YL-001", "JY-RX-001")


@pytest.fixture(scope="module")
def shipped() -> policy.PolicySet:
    return policy.load(POLICY_DIR)


def req(
    clerk: Clerk = HALL,
    record_type: str = "marriage",
    matter: str = "BDC-ZY-001",
    *,
    case_number: str = CASE,
    consent: str = "id_card_read",
    fields: tuple[str, ...] = (),
    now: datetime = MONDAY_10,
) -> policy.Request:
    return policy.Request(
        clerk=clerk,
        record_type=record_type,
        matter_code=matter,
        case_number=case_number,
        consent_method=consent,
        fields=fields,
        now=now,
    )


# ---- the shipped catalogue ----


def test_shipped_catalogue(shipped: policy.PolicySet) -> None:
    assert {d: dept.record_types for d, dept in shipped.departments.items()} == {
        "public_security": ("household",),
        "human_resources_social_security": ("social_security",),
        "natural_resources": ("property",),
        "civil_affairs": ("marriage",),
        "housing_fund_center": ("housing_fund",),
        "credit_reference_center": ("credit",),
    }
    assert all(d.name for d in shipped.departments.values())
    for name, rt in shipped.record_types.items():
        if rt.schema is None:  # shipped catalogue = whole contract
            assert rt.fields == contract.field_paths(name)
        else:  # catalogue-declared: its fields are its schema's
            assert rt.fields == rt.schema.paths
        assert shipped.departments[rt.department].record_types == (name,)
    assert shipped.record_types["property"].cache_ttl_s == 0
    assert shipped.record_types["household"].cache_ttl_s > 0
    assert {*CORE_MATTERS, "GJJ-TQ-001"} <= set(shipped.matters)
    assert len(shipped.matters) >= 30  # the hall matters (matters-hall.yaml)
    assert set(shipped.matters["BDC-ZY-001"].needs) == {"household", "marriage", "property"}
    assert set(shipped.matters["SB-YL-001"].needs) == {"social_security", "household"}
    assert set(shipped.matters["JY-RX-001"].needs) == {"household", "property"}
    assert shipped.matters["BDC-ZY-001"].name == "不动产转移登记"
    assert set(shipped.roles) >= {
        "window_clerk",
        "property_clerk",
        "social_security_clerk",
        "auditor",
        "civil_affairs_clerk",
        "household_clerk",
        "housing_clerk",
        "market_clerk",
    }
    assert len(shipped.version) == 64


# ---- allow ----


def test_allow_releases_matter_fields_with_masks(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req())
    assert d.allowed
    assert d.rule_id == "window-clerk-hall"
    assert d.condition == ""
    assert d.record_type == "marriage"
    assert d.department == "civil_affairs"
    assert d.fields == (
        "marital_status",
        "spouse_name",
        "spouse_resident_id",
        "registered_on",
        "registration_office",
    )
    assert d.withheld == ("certificate_number",)
    assert dict(d.masks) == {"spouse_resident_id": "last4"}
    assert d.policy_version == shipped.version
    assert "window-clerk-hall" in d.reason


def test_requested_subset_in_catalogue_order(shipped: policy.PolicySet) -> None:
    asked = ("certificate_number", "spouse_resident_id", "marital_status")
    d = shipped.decide(req(fields=asked))
    assert d.allowed
    assert d.fields == ("marital_status", "spouse_resident_id")
    assert d.withheld == ("certificate_number",)
    assert dict(d.masks) == {"spouse_resident_id": "last4"}


def test_masks_limited_to_released_fields(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req(fields=("marital_status",)))
    assert d.fields == ("marital_status",)
    assert d.withheld == ()
    assert dict(d.masks) == {}


def test_rule_field_restriction_and_narrowing(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req(PROPERTY, "property", "JY-RX-001"))
    assert d.allowed
    assert d.rule_id == "property-clerk-enrolment"
    assert d.fields == (
        "holdings.address",
        "holdings.usage",
        "holdings.ownership",
        "holdings.co_owner_names",
    )
    assert "holdings.certificate_number" in d.withheld
    assert dict(d.masks) == {"holdings.co_owner_names": "surname"}
    # The rule narrows to property: the same matter's household record has no rule.
    assert shipped.decide(req(PROPERTY, "household", "JY-RX-001")).rule_id == "default-deny"


def test_same_field_masked_for_one_role_not_another(shipped: policy.PolicySet) -> None:
    window = shipped.decide(req(HALL, "social_security", "SB-YL-001"))
    pension = shipped.decide(req(PENSION, "social_security", "SB-YL-001"))
    assert window.allowed
    assert pension.allowed
    assert dict(window.masks) == {"social_security_number": "last4"}
    assert dict(pension.masks) == {}
    assert window.fields == pension.fields


def test_any_of_several_roles_suffices(shipped: policy.PolicySet) -> None:
    clerk = Clerk(sub="c6", roles=("auditor", "property_clerk"), office="gz-liwan-hall-01")
    assert shipped.decide(req(clerk, "property")).rule_id == "property-clerk-hall"


@pytest.mark.parametrize("hour", range(0, 24 * 7, 1))
def test_24h_hall_serves_every_hour_of_the_week(shipped: policy.PolicySet, hour: int) -> None:
    now = datetime(2025, 3, 3, tzinfo=CST) + timedelta(hours=hour, minutes=59)
    # Every matter of the core window rule, every record type it needs (rules-hall.yaml adds
    # a few matters to the 24-hour hall under its own rule, tested in policies/tests/).
    night = next(r for r in shipped.rules if r.id == "window-clerk-24h")
    for code in night.matters:
        for record_type in shipped.matters[code].needs:
            d = shipped.decide(req(HALL_24H, record_type, code, now=now))
            # window-clerk-24h, or a rule of another policy file for the 24-hour hall
            assert d.allowed, (code, record_type)
            assert d.rule_id.startswith("window-clerk-24h"), (code, record_type)


# ---- deny ----


def test_matter_scope(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req(record_type="social_security", fields=("employer",)))
    assert (d.allowed, d.rule_id, d.condition) == (False, "matter-scope", "")
    assert d.fields == ()
    assert d.withheld == ("employer",)
    assert d.department == "human_resources_social_security"
    assert "does not need social_security" in d.reason


def test_default_deny_for_auditor(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req(AUDITOR))
    assert (d.allowed, d.rule_id, d.condition) == (False, "default-deny", "")
    assert d.withheld == contract.field_paths("marriage")
    assert dict(d.masks) == {}
    assert "auditor" in d.reason


def test_default_deny_for_matter_outside_role(shipped: policy.PolicySet) -> None:
    d = shipped.decide(req(PENSION, "household", "BDC-ZY-001"))
    assert (d.allowed, d.rule_id) == (False, "default-deny")


@pytest.mark.parametrize(
    ("request_", "rule_id", "condition", "in_reason"),
    [
        (
            req(Clerk("c", ("window_clerk",), "sz-futian-hall-01")),
            "window-clerk-hall",
            "OFFICE_NOT_ALLOWED",
            "sz-futian-hall-01",
        ),
        (
            req(now=datetime(2025, 3, 3, 17, 30, tzinfo=CST)),
            "window-clerk-hall",
            "OUTSIDE_HOURS",
            "Mon-Sat 08:30-17:30 (UTC+08:00)",
        ),
        (
            req(now=datetime(2025, 3, 3, 8, 29, 59, tzinfo=CST)),
            "window-clerk-hall",
            "OUTSIDE_HOURS",
            "opening hours",
        ),
        (
            req(now=datetime(2025, 3, 9, 10, 0, tzinfo=CST)),
            "window-clerk-hall",
            "OUTSIDE_HOURS",
            "opening hours",
        ),
        (req(consent=""), "window-clerk-hall", "CONSENT_REQUIRED", "delegated_agent"),
        (req(case_number=""), "window-clerk-hall", "CASE_NUMBER_REQUIRED", "case number"),
        (req(case_number="GZ-1"), "window-clerk-hall", "CASE_NUMBER_REQUIRED", "format"),
        (
            req(HALL_24H, consent="delegated_agent"),
            "window-clerk-24h",
            "CONSENT_REQUIRED",
            "signed_form",
        ),
        (
            req(PROPERTY, "property", "JY-RX-001", fields=("holdings.certificate_number",)),
            "property-clerk-enrolment",
            "NO_FIELDS_RELEASED",
            "none of the requested",
        ),
    ],
    ids=[
        "office",
        "hours-end",
        "hours-start",
        "sunday",
        "consent",
        "case-number",
        "case-format",
        "24h-consent",
        "no-fields",
    ],
)
def test_condition_denials(
    shipped: policy.PolicySet,
    request_: policy.Request,
    rule_id: str,
    condition: str,
    in_reason: str,
) -> None:
    d = shipped.decide(request_)
    assert (d.allowed, d.rule_id, d.condition) == (False, rule_id, condition)
    assert in_reason in d.reason
    assert d.fields == ()
    assert dict(d.masks) == {}


def test_boundary_and_offset_allow(shipped: policy.PolicySet) -> None:
    assert shipped.decide(req(now=datetime(2025, 3, 3, 8, 30, tzinfo=CST))).allowed
    assert shipped.decide(req(now=datetime(2025, 3, 3, 17, 29, 59, tzinfo=CST))).allowed
    # 01:00 UTC is 09:00 in Guangzhou: open. 10:00 UTC is 18:00 there: closed.
    assert shipped.decide(req(now=datetime(2025, 3, 3, 1, 0, tzinfo=UTC))).allowed
    assert not shipped.decide(req(now=datetime(2025, 3, 3, 10, 0, tzinfo=UTC))).allowed


def test_denial_names_the_candidate_that_got_furthest(shipped: policy.PolicySet) -> None:
    # Staffed-hall clerk at night: both window rules fail; the hall rule fails later (hours)
    # than the 24-hour rule (office), so the clerk hears about hours.
    night = datetime(2025, 3, 4, 23, 0, tzinfo=CST)
    d = shipped.decide(req(now=night))
    assert (d.rule_id, d.condition) == ("window-clerk-hall", "OUTSIDE_HOURS")
    # 24-hour hall clerk with an agent: the hall rule fails on office, the 24h one on consent.
    d = shipped.decide(req(HALL_24H, consent="delegated_agent"))
    assert (d.rule_id, d.condition) == ("window-clerk-24h", "CONSENT_REQUIRED")


def test_naive_now_is_rejected(shipped: policy.PolicySet) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        shipped.decide(req(now=datetime(2025, 3, 3, 10, 0)))


# ---- check_request ----


@pytest.mark.parametrize(
    ("record_type", "matter", "fields", "reason"),
    [
        ("vehicle", "BDC-ZY-001", (), "UNKNOWN_RECORD_TYPE"),
        ("marriage", "BDC-ZY-999", (), "UNKNOWN_MATTER"),
        ("marriage", "BDC-ZY-001", ("spouse_phone",), "UNKNOWN_FIELD"),
        ("marriage", "BDC-ZY-001", ("holdings.address",), "UNKNOWN_FIELD"),
        (
            "marriage",
            "BDC-ZY-001",
            (*contract.field_paths("marriage"), "marital_status"),
            "TOO_MANY_FIELDS",
        ),
        ("marriage", "BDC-ZY-001", ("x",) * 10_000, "TOO_MANY_FIELDS"),
    ],
)
def test_check_request_rejects(
    shipped: policy.PolicySet, record_type: str, matter: str, fields: tuple[str, ...], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        shipped.check_request(record_type, matter, fields)
    assert info.value.reason == reason
    # decide validates the same way, so a caller that skips check_request is still safe.
    with pytest.raises(InvalidArgument) as info:
        shipped.decide(req(record_type=record_type, matter=matter, fields=fields))
    assert info.value.reason == reason


def test_check_request_accepts_known_names(shipped: policy.PolicySet) -> None:
    shipped.check_request("property", "SB-YL-001", ("holdings.address",))  # scope is decide's
    shipped.check_request("marriage", "BDC-ZY-001", contract.field_paths("marriage"))


def test_check_request_clips_long_names(shipped: policy.PolicySet) -> None:
    with pytest.raises(InvalidArgument) as info:
        shipped.check_request("x" * 10_000, "BDC-ZY-001", ())
    assert len(info.value.message) < 300


# ---- matters_for ----


def test_matters_for_window_clerk_in_24h_hall(shipped: policy.PolicySet) -> None:
    views = {v.matter.code: v for v in policy.matters_for(shipped, HALL_24H)}
    # The core matters, the hall matters that need no department's review at night, and the
    # package's member matters (packages.yaml).
    assert set(views) == {
        *CORE_MATTERS,
        "SB-ZG-001",
        "BDC-CX-001",
        "MZ-GL-001",
        "SDQ-GH-001",
        "HJ-QY-001",
    }
    transfer = views["BDC-ZY-001"]
    assert transfer.fields == shipped.matters["BDC-ZY-001"].needs
    assert dict(transfer.masks) == {"marriage": ("spouse_resident_id",)}
    assert transfer.case_number_required
    assert transfer.consent_required
    assert transfer.consent_methods == ("id_card_read", "signed_form")


def test_matters_for_restricted_roles(shipped: policy.PolicySet) -> None:
    views = {v.matter.code: v for v in policy.matters_for(shipped, PROPERTY)}
    assert set(views) == {"BDC-ZY-001", "JY-RX-001"} | {
        code for code in shipped.matters if code.startswith("BDC-")
    }
    enrolment = views["JY-RX-001"]
    assert set(enrolment.fields) == {"property"}  # narrowed: no household
    assert enrolment.fields["property"] == (
        "holdings.address",
        "holdings.usage",
        "holdings.ownership",
        "holdings.co_owner_names",
    )
    assert dict(enrolment.masks) == {"property": ("holdings.co_owner_names",)}
    assert enrolment.consent_methods == policy.CONSENT_METHODS
    pension = {v.matter.code: v for v in policy.matters_for(shipped, PENSION)}
    assert pension["SB-YL-001"].fields["household"] == ("name", "gender", "birth_date")


def test_matters_for_nothing(shipped: policy.PolicySet) -> None:
    assert policy.matters_for(shipped, AUDITOR) == []
    assert policy.matters_for(shipped, Clerk("c", ("window_clerk",), "sz-futian-hall-01")) == []
    # Hours are ignored: the staffed-hall view is the same whatever the time.
    # Every matter but marriage registration, which is the civil affairs window's alone.
    registration = {code for code in shipped.matters if code.startswith("HY-")}
    assert registration
    assert {v.matter.code for v in policy.matters_for(shipped, HALL)} == (
        set(shipped.matters) - registration
    )


# ---- semantics on small policy sets ----

RULES_HEADER = """\
roles:
  - {id: window_clerk, name: 窗口}
  - {id: night_clerk, name: 夜班}
rules:
"""


def small_set(tmp_path: Path, rules: str) -> policy.PolicySet:
    for name in ("catalogue.yaml", "matters.yaml"):
        shutil.copy(POLICY_DIR / name, tmp_path / name)
    (tmp_path / "rules.yaml").write_text(RULES_HEADER + textwrap.dedent(rules), "utf-8")
    return policy.load(tmp_path)


def test_first_passing_rule_decides(tmp_path: Path) -> None:
    ps = small_set(
        tmp_path,
        """\
      - id: narrow
        roles: [window_clerk]
        matters: [BDC-ZY-001]
        fields: {marriage: [marital_status]}
      - id: broad
        roles: [window_clerk]
        matters: [BDC-ZY-001]
    """,
    )
    d = ps.decide(req())
    assert (d.rule_id, d.fields) == ("narrow", ("marital_status",))
    # A restriction applies only to the record types it lists.
    assert ps.decide(req(record_type="household")).fields == (
        "name",
        "gender",
        "birth_date",
        "registered_address",
    )
    # No conditions at all: no consent or case number needed.
    assert ps.decide(req(consent="", case_number="")).allowed


def test_hours_windows_offsets_and_midnight(tmp_path: Path) -> None:
    ps = small_set(
        tmp_path,
        """\
      - id: nights
        roles: [night_clerk]
        matters: [BDC-ZY-001]
        conditions:
          hours:
            - {days: [fri], from: 22:00, to: "24:00", utc_offset: "-05:00"}
            - {days: [Sat], from: "00:00", to: 6:00, utc_offset: "-05:00"}
    """,
    )
    clerk = Clerk("n", ("night_clerk",), "anywhere")
    ny = timezone(timedelta(hours=-5))

    def allowed(local: datetime) -> bool:
        return ps.decide(req(clerk, now=local.astimezone(CST))).allowed

    assert allowed(datetime(2025, 3, 7, 22, 0, tzinfo=ny))  # Friday 22:00 New York
    assert allowed(datetime(2025, 3, 7, 23, 59, 59, tzinfo=ny))
    assert allowed(datetime(2025, 3, 8, 5, 59, tzinfo=ny))
    assert not allowed(datetime(2025, 3, 8, 6, 0, tzinfo=ny))
    assert not allowed(datetime(2025, 3, 7, 21, 59, tzinfo=ny))
    assert not allowed(datetime(2025, 3, 6, 23, 0, tzinfo=ny))  # Thursday
    reason = ps.decide(req(clerk, now=datetime(2025, 3, 6, 23, 0, tzinfo=ny))).reason
    assert "Fri 22:00-24:00 (UTC-05:00); Sat 00:00-06:00 (UTC-05:00)" in reason


def test_case_number_required_without_pattern(tmp_path: Path) -> None:
    ps = small_set(
        tmp_path,
        """\
      - id: any-case
        roles: [window_clerk]
        matters: [BDC-ZY-001]
        conditions: {case_number: true, offices: [gz-*-*-*]}
    """,
    )
    assert ps.decide(req(case_number="anything")).allowed
    d = ps.decide(req(case_number=""))
    assert (d.allowed, d.condition) == (False, "CASE_NUMBER_REQUIRED")
    view = policy.matters_for(ps, HALL)[0]
    assert view.case_number_required
    assert (view.consent_required, view.consent_methods) == (False, ())


def test_office_patterns_are_case_sensitive(tmp_path: Path) -> None:
    ps = small_set(
        tmp_path,
        """\
      - id: haizhu
        roles: [window_clerk]
        matters: [BDC-ZY-001]
        conditions: {offices: ["gz-haizhu-*-*", "gz-liwan-hall-*"]}
    """,
    )
    assert ps.decide(req(Clerk("c", ("window_clerk",), "gz-liwan-hall-03"))).allowed
    assert not ps.decide(req(Clerk("c", ("window_clerk",), "GZ-HAIZHU-hall-01"))).allowed
    assert not ps.decide(req(Clerk("c", ("window_clerk",), "gz-liwan-HALL-10"))).allowed


# ---- what a set remembers of itself ----


def test_remembered_decisions_equal_fresh_ones(shipped: policy.PolicySet) -> None:
    """The second decision of a request (memoised) equals the first and equals the decision
    of a freshly loaded set; asking for the same fields in another order changes nothing."""
    requests = [
        req(clerk, record_type, fields=fields, now=now)
        for clerk in (HALL, HALL_24H, PROPERTY, PENSION, AUDITOR)
        for record_type in ("household", "marriage", "property", "social_security")
        for fields in ((), ("name", "gender"), ("gender", "name"))
        if set(fields) <= set(shipped.record_types[record_type].fields)
        for now in (MONDAY_10, MONDAY_10.replace(hour=22))
    ]
    fresh = policy.load(POLICY_DIR)
    for request in requests:
        first = shipped.decide(request)
        assert shipped.decide(request) == first
        assert fresh.decide(request) == first
    assert any(shipped.decide(r).allowed for r in requests)
    assert any(not shipped.decide(r).allowed for r in requests)


def test_the_memo_is_bounded(shipped: policy.PolicySet, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy_model, "_MEMO_MAX", 16)
    for n in range(100):  # callers choose their roles: each new set of roles is a new key
        clerk = Clerk(sub="c", roles=("window_clerk", f"role-{n}"), office=HALL_24H.office)
        assert shipped.decide(req(clerk)).allowed
    assert len(shipped._memo) <= 16


@pytest.mark.parametrize(
    ("patterns", "office", "allowed"),
    [
        (("gz-*-hall-*",), "gz-haizhu-hall-01", True),
        (("gz-*-hall-*",), "gz-haizhu-24h-01", False),
        (("gz-*-hall-*", "gz-*-24h-*"), "gz-haizhu-24h-01", True),
        # A wildcard is exactly one non-empty segment: not none, not several.
        (("gz-*-hall-*",), "gz--hall-", False),
        (("gz-*-hall-*",), "gz-x-24h-01-hall-9", False),
        (("gz-*-hall-*",), "gz-haizhu-hall-01-annex", False),
        (("gz-*-hall-*",), "gz-haizhu-hall-01\n", False),
        (("gz-*",), "gz-haizhu-hall-01", False),
        (("gz-*",), "gz-haizhu", True),
        (("*",), "", False),
        (("*",), "hall3", True),
        (("exact",), "exactly", False),
        (("exact",), "exact", True),
        (("a.c",), "abc", False),  # literal segments are literal, "." included
        # Only ASCII segments: other scripts' letters and digits are no segment.
        (("gz-*-hall-*",), "gz-海珠-hall-01", False),
        (("gz-*-hall-*",), "gz-haizhu-hall-\uff10\uff11", False),
    ],
)
def test_office_wildcards_match_one_segment(
    patterns: tuple[str, ...], office: str, allowed: bool
) -> None:
    rule = policy.Rule(
        id="r", roles=("x",), matters=("m",), conditions=policy.Conditions(offices=patterns)
    )
    assert rule.office_allows(office) is allowed


@pytest.mark.parametrize(
    "pattern", ["gz--hall", "gz-hall*", "hall-0?", "hall-[0-9]", "gz-*-", "", "gz-海珠-*", "a b"]
)
def test_office_patterns_other_than_segments_and_wildcards_are_refused(
    tmp_path: Path, pattern: str
) -> None:
    with pytest.raises(ValueError, match="office pattern"):
        policy.Conditions(offices=(pattern,))
    with pytest.raises(policy.PolicyError, match="offices"):
        small_set(
            tmp_path,
            f"""\
      - id: r
        roles: [window_clerk]
        matters: [BDC-ZY-001]
        conditions: {{offices: ["{pattern}"]}}
    """,
        )


# ---- consent methods, package layering ----


def test_consent_methods_are_defined_once_for_the_cli_and_the_proto() -> None:
    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("lookup", "lookup-matter"):
        (consent,) = (a for a in commands.choices[name]._actions if "--consent" in a.option_strings)
        assert consent.choices == [*policy.CONSENT_METHODS, ""]
    enum = [v.number for v in broker_pb2.ConsentMethod.DESCRIPTOR.values]
    named = [consent_name(n) for n in enum if n != broker_pb2.CONSENT_METHOD_UNSPECIFIED]
    assert tuple(named) == policy.CONSENT_METHODS  # in the order the proto declares them


#: The policy package's layers: a module imports only modules of lower layers.
POLICY_LAYERS = {
    "hours": 0,
    "reader": 0,
    "quota": 0,
    "rule": 1,
    "model": 2,
    "schema": 3,
    "views": 3,
    "counters": 3,
    "loader": 4,
    "testing": 5,
}


def test_policy_modules_depend_one_way() -> None:
    # grimp sees every import, function-level and TYPE_CHECKING ones included.
    graph = grimp.build_graph("certbroker", cache_dir=None)
    modules = {m.rpartition(".")[2] for m in graph.find_children("certbroker.policy")}
    assert modules == set(POLICY_LAYERS)
    for name in modules:
        imported = graph.find_modules_directly_imported_by(f"certbroker.policy.{name}")
        assert "certbroker.policy" not in imported, f"{name} imports its own package"
        for target in sorted(imported):
            if target.startswith("certbroker.policy."):
                below = target.removeprefix("certbroker.policy.")
                assert POLICY_LAYERS[below] < POLICY_LAYERS[name], f"{name} imports {below}"
