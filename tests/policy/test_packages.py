"""Packages of matters (一件事) in the catalogue: loading, file:line errors, what a clerk sees."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from certbroker import config, policy
from certbroker.auth.authenticator import Clerk

POLICY_DIR = config.DEFAULT_POLICY_DIR
PACKAGE = "YJS-ESF-001"
WINDOW = Clerk("c1", ("window_clerk",), "gz-haizhu-24h-01")
PROPERTY = Clerk("c2", ("property_clerk",), "gz-tianhe-hall-02")
PENSION = Clerk("c3", ("social_security_clerk",), "gz-yuexiu-hall-02")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, target)
    return target


def test_shipped_package() -> None:
    shipped = policy.load(POLICY_DIR)
    package = shipped.packages[PACKAGE]
    assert package.name == "二手房交易一件事"
    assert package.matters == ("BDC-ZY-001", "SDQ-GH-001", "HJ-QY-001")
    # The members are minimised to what each needs: no marriage for the follow-up matters.
    assert set(shipped.matters["SDQ-GH-001"].needs) == {"household", "property"}
    assert shipped.matters["SDQ-GH-001"].needs["household"] == ("name", "registered_address")
    assert set(shipped.matters["HJ-QY-001"].needs) == {"household", "property"}


def test_packages_for_clerks() -> None:
    shipped = policy.load(POLICY_DIR)
    (window,) = policy.packages_for(shipped, WINDOW)
    assert (window.package.code, window.unavailable) == (PACKAGE, ())
    assert window.matters == shipped.packages[PACKAGE].matters
    # The property window handles the transfer only: the package is shown, partly unavailable.
    (prop,) = policy.packages_for(shipped, PROPERTY)
    assert (prop.matters, prop.unavailable) == (("BDC-ZY-001",), ("SDQ-GH-001", "HJ-QY-001"))
    # A clerk with none of its matters does not see the package at all.
    assert policy.packages_for(shipped, PENSION) == []


# (file content, marker on the offending line, message)
BROKEN = {
    "unknown-matter": (
        """\
        packages:
          - code: YJS-XX-001
            name: 测试一件事
            matters: [BDC-ZY-001, NOPE-001]
        """,
        "NOPE-001",
        "package YJS-XX-001: unknown matter 'NOPE-001'",
    ),
    "duplicate-code": (
        """\
        packages:
          - code: YJS-ESF-001
            name: 又一个
            matters: [BDC-ZY-001]
        """,
        "YJS-ESF-001",
        "duplicate package code 'YJS-ESF-001'",
    ),
    "empty": (
        """\
        packages:
          - code: YJS-XX-002
            name: 空的
            matters: []
        """,
        "matters: []",
        "package YJS-XX-002 matters: must not be an empty list",
    ),
    "matter-code": (
        """\
        packages:
          - code: SB-YL-001
            name: 与事项同码
            matters: [BDC-ZY-001]
        """,
        "SB-YL-001",
        "package SB-YL-001: code is already a matter code",
    ),
    "listed-twice": (
        """\
        packages:
          - code: YJS-XX-003
            name: 重复
            matters:
              - BDC-ZY-001
              - BDC-ZY-001 # again
        """,
        "# again",
        "'BDC-ZY-001' listed twice",
    ),
    "no-matters-key": (
        """\
        packages:
          - code: YJS-XX-004
            name: 没有事项
        """,
        "- code: YJS-XX-004",
        "missing required key 'matters'",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_package_errors_name_file_and_line(policy_dir: Path, case: str) -> None:
    text, marker, message = BROKEN[case]
    broken = policy_dir / "zz-packages.yaml"
    broken.write_text(textwrap.dedent(text), "utf-8")
    line = next(
        i for i, row in enumerate(broken.read_text("utf-8").splitlines(), 1) if marker in row
    )
    with pytest.raises(policy.PolicyError) as info:
        policy.load(policy_dir)
    (error,) = info.value.errors  # one mistake, one error
    assert error.startswith(f"{broken}:{line}: "), error
    assert message in error
