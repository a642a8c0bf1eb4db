"""``serve --workers`` around the serving itself: a worker that cannot start, the port
reservation, the setting, per-worker metrics ports, the registry file workers share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from certbroker import config
from certbroker.routing.registry.store import RegistryStore
from certbroker.server import workers

CLI = [sys.executable, "-m", "certbroker"]
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 90.0


def _held_port_with_free_successor() -> socket.socket:
    """A listening socket on a port P whose P + 1 was free a moment ago: worker 0's metrics
    port taken, worker 1's (P + 1) free, so that worker 0 is the one that fails. (With P + 1
    in use elsewhere by chance, worker 1 would fail first and the test would be about luck.)"""
    for _ in range(50):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        try:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", taken.getsockname()[1] + 1))
        except OSError:
            taken.close()
            continue
        taken.listen()
        return taken
    raise AssertionError("no port P with P + 1 free in 50 tries")


def test_a_worker_that_cannot_start_stops_everything(tmp_path: Path, dataset_dir: Path) -> None:
    with _held_port_with_free_successor() as taken:  # worker 0's metrics port is held
        flags = ["--workers", "2", "--port", "0", "--metrics-port", str(taken.getsockname()[1])]
        proc = subprocess.run(
            [*CLI, "serve", *flags, "--state-dir", str(tmp_path / "state")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env={**os.environ, "CERTBROKER_DATASET_DIR": str(dataset_dir)},
            check=False,
        )
    assert proc.returncode == 1
    assert "READY" not in proc.stdout
    assert "worker 0 failed to start" in proc.stderr
    assert not (tmp_path / "state" / "broker.pid").exists()


def test_reserve_port_refuses_a_port_in_use_and_shares_its_own() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with (
            pytest.raises(workers.WorkerError, match="cannot bind gRPC port"),
            workers.reserve_port("127.0.0.1", busy),
        ):
            pass
    with workers.reserve_port("127.0.0.1", 0) as port:
        assert port > 0
        for _ in range(2):  # what each worker's gRPC server does: SO_REUSEPORT, then listen
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # nobody else gets it while reserved


def test_workers_setting_and_metrics_ports(tmp_path: Path) -> None:
    file = tmp_path / "b.toml"
    file.write_text("[server]\nworkers = 3\n")
    assert config.load(file, env={}).workers == 3
    assert config.load(None, env={"CERTBROKER_WORKERS": "4"}).workers == 4
    assert config.load(None, env={}).workers == 1
    for bad in (0, -1, config.MAX_WORKERS + 1):
        with pytest.raises(config.ConfigError, match=r"server\.workers"):
            config.load(None, env={}, workers=bad)
    assert [workers.worker_metrics_port(9464, i) for i in range(3)] == [9464, 9465, 9466]
    assert workers.worker_metrics_port(0, 2) == 0


def test_registry_written_by_one_worker_routes_from_another(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    first, second = RegistryStore(path), RegistryStore(path)  # two workers' stores
    try:
        assert second.refresh() is False  # nothing changed since it opened
        first.register("civil_affairs", ["marriage"], "127.0.0.1:7004", "1")
        assert second.live_endpoints("civil_affairs", "marriage") == []  # memory only
        assert second.refresh() is True
        assert second.live_endpoints("civil_affairs", "marriage") == ["127.0.0.1:7004"]
        assert second.refresh() is False
        (instance,) = second.instances()
        second.remove(instance.instance_id)
        assert first.refresh() is True
        assert first.instances() == []
        assert second.refresh() is False  # its own change is already in its memory
    finally:
        first.close()
        second.close()
