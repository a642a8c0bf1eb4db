"""Catalogue-declared record types in policy files: what the loader accepts and refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from certbroker import policy
from certbroker.config import DEFAULT_POLICY_DIR


def test_the_shipped_declared_types_load_with_their_schema() -> None:
    loaded = policy.load(DEFAULT_POLICY_DIR)
    fund = loaded.record_types["housing_fund"]
    assert fund.schema is not None
    assert fund.label == "住房公积金"
    assert "deposits.amount" in fund.fields
    assert fund.department == "housing_fund_center"
    assert loaded.record_types["credit"].schema is not None
    assert loaded.record_types["marriage"].schema is None
    assert set(loaded.matters["GJJ-TQ-001"].needs) == {
        "property",
        "marriage",
        "housing_fund",
        "credit",
    }


BASE = """
departments: [{id: d, name: D}]
roles: [{id: r, name: R}]
matters: [{code: M, name: M, needs: {t: [a]}}]
record_types:
  - name: t
    department: d
    fields:
"""


def errors(tmp_path: Path, fields: str, rules: str = "") -> str:
    (tmp_path / "p.yaml").write_text(BASE + fields + rules, encoding="utf-8")
    return "\n".join(policy.check([tmp_path]))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ("      - {name: a, type: string}\n", ""),
        ("      - {name: a, type: money}\n", "unknown type 'money'"),
        ("      - {name: a, type: enum}\n", "an enum needs its values"),
        ("      - {name: a, type: string, values: [x]}\n", "only an enum has values"),
        ("      - {name: a, type: integer, masks: [last4]}\n", "string fields only"),
        ("      - {name: a, type: string, masks: [blur]}\n", "unknown mask 'blur'"),
        ("      - {name: A, type: string}\n", "names are [a-z]"),
        ("      - {name: a, type: string}\n      - {name: a, type: date}\n", "declared twice"),
        ("      - {name: a, type: group}\n", "needs fields"),
        ("      - {name: a, type: string, fields: [{name: b, type: date}]}\n", "only a group"),
    ],
)
def test_field_declarations_are_checked(tmp_path: Path, fields: str, expected: str) -> None:
    found = errors(tmp_path, fields)
    assert (expected in found) if expected else found == "", found


def test_a_rule_may_only_apply_a_mask_the_catalogue_allows(tmp_path: Path) -> None:
    rule = "rules: [{id: x, roles: [r], matters: [M], masks: {t: {a: surname}}}]\n"
    found = errors(tmp_path, "      - {name: a, type: string, masks: [last4]}\n", rule)
    assert "lets t.a be masked by last4, not surname" in found


def test_a_contract_type_cannot_be_redeclared(tmp_path: Path) -> None:
    text = BASE.replace("name: t\n", "name: marriage\n") + "      - {name: a, type: string}\n"
    (tmp_path / "p.yaml").write_text(text, encoding="utf-8")
    assert "a contract type" in "\n".join(policy.check([tmp_path]))
