"""Shared fixtures for the adapter tests: generated datasets, demo adapters, an unknown citizen."""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from certbroker.adapters import demo
from certbroker.adapters.demo import synthetic
from certbroker.adapters.sdk import Adapter
from certbroker.contract import resident_id

#: Population of the datasets most tests use (generation of the default size is tested apart).
SMALL = 300


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset, generated once per session (per xdist worker)."""
    path = tmp_path_factory.mktemp("datasets")
    synthetic.generate(path, citizens=SMALL)
    return path


@pytest.fixture(scope="session")
def full_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default-size synthetic dataset (3000 citizens, default seed)."""
    path = tmp_path_factory.mktemp("full-datasets")
    synthetic.generate(path)
    return path


@pytest.fixture
def adapters(dataset_dir: Path) -> Iterator[dict[str, Adapter]]:
    """The four demo adapters over the small dataset."""
    built = demo.build(dataset_dir)
    yield built
    demo.close_all(built.values())


@pytest.fixture(scope="session")
def unknown_id(dataset_dir: Path) -> str:
    """A valid resident ID of nobody in the small population."""
    path = synthetic.dataset_path(dataset_dir, "household")
    known = {row[0] for row in rows(path, "SELECT resident_id FROM residents")}
    for sequence in range(1, 1000):
        candidate = resident_id.make("110102", dt.date(1985, 3, 3), sequence)
        if candidate not in known:
            return candidate
    raise AssertionError("no free resident ID")


@pytest.fixture
def run() -> Callable[[Awaitable[Any]], Any]:
    """Run a coroutine to completion in a fresh event loop (pytest-asyncio is not installed)."""

    def _run(awaitable: Awaitable[Any]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(awaitable, timeout=30)

        return asyncio.run(bounded())

    return _run


def rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    """Query a dataset file directly (tests only)."""
    db = sqlite3.connect(path)
    try:
        db.row_factory = sqlite3.Row
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


@pytest.fixture(scope="session")
def query() -> Callable[..., list[sqlite3.Row]]:
    """``query(dataset_dir, record_type, sql, params=())`` -> rows of that dataset."""

    def _query(
        dataset_dir: Path, record_type: str, sql: str, params: tuple[object, ...] = ()
    ) -> list[sqlite3.Row]:
        return rows(synthetic.dataset_path(dataset_dir, record_type), sql, params)

    return _query
