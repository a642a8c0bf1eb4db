"""The hall-scale policy set: split across files, and every matter covered by policy tests."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import yaml

from certbroker import config, policy

POLICY_DIR = config.DEFAULT_POLICY_DIR


def _policy_test_cases() -> list[tuple[str, str, str]]:
    """(matter, expected decision or error, "file: test name") of every shipped policy test."""
    cases = []
    for path in sorted((POLICY_DIR / "tests").glob("*.yaml")):
        for test in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            expect = test["expect"]
            outcome = expect.get("decision") or f"error {expect['error']}"
            cases.append((test["request"]["matter"], outcome, f"{path.name}: {test['name']}"))
    return cases


def test_every_shipped_matter_has_an_allowed_and_a_denied_policy_test() -> None:
    shipped = policy.load(POLICY_DIR)
    assert len(shipped.matters) >= 30
    outcomes: dict[str, set[str]] = {code: set() for code in shipped.matters}
    for matter, outcome, _where in _policy_test_cases():
        outcomes.setdefault(matter, set()).add(outcome)
    missing = {
        code: sorted({"allow", "deny"} - outcomes[code])
        for code in shipped.matters
        if not {"allow", "deny"} <= outcomes[code]
    }
    assert missing == {}
    assert policy.run_tests(POLICY_DIR).ok


def test_hall_matters_need_only_the_built_in_record_types() -> None:
    shipped = policy.load(POLICY_DIR)
    hall = yaml.safe_load((POLICY_DIR / "matters-hall.yaml").read_text(encoding="utf-8"))
    codes = [m["code"] for m in hall["matters"]]
    assert len(codes) >= 26
    # Codes other branches define: not here.
    assert not {"GJJ-TQ-001", "SDQ-GH-001", "HJ-QY-001"} & set(codes)
    for code in codes:
        matter = shipped.matters[code]
        assert matter.name
        assert set(matter.needs) <= {"household", "social_security", "property", "marriage"}
        assert all(matter.needs.values()), code  # every record type with at least one field


def test_matter_needs_are_justified_in_comments() -> None:
    """Data minimisation: each record type a hall matter needs says why, in a comment."""
    text = (POLICY_DIR / "matters-hall.yaml").read_text(encoding="utf-8")
    keys = re.findall(r"^      (?:household|social_security|property|marriage):.*$", text, re.M)
    needs = sum(len(m["needs"]) for m in yaml.safe_load(text)["matters"])
    assert len(keys) == needs
    unexplained = [line for line in keys if "#" not in line or not line.split("#", 1)[1].strip()]
    assert unexplained == []


def test_matters_and_rules_merge_across_files(tmp_path: Path) -> None:
    """Matters, roles and rules in separate files make one set; rules in file-name order."""
    for name in ("catalogue.yaml", "matters.yaml", "rules.yaml"):
        (tmp_path / name).write_bytes((POLICY_DIR / name).read_bytes())
    (tmp_path / "matters-extra.yaml").write_text(
        textwrap.dedent(
            """\
            matters:
              - code: MZ-GL-001
                name: 高龄津贴申领
                needs: {household: [name, birth_date]}
            """
        ),
        encoding="utf-8",
    )
    (tmp_path / "rules-extra.yaml").write_text(
        textwrap.dedent(
            """\
            roles:
              - {id: civil_affairs_clerk, name: 民政窗口}
            rules:
              - id: extra
                roles: [civil_affairs_clerk, window_clerk]
                matters: [MZ-GL-001, BDC-ZY-001]
                record_types: [household]
            """
        ),
        encoding="utf-8",
    )
    merged = policy.load(tmp_path)
    assert {"MZ-GL-001", "BDC-ZY-001"} <= set(merged.matters)
    assert "civil_affairs_clerk" in merged.roles
    # rules-extra.yaml sorts before rules.yaml: its rule is tried first.
    assert merged.rules[0].id == "extra"
    assert "window-clerk-hall" in {r.id for r in merged.rules}
    (tmp_path / "matters-dup.yaml").write_text(
        "matters:\n  - {code: MZ-GL-001, name: x, needs: {household: [name]}}\n", encoding="utf-8"
    )
    problems = policy.check([tmp_path])
    assert any("duplicate matter code 'MZ-GL-001'" in p for p in problems), problems
