"""The hall-scale policy generator: its catalogue loads and decides as its rules say.

No timing here: the numbers belong in docs/benchmarks.md (``python -m bench --scenario hall``).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from bench import hall
from certbroker import policy
from certbroker.auth.authenticator import Clerk

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> policy.PolicySet:
    return policy.load(hall.generate(tmp_path_factory.mktemp("hall") / "policies"))


def test_the_catalogue_has_hall_scale(synthetic: policy.PolicySet) -> None:
    assert len(synthetic.matters) == hall.MATTERS == 1000
    assert len(synthetic.roles) == hall.ROLES == 50
    assert len(synthetic.record_types) == hall.RECORD_TYPES_WANTED == 60
    assert {"household", "social_security", "property", "marriage"} < set(synthetic.record_types)
    declared = [rt for rt in synthetic.record_types.values() if rt.schema is not None]
    assert len(declared) == 56  # credit, housing fund and the generated ones
    assert all(any(rt in m.needs for m in synthetic.matters.values()) for rt in ("rt_00", "rt_53"))
    # Rules in about the shipped set's proportion (18 for 32 matters).
    assert 0.4 <= len(synthetic.rules) / len(synthetic.matters) <= 1.0
    assert all(synthetic.matters[code] for rule in synthetic.rules for code in rule.matters)
    assert {role for rule in synthetic.rules for role in rule.roles} == set(synthetic.roles)


def test_the_catalogue_is_the_same_every_time(synthetic: policy.PolicySet, tmp_path: Path) -> None:
    assert policy.load(hall.generate(tmp_path / "again")).version == synthetic.version
    other = policy.load(hall.generate(tmp_path / "other", seed=hall.SEED + 1))
    assert other.version != synthetic.version


def _allowed_by(ps: policy.PolicySet, rule: policy.Rule, record_type: str) -> policy.Request:
    """A request that satisfies every condition of ``rule``."""
    cond = rule.conditions
    office = cond.offices[0].replace("*", "x1", 1).replace("*", "01")
    city = cond.case_number_pattern.pattern[1:3] if cond.case_number_pattern else "GZ"
    return policy.Request(
        clerk=Clerk("spot", rule.roles[:1], office),
        record_type=record_type,
        matter_code=rule.matters[0],
        case_number=f"{city}20261118-000001",
        consent_method=cond.consent[0],
        fields=(),
        now=hall.WEDNESDAY_10,
    )


def test_spot_checks_decide_as_the_rules_say(synthetic: policy.PolicySet) -> None:
    checked = 0
    for rule in synthetic.rules[::37]:
        matter = synthetic.matters[rule.matters[0]]
        for record_type, needed in matter.needs.items():
            if rule.record_types and record_type not in rule.record_types:
                continue
            request = _allowed_by(synthetic, rule, record_type)
            decision = synthetic.decide(request)
            # Allowed, by this rule or an earlier one for the same role and matter.
            assert decision.allowed, (rule.id, record_type, decision.reason)
            deciding = next(r for r in synthetic.rules if r.id == decision.rule_id)
            assert deciding.covers(request.clerk.roles, matter.code, record_type)
            restriction = deciding.fields.get(record_type)
            wanted = set(needed) & set(restriction if restriction is not None else needed)
            assert set(decision.fields) == wanted
            checked += 1
            # The same request spoiled, one condition at a time.
            spoiled = {
                "CONSENT_REQUIRED": dataclasses.replace(request, consent_method=""),
                "CASE_NUMBER_REQUIRED": dataclasses.replace(request, case_number=""),
                "OFFICE_NOT_ALLOWED": dataclasses.replace(
                    request, clerk=Clerk("spot", request.clerk.roles, "xa-yanta-hall-01")
                ),
            }
            if rule.conditions.hours:
                spoiled["OUTSIDE_HOURS"] = dataclasses.replace(request, now=hall.SUNDAY_20)
            for condition, denied in spoiled.items():
                d = synthetic.decide(denied)
                assert (d.allowed, d.condition) == (False, condition), (rule.id, condition)
            nobody = dataclasses.replace(request, clerk=Clerk("spot", ("auditor",), "gz-x-hall-01"))
            assert synthetic.decide(nobody).rule_id == policy.DEFAULT_DENY
        unneeded = [rt for rt in synthetic.record_types if rt not in matter.needs]
        if unneeded:
            request = dataclasses.replace(
                _allowed_by(synthetic, rule, "household"), record_type=unneeded[0]
            )
            assert synthetic.decide(request).rule_id == policy.MATTER_SCOPE
    assert checked >= 20


def test_narrowed_variants_release_their_household_fields_only(
    synthetic: policy.PolicySet,
) -> None:
    narrowed = [r for r in synthetic.rules if r.record_types == ("household",)]
    assert narrowed
    rule = narrowed[0]
    decision = synthetic.decide(_allowed_by(synthetic, rule, "household"))
    assert decision.allowed
    assert set(decision.fields) <= {"name", "birth_date", "registered_address"}
    request = dataclasses.replace(_allowed_by(synthetic, rule, "household"), record_type="marriage")
    assert not synthetic.decide(request).allowed or synthetic.decide(request).rule_id != rule.id


def test_the_request_mix_allows_and_denies(synthetic: policy.PolicySet) -> None:
    batch = hall.requests(synthetic, 2000)
    assert batch == hall.requests(synthetic, 2000)  # seeded
    allowed = sum(synthetic.decide(r).allowed for r in batch) / len(batch)
    assert 0.5 < allowed < hall.ALLOWED_SHARE + 0.05
    rules = {synthetic.decide(r).rule_id for r in batch}
    assert {policy.DEFAULT_DENY, policy.MATTER_SCOPE} <= rules
    conditions = {synthetic.decide(r).condition for r in batch}
    assert {"CONSENT_REQUIRED", "OUTSIDE_HOURS", "OFFICE_NOT_ALLOWED"} <= conditions


def test_the_generator_writes_a_directory_to_inspect(tmp_path: Path) -> None:
    target = tmp_path / "out"
    assert hall.main([str(target)]) == 0
    assert hall.main([str(target)]) == 1  # never over existing policies
    assert hall.main([]) == 2
    assert len(policy.load(target).matters) == hall.MATTERS


def test_smoke_run_prints_the_hall_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--scenario", "hall"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "== hall (smoke)" in lines
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| --")]
    assert rows[0].split("|")[1].strip() == "what"
    whats = [row.split("|")[1].strip() for row in rows[1:]]
    assert "decision, median µs" in whats
    assert "decision, p99 µs" in whats
    assert "load (policy.load), s" in whats
    assert "reload after one edit, s" in whats
    assert any(line.startswith("Targets met at hall scale: ") for line in lines)
    assert any("1000 matters, 50 roles" in line for line in lines)
