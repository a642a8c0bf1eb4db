"""Shared fixtures: real brokers on port 0, real SQLite files in tmp dirs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker.auth import DevIdentityProvider
from certbroker.v1 import broker_pb2_grpc
from tests.helpers import BrokerThread, Env, make_config


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo departments' datasets, generated once per test process."""
    from adapters import synthetic

    path = tmp_path_factory.mktemp("datasets")
    synthetic.generate(path)
    return path


@pytest.fixture
def env(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    cfg = make_config(tmp_path, dataset_dir)
    broker = BrokerThread(cfg)
    channel = grpc.insecure_channel(broker.target)
    try:
        yield Env(
            broker,
            cfg.state_dir,
            dataset_dir,
            DevIdentityProvider(cfg.state_dir),
            channel,
            broker_pb2_grpc.CertificateBrokerStub(channel),
        )
    finally:
        channel.close()
        broker.stop()
