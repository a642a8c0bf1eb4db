"""Package boundaries the design depends on, checked on the source itself."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_IMPORT = re.compile(r"^\s*from\s+([A-Za-z_][\w.]*)\s+import\b", re.MULTILINE)
_PLAIN_IMPORT = re.compile(r"^\s*import\s+([\w., ]+)$", re.MULTILINE)


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        # A line scan rather than ast.parse: CPython 3.11.7's parser can raise a spurious
        # SystemError ("AST constructor recursion depth mismatch") under pytest-xdist.
        text = path.read_text(encoding="utf-8")
        found[str(path.relative_to(ROOT))] = set(_IMPORT.findall(text)) | {
            name.strip().split(" ")[0]
            for group in _PLAIN_IMPORT.findall(text)
            for name in group.split(",")
        }
    return found


def test_adapters_never_import_broker_internals() -> None:
    offenders = {
        path: sorted(n for n in names if n == "broker" or n.startswith("broker."))
        for path, names in imported_modules("adapters").items()
    }
    assert {p: n for p, n in offenders.items() if n} == {}


def test_contract_package_depends_on_nothing_of_ours() -> None:
    for path, names in imported_modules("certbroker").items():
        ours = {n for n in names if n.split(".")[0] in {"broker", "adapters"}}
        assert not ours, (path, ours)
