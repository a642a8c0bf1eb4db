"""Who may serve on the gRPC port (certbroker.server.ports), with real ``certbroker serve``
processes: a second broker on a port in use is refused with a clear message and exit status 1,
whether it or the first runs ``--workers``; a restart right after a stop is not refused."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certbroker.server import ports
from tests.server.serving import Serve, run_serve, serve

ANY = ("--metrics-port", "0")


def serving(s: Serve) -> bool:
    with grpc.insecure_channel(s.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def assert_refused(tmp_path: Path, dataset_dir: Path, port: int, *args: str, name: str) -> None:
    code, out, err = run_serve(tmp_path, dataset_dir, "--port", str(port), *ANY, *args, name=name)
    assert code == 1, err
    assert not any(line.startswith("READY") for line in out)
    assert f"error: cannot bind gRPC port 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err
    assert not (tmp_path / name).exists()  # refused before it created any state


def test_a_second_broker_on_a_brokers_port_is_refused(tmp_path: Path, dataset_dir: Path) -> None:
    first = serve(tmp_path, dataset_dir, "--port", "0", *ANY, name="first")
    try:
        assert_refused(tmp_path, dataset_dir, first.port, name="second")
        assert_refused(tmp_path, dataset_dir, first.port, "--workers", "2", name="group")
        assert serving(first)
    finally:
        assert first.stop() == 0


def test_a_worker_group_keeps_its_port_to_itself(tmp_path: Path, dataset_dir: Path) -> None:
    group = serve(tmp_path, dataset_dir, "--port", "0", *ANY, "--workers", "2", name="group")
    try:
        assert_refused(tmp_path, dataset_dir, group.port, name="single")
        assert_refused(tmp_path, dataset_dir, group.port, "--workers", "2", name="other-group")
        assert serving(group)
    finally:
        assert group.stop() == 0


def closed_by_the_server(conn: socket.socket) -> None:
    """Read ``conn`` to its end, then close it: the server closed first, so its side of the
    connection waits in TIME_WAIT. (Closing with unread data would reset it instead; a server
    process that exits before it accepted the connection resets it too, leaving nothing.)"""
    with conn, contextlib.suppress(ConnectionResetError):
        while conn.recv(4096):
            pass


def test_a_broker_restarts_on_its_port_at_once(tmp_path: Path, dataset_dir: Path) -> None:
    """Connections of the broker stopped a moment ago wait in TIME_WAIT on the port: that is
    no conflict, for a broker on its own nor for a group of workers."""
    first = serve(tmp_path, dataset_dir, "--port", "0", *ANY, name="first")
    port, state = first.port, first.state_dir
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert first.stop() == 0
    closed_by_the_server(conn)  # a plain bind (the supervisor's old check) now fails
    args = ("--port", str(port), *ANY)
    group = serve(tmp_path, dataset_dir, *args, "--workers", "2", name="group", state_dir=state)
    conn = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert serving(group)
    assert group.stop() == 0
    closed_by_the_server(conn)
    again = serve(tmp_path, dataset_dir, *args, name="again", state_dir=state)
    assert serving(again)
    assert again.stop() == 0


def test_the_port_checks() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(ports.PortInUse, match=f"127.0.0.1:{busy}: Address already in use"):
            ports.check_free("127.0.0.1", busy)
    ports.check_free("127.0.0.1", 0)
    with ports.hold("127.0.0.1", 0) as held:
        with pytest.raises(ports.PortInUse):  # a broker on its own cannot bind a held port
            ports.check_free("127.0.0.1", held)
        with socket.socket() as worker:  # a worker can
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", held))
            worker.listen()
            with pytest.raises(ports.PortInUse), ports.hold("127.0.0.1", held):  # nor a group
                pass
    assert ports.server_options(False) == [("grpc.so_reuseport", 0)]
