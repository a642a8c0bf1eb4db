"""The four demo department adapters over the synthetic datasets, for the broker's embedded
in-process default and for ``python -m certbroker.adapters``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from certbroker.adapters.demo import synthetic
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
    (whatever their seed and size: a test may have generated a smaller population)."""
    if not all(synthetic.dataset_path(dataset_dir, rt).is_file() for rt in synthetic.DATASETS):
        synthetic.generate(dataset_dir)


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
