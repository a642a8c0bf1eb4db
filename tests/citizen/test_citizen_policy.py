"""The policy's citizen-facing parts: covert matters with a disclosure delay, and the
``citizen`` section, checked with path:line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from certbroker import policy
from certbroker.config import DEFAULT_POLICY_DIR
from certbroker.policy.model import CitizenView
from tests.citizen.support import COVERT, policy_dir


def test_the_shipped_set_shows_clerk_numbers_and_freezes_on_dispute() -> None:
    assert policy.load(DEFAULT_POLICY_DIR).citizen == CitizenView("number", True)


def test_a_covert_matter_has_its_delay(tmp_path: Path) -> None:
    loaded = policy.load(policy_dir(tmp_path))
    assert loaded.matters[COVERT].covert
    assert loaded.matters[COVERT].disclosure_delay_s == 30 * 86400
    assert not loaded.matters["BDC-ZY-001"].covert


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("covert: true\n", "a covert matter needs disclosure_delay_days"),
        ("disclosure_delay_days: 5\n", "only for a covert matter"),
        ("covert: true\n    disclosure_delay_days: 0\n", "1..3650"),
    ],
)
def test_covert_mistakes_are_reported(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "m.yaml"
    path.write_text(
        "matters:\n  - code: X-1\n    name: x\n    needs: {household: [name]}\n    " + text,
        encoding="utf-8",
    )
    errors = policy.check([*sorted(DEFAULT_POLICY_DIR.glob("*.yaml")), path])
    assert any(problem in e and "m.yaml:" in e for e in errors), errors


def test_citizen_section_mistakes_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("citizen:\n  show_clerk: name\n  freeze: yes\n", encoding="utf-8")
    errors = policy.check([path])
    assert any("show_clerk" in e for e in errors), errors
    assert any("freeze" in e for e in errors), errors
