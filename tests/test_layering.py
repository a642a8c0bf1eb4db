"""Package rules import-linter's contracts (``[tool.importlinter]``, run by ``make test``) do not
express: a module never imports its own package's ``__init__``, and every part of the layering
the contracts name exists (a renamed package would otherwise leave a contract checking nothing).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def _graph() -> grimp.ImportGraph:
    return grimp.build_graph("certbroker", cache_dir=None)


def test_no_module_imports_its_own_package_init() -> None:
    graph = _graph()
    offenders = []
    for module in sorted(graph.modules):
        package = module.rpartition(".")[0]
        # A package's own __init__ may import its children; a child must not import the
        # __init__ back: the re-exports there would hide a cycle through the package.
        while package:
            if package in graph.find_modules_directly_imported_by(module):
                offenders.append((module, package))
            package = package.rpartition(".")[0]
            if package == "certbroker":
                break
    assert offenders == []


def test_every_module_named_in_a_contract_exists() -> None:
    graph = _graph()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    named: set[str] = set()
    for contract in config["tool"]["importlinter"]["contracts"]:
        for key in ("layers", "source_modules", "forbidden_modules", "ancestors"):
            # A layer may be independent siblings: "certbroker.admin | certbroker.citizen".
            for entry in contract.get(key, []):
                named.update(part.strip() for part in entry.split("|"))
    assert named, "no contracts found"
    assert sorted(m for m in named if m not in graph.modules) == []
