"""The four demo department adapters over the synthetic datasets, for the broker's embedded
in-process default and for ``python -m certbroker.adapters``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from certbroker.adapters.demo import declared, synthetic
from certbroker.adapters.demo.household import HouseholdAdapter
from certbroker.adapters.demo.marriage import MarriageAdapter
from certbroker.adapters.demo.property import PropertyAdapter
from certbroker.adapters.demo.social_security import SocialSecurityAdapter
from certbroker.adapters.sdk import Adapter, close_adapters

#: record type -> adapter class (constructed with the path of its dataset file).
ADAPTERS: dict[str, Callable[[Path], Adapter]] = {
    "household": HouseholdAdapter,
    "social_security": SocialSecurityAdapter,
    "property": PropertyAdapter,
    "marriage": MarriageAdapter,
}


def ensure_datasets(dataset_dir: Path) -> None:
    """Generate the default synthetic datasets unless all four are already in ``dataset_dir``
    (whatever their seed and size: a test may have generated a smaller population), and the
    catalogue-declared demo types' datasets and SQL adapter configurations
    (:mod:`certbroker.adapters.demo.declared`) unless they are there."""
    if not all(synthetic.dataset_path(dataset_dir, rt).is_file() for rt in synthetic.DATASETS):
        synthetic.generate(dataset_dir)
    if not all(
        (dataset_dir / f"{rt}.sqlite").is_file() and declared.config_path(dataset_dir, rt).is_file()
        for rt in declared.DECLARED
    ):
        declared.generate(dataset_dir, citizens=_citizens(dataset_dir), seed=synthetic.DEFAULT_SEED)


def _citizens(dataset_dir: Path) -> int:
    """The population size the four datasets were generated for (a test's may be smaller)."""
    meta = synthetic.stored_meta(synthetic.dataset_path(dataset_dir, "household")) or {}
    return int(meta.get("citizens", synthetic.DEFAULT_CITIZENS))


def open_adapter(record_type: str, dataset_dir: Path) -> Adapter:
    """The demo adapter of one record type over its dataset in ``dataset_dir``."""
    return ADAPTERS[record_type](synthetic.dataset_path(dataset_dir, record_type))


def build(dataset_dir: Path) -> dict[str, Adapter]:
    """record type -> demo adapter, generating the datasets first if missing.

    The adapters hold read-only SQLite connections; release them with :func:`close_all`.
    """
    ensure_datasets(dataset_dir)
    return {record_type: open_adapter(record_type, dataset_dir) for record_type in ADAPTERS}


def close_all(adapters: Iterable[Adapter]) -> None:
    """Close adapters that hold resources (those with a ``close()``)."""
    close_adapters(adapters)
