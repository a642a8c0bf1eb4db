"""Start and stop of an in-process broker: a start that fails at a late step closes what it had
opened, a stop closes every part even when one part's close fails, and an open health Watch
does not hold a stop for the whole grace period."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certbroker.metrics import Metrics
from certbroker.routing.router import Router
from certbroker.server import app as server
from certbroker.server import ports
from tests.helpers import BrokerThread, make_config

WRITER = "certbroker-audit-writer"  # certbroker.audit.writer's thread


def writer_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == WRITER and t.is_alive())


def open_files_under(path: Path) -> list[str]:
    """Files under ``path`` this process holds open (the audit log, the registry file...)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since listed (the listing's own descriptor)
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


def closed(http: WSGIServer) -> bool:
    return http.socket.fileno() == -1


@pytest.fixture
def metrics_servers(monkeypatch: pytest.MonkeyPatch) -> list[WSGIServer]:
    """Every /metrics server a broker starts in this test."""
    started: list[WSGIServer] = []
    real = Metrics.serve

    def spy(self: Metrics, host: str, port: int) -> tuple[WSGIServer, int]:
        http, bound = real(self, host, port)
        started.append(http)
        return http, bound

    monkeypatch.setattr(Metrics, "serve", spy)
    return started


def test_a_start_that_fails_at_the_checkpoint_key_closes_the_audit_writer(
    tmp_path: Path, dataset_dir: Path
) -> None:
    key = tmp_path / "checkpoint.pem"
    key.write_text("not a PEM key\n")
    cfg = make_config(tmp_path, dataset_dir, checkpoint_key=key)
    before = writer_threads()
    # The registry file, the routes and the audit writer are open when the key is read.
    with pytest.raises(server.StartError, match=r"checkpoint signing key .*checkpoint\.pem"):
        asyncio.run(server.start(cfg))
    assert writer_threads() == before
    assert open_files_under(cfg.state_dir) == []


def test_a_start_that_fails_at_the_metrics_port_closes_everything(
    tmp_path: Path, dataset_dir: Path, metrics_servers: list[WSGIServer]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = replace(make_config(tmp_path, dataset_dir), metrics_port=taken.getsockname()[1])
        before = writer_threads()
        with pytest.raises(server.StartError, match="cannot bind metrics port"):
            asyncio.run(server.start(cfg))
    assert writer_threads() == before
    assert open_files_under(cfg.state_dir) == []
    assert metrics_servers == []


def test_a_start_that_fails_at_the_last_step_closes_everything(
    tmp_path: Path,
    dataset_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    metrics_servers: list[WSGIServer],
) -> None:
    """The gRPC bind is the last step that can fail: the metrics endpoint is up by then."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = replace(make_config(tmp_path, dataset_dir), port=taken.getsockname()[1])
        before = writer_threads()
        # Taken between the early check and the bind: grpc's own bind fails.
        monkeypatch.setattr(ports, "check_free", lambda host, port: None)
        with pytest.raises(ports.PortInUse, match="cannot bind gRPC port"):
            asyncio.run(server.start(cfg))
    assert writer_threads() == before
    assert open_files_under(cfg.state_dir) == []
    (http,) = metrics_servers
    assert closed(http)


def test_stop_closes_every_part_when_one_fails_to_close(
    tmp_path: Path,
    dataset_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    metrics_servers: list[WSGIServer],
) -> None:
    async def broken(self: Router) -> None:
        raise RuntimeError("the routes would not close")

    monkeypatch.setattr(Router, "aclose", broken)
    cfg = make_config(tmp_path, dataset_dir)
    before = writer_threads()

    async def main() -> server.Broker:
        broker = await server.start(cfg)
        assert writer_threads() == before + 1
        with pytest.raises(server.StopError, match="would not close") as failed:
            await broker.stop(0)
        assert isinstance(failed.value.__cause__, RuntimeError)
        return broker

    with caplog.at_level(logging.ERROR, logger="certbroker.server.app"):
        broker = asyncio.run(main())
    assert "closing the department routes failed" in caplog.text
    # Closed before the failing part (it closes in reverse order of opening) and after it.
    (http,) = metrics_servers
    assert closed(http)
    assert writer_threads() == before
    assert open_files_under(cfg.state_dir) == []
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{broker.metrics_port}/metrics", timeout=5)


def test_an_open_health_watch_does_not_hold_the_stop(tmp_path: Path, dataset_dir: Path) -> None:
    broker = BrokerThread(make_config(tmp_path, dataset_dir))
    assert broker.broker is not None
    seen: list[Any] = []
    with grpc.insecure_channel(broker.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        seen.append(next(watch).status)
        started = time.monotonic()
        broker.call(broker.broker.stop(grace=60))  # no call of ours in flight
        took = time.monotonic() - started
        seen.extend(reply.status for reply in watch)  # the stream ends after NOT_SERVING
    broker.stop()
    assert seen == [
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    ]
    assert took < 30, f"the stop waited {took:.1f} s for a health Watch"
