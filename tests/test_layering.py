"""Package boundaries the design depends on, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
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
