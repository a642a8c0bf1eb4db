"""One worker process of ``certbroker serve --workers N`` (see :mod:`certbroker.server.workers`).

Runs in a fresh interpreter (multiprocessing "spawn"): the ordinary broker bound with
SO_REUSEPORT, reporting :class:`Ready` (or :class:`Failed`) to the supervisor over a pipe. It
stops on SIGTERM or when that pipe closes (the supervisor is gone) the way a broker on its own
does (health NOT_SERVING, in-flight calls finish within ``[server] shutdown_grace_s``; see
:mod:`certbroker.server.app`), reloads policies on SIGHUP, and keeps its in-memory registry in
step with the shared registry file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Final

from certbroker import logs
from certbroker.config import Config
from certbroker.server import eventloop

if TYPE_CHECKING:
    from certbroker.server.app import Broker

log = logging.getLogger(__name__)

#: How long a stopping worker may take beyond its grace period (``[server]
#: shutdown_grace_s``) to close its parts, before the supervisor kills it.
CLOSE_MARGIN_S: Final = 10.0
#: How often a worker looks for registry and control changes made through another worker.
REGISTRY_FOLLOW_S: Final = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process is told: the configuration with its ports filled in."""

    index: int
    config: Config  # port = the shared port; metrics_port = this worker's
    checkpoints: bool  # worker 0 signs checkpoints (and archives)


@dataclass(frozen=True)
class Ready:
    """Sent by a worker once it serves."""

    index: int
    pid: int
    port: int
    metrics_port: int
    policy_version: str


@dataclass(frozen=True)
class Failed:
    """Sent by a worker whose start failed (before it ever served)."""

    index: int
    reason: str


def worker_main(spec: WorkerSpec, parent: Connection) -> None:
    """Entry point of a worker process (runs in a fresh interpreter)."""
    # Ctrl-C reaches the whole process group: the parent decides when workers stop (SIGTERM).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP's default action is to exit. Until the reload handler is in place, one is only
    # remembered: the policy files may have changed after this worker read them.
    signal.signal(signal.SIGHUP, _remember_hup)
    logs.configure(
        spec.config.log_format,
        spec.config.log_level,
        text_format=f"%(asctime)s %(levelname)s [worker {spec.index} pid %(process)d] "
        "%(name)s: %(message)s",
        static={"worker": spec.index},
    )
    sys.exit(eventloop.run(_serve_worker(spec, parent)))


_hup_during_start = False


def _remember_hup(_signum: int, _frame: object) -> None:
    global _hup_during_start  # noqa: PLW0603 - a signal handler has nowhere else to write
    _hup_during_start = True


async def _serve_worker(spec: WorkerSpec, parent: Connection) -> int:
    from certbroker.server import app as server

    loop = asyncio.get_running_loop()
    try:
        broker = await server.start(spec.config, reuse_port=True, checkpoints=spec.checkpoints)
    except Exception as exc:  # reported to the parent, which stops everything
        log.exception("worker %d could not start", spec.index)
        with contextlib.suppress(OSError):
            parent.send(Failed(spec.index, f"{type(exc).__name__}: {exc}"))
        return 2
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if _hup_during_start:  # a reload asked for while starting: done before serving is reported
        await broker.reload_now()

    def parent_gone() -> None:
        # The parent never writes to this pipe: readable means it closed (the parent is gone).
        loop.remove_reader(parent.fileno())
        stop.set()

    loop.add_reader(parent.fileno(), parent_gone)
    follower = asyncio.create_task(_follow_shared_state(broker), name="shared-state-follower")
    try:
        parent.send(
            Ready(
                spec.index,
                os.getpid(),
                broker.port,
                broker.metrics_port,
                broker.policies.current.version,
            )
        )
        await stop.wait()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        loop.remove_reader(parent.fileno())
        await broker.stop()  # drained within [server] shutdown_grace_s
    return 0


async def _follow_shared_state(broker: Broker) -> None:
    """Pick up what other workers wrote to the files the workers share: registry changes, and
    the security officers' controls (a clerk disabled through one worker is refused by all,
    within a second; each worker enforces from memory, so it must re-read)."""
    controls = broker.auth.controls
    while True:
        await asyncio.sleep(REGISTRY_FOLLOW_S)
        try:
            await asyncio.to_thread(broker.registry.refresh)
        except Exception:
            log.exception("re-reading the registry file failed")
        if controls is None:
            continue
        try:
            await asyncio.to_thread(controls.refresh)
        except Exception:
            log.exception("re-reading the controls file failed")
