"""Who may serve on the gRPC port: one broker, or the workers of one ``serve --workers``.

grpcio sets SO_REUSEPORT on its listening sockets by default on Linux. Two brokers with
different state directories would then both bind one port and the kernel would split clients
between two separate audit logs, each broker printing READY. So:

* a broker on its own binds with ``grpc.so_reuseport = 0`` (:func:`server_options`); binding a
  port anything listens on fails. :func:`check_free` tries first, with a plain socket, so the
  error names the port and the reason instead of grpc's generic "Failed to bind";
* the workers of ``serve --workers N`` bind with SO_REUSEPORT, which lets them share the port.
  Who joins that group is decided by their supervisor (:mod:`certbroker.server.workers`): it
  checks the port free (:func:`check_free`, which fails while any worker listens) and then
  holds it with :func:`hold`, a bound SO_REUSEPORT socket that never listens, for as long as
  it runs. A second ``serve`` (with or without ``--workers``) finds the port taken by the
  listening workers or, while every worker is restarting, by that holder: neither sets
  SO_REUSEPORT on its check, so the kernel refuses it. Only sockets with SO_REUSEPORT (of
  the same user) can join the group, and the only such sockets certbroker creates are the
  workers its supervisor spawned after its own check passed.

Both checks set SO_REUSEADDR, as grpc does: connections of a broker stopped a moment ago wait
in TIME_WAIT on the port, and a restart must not be refused because of them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Iterator

log = logging.getLogger(__name__)


class PortInUse(OSError):
    """The gRPC port is taken (or cannot be bound); the message says which and why."""


def server_options(reuse_port: bool) -> list[tuple[str, int]]:
    """grpc server options: SO_REUSEPORT only for the workers of one supervisor."""
    return [("grpc.so_reuseport", 1 if reuse_port else 0)]


def _address(host: str, port: int) -> tuple[int, int, int, tuple[object, ...]]:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise PortInUse(f"cannot resolve {host!r}: {exc}") from exc
    return family, kind, proto, address


def _refused(host: str, port: int, exc: OSError) -> PortInUse:
    hint = (
        " (another certbroker, or another program, is serving there)"
        if exc.errno == errno.EADDRINUSE
        else ""
    )
    return PortInUse(f"cannot bind gRPC port {host}:{port}: {exc.strerror or exc}{hint}")


def check_free(host: str, port: int) -> None:
    """Raise :class:`PortInUse` unless ``host:port`` could be bound by a broker on its own.

    Port 0 (any free port) always can. The check binds and closes at once: a port taken a
    moment later still fails grpc's own bind, with a less precise message.
    """
    if not port:
        return
    family, kind, proto, address = _address(host, port)
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise _refused(host, port, exc) from exc


@contextlib.contextmanager
def hold(host: str, port: int) -> Iterator[int]:
    """Check ``host:port`` free, then hold it for a group of workers while the context lasts;
    yields the port number (0 = a free port chosen now). Raises :class:`PortInUse`.

    The holder is a bound SO_REUSEPORT socket that never listens: the kernel gives it no
    connections, the workers (SO_REUSEPORT too) can still bind beside it, and nothing without
    SO_REUSEPORT can. It has no SO_REUSEADDR, which would let a plain SO_REUSEADDR socket (a
    broker on its own) bind beside it while no worker listens. That also means it cannot be
    bound while connections of an earlier broker that did not use SO_REUSEPORT are still in
    TIME_WAIT on the port (up to a minute after that broker stopped); the workers then serve
    without the holder, and the port is protected only while at least one of them listens.
    """
    check_free(host, port)
    family, kind, proto, address = _address(host, port)
    holder = socket.socket(family, kind, proto)
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(address)
    except OSError as exc:
        holder.close()
        if not port or exc.errno != errno.EADDRINUSE:
            raise _refused(host, port, exc) from exc
        log.warning(
            "cannot hold gRPC port %s:%d between worker restarts (connections of an earlier "
            "server are still closing); it stays ours while a worker listens",
            host,
            port,
        )
        yield port
        return
    try:
        yield int(holder.getsockname()[1])
    finally:
        holder.close()
