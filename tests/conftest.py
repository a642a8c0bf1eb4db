"""Shared fixtures: real brokers on port 0, real SQLite files in tmp dirs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from certbroker.server import eventloop
from tests.helpers import Env, make_config, running_env

# The suite runs on the event loop the broker runs on (uvloop where installed): every
# asyncio.run() and new_event_loop() in the tests makes one from here on.
if eventloop.loop_name() == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
# Brokers under test write entry format 2 (compact), the format the broker ships, unless a
# test asks for 1 (the `entry_format_1` fixture, tests/helpers.py): the variable reaches the
# `certbroker serve` processes tests start, too. Logs mixing both formats:
# tests/audit/test_audit_compact.py and tests/audit/test_mixed_log_end_to_end.py.
os.environ.setdefault("CERTBROKER_AUDIT_ENTRY_FORMAT", "2")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo departments' datasets, generated once per test process."""
    from certbroker.adapters.demo import synthetic

    path = tmp_path_factory.mktemp("datasets")
    synthetic.generate(path)
    return path


@pytest.fixture
def couple(dataset_dir: Path) -> tuple[str, str]:
    """A married couple from the datasets (``synthetic.sample_couple``)."""
    from certbroker.adapters.demo import synthetic

    return synthetic.sample_couple(dataset_dir)


@pytest.fixture
def env(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    with running_env(make_config(tmp_path, dataset_dir), dataset_dir) as env:
        yield env
