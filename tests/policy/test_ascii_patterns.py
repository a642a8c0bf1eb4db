"""Every pattern the broker or a policy applies matches ASCII only, unless a policy says so.

``\\d`` in Python's ``re`` matches any Unicode decimal digit: full-width ``０-９``, Arabic-Indic,
Devanagari... and ``int()`` reads them too. A case number typed (or forged) with full-width
digits must not satisfy a format written for ASCII ones.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shutil
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import certbroker
from certbroker import config, policy
from certbroker.auth.authenticator import Clerk

POLICY_DIR = config.DEFAULT_POLICY_DIR
MONDAY_10 = datetime(2025, 3, 3, 10, 0, tzinfo=timezone(timedelta(hours=8)))
HALL = Clerk(sub="c1", roles=("window_clerk",), office="gz-haizhu-hall-01")
FULL_WIDTH_CASE = "GZ２０２５０３０３-０００１２３"


def request(case_number: str) -> policy.Request:
    return policy.Request(
        clerk=HALL,
        record_type="marriage",
        matter_code="BDC-ZY-001",
        case_number=case_number,
        consent_method="id_card_read",
        fields=(),
        now=MONDAY_10,
    )


def test_full_width_digits_do_not_satisfy_the_shipped_case_number_rule() -> None:
    shipped = policy.load(POLICY_DIR)
    assert shipped.decide(request("GZ20250303-000123")).allowed
    denied = shipped.decide(request(FULL_WIDTH_CASE))
    assert (denied.allowed, denied.condition) == (False, "CASE_NUMBER_REQUIRED")


@pytest.mark.parametrize(
    "case_number",
    [
        FULL_WIDTH_CASE,
        "GZ٢٠٢٥٠٣٠٣-٠٠٠١٢٣",  # Arabic-Indic digits
        "GZ२०२५०३०३-०००१२३",  # Devanagari digits
        "ＧＺ20250303-000123",
    ],
)
def test_other_scripts_do_not_satisfy_a_policy_pattern(tmp_path: Path, case_number: str) -> None:
    ps = rules(tmp_path, r"{pattern: '(?i)[a-z]{2}\d{8}-\d{6}'}")
    assert ps.decide(request("gz20250303-000123")).allowed
    assert not ps.decide(request(case_number)).allowed


def test_a_policy_may_ask_for_unicode_matching(tmp_path: Path) -> None:
    ps = rules(tmp_path, r"{pattern: 'GZ\d{8}-\d{6}', unicode: true}")
    assert ps.decide(request(FULL_WIDTH_CASE)).allowed


def test_unicode_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(policy.PolicyError, match="unicode"):
        rules(tmp_path, r"{pattern: 'GZ\d{8}', unicode: yes please}")


@pytest.mark.parametrize(("start", "offset"), [("０８:３０", "+08:00"), ("08:30", "+０８:００")])
def test_opening_hours_are_ascii_digits(tmp_path: Path, start: str, offset: str) -> None:
    hours = f'{{days: [mon], from: "{start}", to: "17:30", utc_offset: "{offset}"}}'
    with pytest.raises(policy.PolicyError, match="expected"):
        rules(tmp_path, "true", extra=f"hours: {hours}")


def rules(tmp_path: Path, case_number: str, extra: str = "") -> policy.PolicySet:
    for name in ("catalogue.yaml", "matters.yaml"):
        shutil.copy(POLICY_DIR / name, tmp_path / name)
    conditions = f"case_number: {case_number}" + (f", {extra}" if extra else "")
    text = f"""\
        roles:
          - {{id: window_clerk, name: 综合受理窗口}}
        rules:
          - id: r
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions: {{{conditions}}}
        """
    (tmp_path / "rules.yaml").write_text(textwrap.dedent(text), "utf-8")
    return policy.load(tmp_path)


_UNICODE_CLASSES = re.compile(r"\\[dDwWsSb]")
#: Patterns that mean to match other scripts too, and why.
_UNICODE_ON_PURPOSE = {
    # Redacts resident-ID-like runs from log lines: matching more digits is the safe side.
    "certbroker.routing.replies._ID_LIKE",
}


def test_every_compiled_pattern_of_the_broker_is_ascii() -> None:
    """Module-level patterns using \\d, \\w, \\s or \\b carry re.ASCII (or are bytes)."""
    offenders = []
    for module_info in pkgutil.walk_packages(certbroker.__path__, "certbroker."):
        name = module_info.name
        if name.startswith(("certbroker.v1", "certbroker.adapters")) or name.endswith("__main__"):
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, re.Pattern)
                and isinstance(value.pattern, str)
                and _UNICODE_CLASSES.search(value.pattern)
                and not value.flags & re.ASCII
                and f"{name}.{attr}" not in _UNICODE_ON_PURPOSE
            ):
                offenders.append(f"{name}.{attr}")
    assert offenders == []
