"""The benchmark keeps working: its smoke mode end to end, and its reporting helpers.

Nothing here asserts how fast anything is; numbers belong in docs/benchmarks.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench.harness import Options, Result, percentile, render, table, write_section

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_prints_the_bundle_table(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results-file", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "== bundle (smoke)" in lines
    for call in ("Lookup household", "Lookup marriage", "Lookup property", "LookupMatter"):
        assert any(line.startswith(f"| {call}") for line in lines), call
    assert any(line.startswith("bundle / slowest single") for line in lines)
    assert not results.exists()  # only --write (full runs) touches the results file


def test_write_needs_a_full_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--write"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "full runs only" in out.stderr


def test_percentile_is_nearest_rank() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 90) == 5.0
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_options_pick_the_round_count() -> None:
    assert Options().count(full=200, smoke=3) == 200
    assert Options(smoke=True).count(full=200, smoke=3) == 3
    assert Options(smoke=True, rounds=7).count(full=200, smoke=3) == 7


def _result(section: str, value: str) -> Result:
    return Result(
        section=section,
        setup="What ran.",
        header=("call", "p50 ms"),
        rows=[("Lookup x", value)],
        verdict="ratio 1.00",
    )


def test_table_aligns_and_right_justifies_numbers() -> None:
    text = table(("call", "p50 ms"), [("Lookup household", "26.2"), ("LookupMatter", "130.5")])
    header, rule, first, second = text.splitlines()
    assert len({len(header), len(rule), len(first), len(second)}) == 1
    assert rule.endswith(": |")  # a right-aligned Markdown column
    assert first.endswith("  26.2 |")


def test_write_section_replaces_its_own_section_only(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    write_section(path, _result("Matter bundles", "1.0"))
    write_section(path, _result("Another scenario", "2.0"))
    write_section(path, _result("Matter bundles", "3.0"))
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count("## Matter bundles") == 1
    assert "| Lookup x |    1.0 |" not in text
    assert "| Lookup x |    3.0 |" in text
    assert "| Lookup x |    2.0 |" in text  # the other section is untouched
    assert text.index("## Matter bundles") < text.index("## Another scenario")
    assert render(_result("Matter bundles", "3.0")) in text
