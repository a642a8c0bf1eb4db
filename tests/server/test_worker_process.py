"""A worker process's own start-up (``certbroker.server.worker_process``), run here in the test's
main
thread: what it reports to the supervisor, and a SIGHUP that arrives while it starts."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from certbroker import config as config_mod
from certbroker.metrics import Metrics
from certbroker.server import app as server
from certbroker.server import worker_process
from certbroker.server.policy_holder import PolicyHolder
from tests.helpers import make_config


@pytest.fixture
def hup_restored() -> Iterator[None]:
    """The worker installs SIGHUP handlers in this (the test's) process: put pytest's back."""
    before = signal.getsignal(signal.SIGHUP)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, before)
        worker_process._hup_during_start = False


def _serve_until_ready(spec: worker_process.WorkerSpec) -> object:
    """Run the worker here until it reports; then close its pipe (it stops); its report."""
    parent, child = multiprocessing.Pipe(duplex=True)
    got: list[object] = []

    def supervisor() -> None:
        got.append(parent.recv())
        parent.close()  # the worker sees the pipe close and stops

    reader = threading.Thread(target=supervisor)
    reader.start()
    try:
        assert asyncio.run(worker_process._serve_worker(spec, child)) == 0
    finally:
        reader.join(timeout=60)
        child.close()
    return got[0]


def test_a_sighup_during_start_is_applied_before_the_worker_reports_ready(
    tmp_path: Path, dataset_dir: Path, monkeypatch: pytest.MonkeyPatch, hup_restored: None
) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(config_mod.DEFAULT_POLICY_DIR, policies)
    cfg = make_config(tmp_path, dataset_dir, policy_dir=policies)
    old = PolicyHolder(policies, Metrics(enabled=False)).current.version
    real_start = server.start

    async def start_then_change(config: config_mod.Config, **kwargs: Any) -> server.Broker:
        broker = await real_start(config, **kwargs)
        # The policies changed and the operator reloaded after this worker had read them,
        # before its reload handler was in place.
        with (policies / "rules.yaml").open("a", encoding="utf-8") as rules:
            rules.write("\n# changed while the worker started\n")
        os.kill(os.getpid(), signal.SIGHUP)
        return broker

    monkeypatch.setattr(server, "start", start_then_change)
    signal.signal(signal.SIGHUP, worker_process._remember_hup)  # as worker_main does
    ready = _serve_until_ready(worker_process.WorkerSpec(0, cfg, checkpoints=False))
    new = PolicyHolder(policies, Metrics(enabled=False)).current.version
    assert new != old
    assert isinstance(ready, worker_process.Ready)
    assert ready.policy_version == new


def test_without_a_sighup_the_worker_reports_the_version_it_read(
    tmp_path: Path, dataset_dir: Path, hup_restored: None
) -> None:
    cfg = make_config(tmp_path, dataset_dir)
    signal.signal(signal.SIGHUP, worker_process._remember_hup)
    ready = _serve_until_ready(worker_process.WorkerSpec(0, cfg, checkpoints=False))
    assert isinstance(ready, worker_process.Ready)
    assert (
        ready.policy_version == PolicyHolder(cfg.policy_dir, Metrics(enabled=False)).current.version
    )
