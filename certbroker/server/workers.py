"""``certbroker serve --workers N``: N broker processes sharing one gRPC port and one audit log.

The parent is a small supervisor; it never creates a gRPC object. Following grpc's
multiprocessing example, each worker is a fresh interpreter (multiprocessing "spawn", so
nothing of the parent's state, gRPC's included, is inherited) that runs the ordinary broker
(:func:`certbroker.server.app.start`) bound with ``grpc.so_reuseport``: the kernel spreads incoming
connections over the workers (one connection stays with one worker).

What the parent does:

* prepares the shared state once, before any worker exists: key files, the audit log's schema
  (SQLite file or PostgreSQL schema), the registry file -- so workers never race to create them;
* holds the port before anything else (:func:`certbroker.server.ports.hold`): a configured port
  is checked free first (a bind without SO_REUSEPORT, which fails while anything serves there,
  a broker on its own or the workers of another ``serve --workers``), then reserved with an
  SO_REUSEPORT socket that never listens; port 0 picks a free port that way and tells every
  worker. The reservation lives as long as the parent, so a restarted worker gets the same
  port, and nothing but this parent's workers can join them on it;
* starts the workers and waits for each to report ready, then writes the pid file (its own pid:
  ``certbroker policy reload`` signals the parent), prints one ``WORKER index=I pid=P port=...
  metrics_port=M policy=V`` line per worker and ``READY port=P metrics_port=M0 workers=N``;
* forwards SIGHUP (policy reload) to every worker; SIGTERM/SIGINT stop all workers: each gets
  SIGTERM and drains as a broker on its own does (health NOT_SERVING, no new calls, in-flight
  calls finish within ``[server] shutdown_grace_s``), and is killed only if it has not exited
  :data:`~certbroker.server.worker_process.CLOSE_MARGIN_S` after that; the parent exits 0;
* restarts a worker that dies after it was ready (a crash, an OOM kill), printing a new
  ``WORKER`` line with ``restarts=K``. A worker that fails to *start*, or more than
  :data:`MAX_RESTARTS` deaths within :data:`RESTART_WINDOW_S`, stops everything: exit 1.
  A dead worker loses nothing durable: an answer leaves only after its audit entry committed,
  and a transaction cut short by the kill is rolled back by the database.

Shared or not, per worker:

* the audit log is shared: every append reads the tail inside the database's write lock
  (SQLite ``BEGIN IMMEDIATE`` / PostgreSQL advisory lock), so the chain and the Merkle tree stay
  one sequence; each worker's group commit batches its own callers;
* only worker 0 runs the periodic checkpoint (and archive) task; its replacement takes it over;
* metrics are per worker (each has its own registry): worker ``i`` serves ``/metrics`` on
  ``metrics_port + i``, or on any free port when ``metrics_port`` is 0 (see the ``WORKER``
  lines). Scrape every worker and sum;
* the registry file is shared; each worker keeps a copy in memory for routing and re-reads the
  file when another worker changed it (checked every second);
* circuit breakers, caches and adapter channels are per worker;
* the policy set is loaded by each worker; a SIGHUP reloads it in each (one audited reload
  entry per worker). A worker (re)started after an edit loads the edited set directly.

Each worker exits when the parent goes away (it watches its pipe to the parent), so workers
never outlive a killed supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Final

from certbroker.config import Config, ConfigError
from certbroker.server import eventloop, ports
from certbroker.server.worker_process import (
    CLOSE_MARGIN_S,
    Failed,
    Ready,
    WorkerSpec,
    worker_main,
)

log = logging.getLogger(__name__)

#: A worker that died after it was ready is restarted, unless this many restarts already
#: happened within :data:`RESTART_WINDOW_S` (then the parent gives up and exits 1).
MAX_RESTARTS: Final = 5
RESTART_WINDOW_S: Final = 60.0
#: How long a worker may take to start (imports, keys, audit log) before the parent gives up.
START_TIMEOUT_S: Final = 120.0


class WorkerError(Exception):
    """The workers could not be started (port in use, a worker failed); the message says why."""


# --- the parent ---------------------------------------------------------------------------


def worker_metrics_port(metrics_port: int, index: int) -> int:
    """Worker ``index``'s metrics port: ``metrics_port + index``, or 0 (any) when it is 0."""
    return metrics_port + index if metrics_port else 0


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` for the workers (0 = pick a free port); yields the port number.

    :func:`certbroker.server.ports.hold`: refused if anything serves there already (even
    another broker that would otherwise share it silently); while held, only sockets with
    SO_REUSEPORT -- this parent's workers -- can bind it.
    """
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(ports.hold(host, port))
        except ports.PortInUse as exc:
            raise WorkerError(str(exc)) from exc
        yield held


async def prepare(config: Config) -> None:
    """Create the shared state once (keys, audit schema, registry file) before any worker."""
    from certbroker.audit import open_audit_log
    from certbroker.audit.integrity.proofs import CheckpointSigner
    from certbroker.auth.authenticator import DevIdentityProvider
    from certbroker.routing.decision_token import DecisionSigner
    from certbroker.routing.registry.store import RegistryStore

    config.state_dir.mkdir(parents=True, exist_ok=True)
    if config.dev_idp:
        DevIdentityProvider(config.state_dir)
    DecisionSigner(config.state_dir)
    CheckpointSigner.load(config.state_dir, config.checkpoint_key)
    await asyncio.to_thread(
        lambda: RegistryStore(config.state_dir / "registry.sqlite", lease_s=config.lease_s).close()
    )
    audit = await asyncio.to_thread(open_audit_log, config.audit_location)
    await audit.aclose()


@dataclass
class _Slot:
    """One worker position (index) and the process currently filling it."""

    index: int
    process: BaseProcess | None = None
    conn: Connection | None = None
    ready: Ready | None = None
    restarts: int = 0


@dataclass
class Supervisor:
    """Starts, watches, restarts and stops the workers (see the module docstring)."""

    config: Config
    workers: int
    port: int
    out: Callable[[str], None]
    _slots: list[_Slot] = field(default_factory=list)
    _deaths: list[float] = field(default_factory=list)  # monotonic times of restarts
    _stopping: bool = False
    _exit_code: int = 0
    _done: asyncio.Event = field(default_factory=asyncio.Event)
    _all_ready: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(self.workers)]

    async def run(self) -> int:
        """Serve until stopped; the exit status (0 = stopped on request)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._forward_hup)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop, 0)
        for slot in self._slots:
            self._spawn(slot)
        pid_path = None
        try:
            ready = asyncio.ensure_future(self._all_ready.wait())
            done = asyncio.ensure_future(self._done.wait())
            finished, _ = await asyncio.wait(
                {ready, done}, timeout=START_TIMEOUT_S, return_when="FIRST_COMPLETED"
            )
            ready.cancel()
            if not finished:
                log.error("workers did not start within %.0f s", START_TIMEOUT_S)
                self.stop(1)
            if not self._stopping:
                from certbroker.server.app import pid_file

                pid_path = pid_file(self.config.state_dir)
                pid_path.write_text(f"{os.getpid()}\n")
                self._announce_ready()
            await done
            await self._stop_all()
        finally:
            if pid_path is not None:
                pid_path.unlink(missing_ok=True)
            for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return self._exit_code

    def stop(self, code: int) -> None:
        """Stop every worker; the parent exits with ``code`` (the first one given wins)."""
        if not self._stopping:
            log.info("stopping %d workers", self.workers)
            self._stopping = True
            self._exit_code = code
        self._done.set()

    def _spawn(self, slot: _Slot) -> None:
        cfg = replace(
            self.config,
            port=self.port,
            metrics_port=worker_metrics_port(self.config.metrics_port, slot.index),
        )
        spec = WorkerSpec(slot.index, cfg, checkpoints=slot.index == 0)
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(spec, child_end),
            name=f"certbroker-worker-{slot.index}",
        )
        process.start()
        child_end.close()  # only the worker holds it now: its death closes the pipe
        slot.process, slot.conn, slot.ready = process, parent_end, None
        loop = asyncio.get_running_loop()
        loop.add_reader(parent_end.fileno(), self._on_message, slot, parent_end)
        loop.add_reader(process.sentinel, self._on_exit, slot, process)

    def _on_message(self, slot: _Slot, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        try:
            message = conn.recv()
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())  # the worker is gone; _on_exit handles it
            return
        if isinstance(message, Failed):
            log.error("worker %d failed to start: %s", message.index, message.reason)
            self.stop(1)
        elif isinstance(message, Ready):
            slot.ready = message
            if self._all_ready.is_set():  # a replacement after a crash
                self._print_worker(message, slot.restarts)
            elif all(s.ready is not None for s in self._slots):
                self._all_ready.set()

    def _on_exit(self, slot: _Slot, process: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        process.join()
        if slot.conn is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(slot.conn.fileno())
            slot.conn.close()
            slot.conn = None
        was_ready = slot.ready is not None
        slot.process, slot.ready = None, None
        if self._stopping:
            if process.exitcode not in (0, -signal.SIGTERM):
                log.warning("worker %d stopped with %s", slot.index, _exit_text(process.exitcode))
            if all(s.process is None for s in self._slots):
                self._done.set()
            return
        how = _exit_text(process.exitcode)
        if not was_ready:
            log.error("worker %d (pid %s) exited before serving (%s)", slot.index, process.pid, how)
            self.stop(1)
            return
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S] + [now]
        if len(self._deaths) > MAX_RESTARTS:
            log.error(
                "worker %d (pid %s) died (%s): more than %d restarts in %.0f s, giving up",
                slot.index,
                process.pid,
                how,
                MAX_RESTARTS,
                RESTART_WINDOW_S,
            )
            self.stop(1)
            return
        slot.restarts += 1
        log.warning("worker %d (pid %s) died (%s); restarting it", slot.index, process.pid, how)
        self._spawn(slot)

    def _forward_hup(self) -> None:
        for slot in self._slots:
            if slot.process is not None and slot.process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.process.pid, signal.SIGHUP)

    async def _stop_all(self) -> None:
        self._stopping = True
        live = [s.process for s in self._slots if s.process is not None]
        for process in live:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace_s + CLOSE_MARGIN_S
        while any(s.process is not None for s in self._slots):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for slot in self._slots:
                    if slot.process is not None:
                        log.error("worker %d did not stop in time; killing it", slot.index)
                        slot.process.kill()
                remaining = 5.0
                deadline = time.monotonic() + remaining
            self._done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._done.wait(), remaining)

    def _announce_ready(self) -> None:
        readies = [s.ready for s in self._slots if s.ready is not None]
        for ready in readies:
            self._print_worker(ready, 0)
        first = readies[0]
        ports = ", ".join(f":{r.metrics_port}" for r in readies)
        self.out(
            f"certbroker serving on {self.config.host}:{self.port} with {self.workers} workers "
            f"(metrics on {ports}); state in {self.config.state_dir}; "
            f"policy {first.policy_version[:12]}"
        )
        self.out(f"READY port={self.port} metrics_port={first.metrics_port} workers={self.workers}")

    def _print_worker(self, ready: Ready, restarts: int) -> None:
        self.out(
            f"WORKER index={ready.index} pid={ready.pid} port={ready.port} "
            f"metrics_port={ready.metrics_port} policy={ready.policy_version[:12]} "
            f"restarts={restarts}"
        )


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit status {code}"


def _print(line: str) -> None:
    print(line, flush=True)


def run(config: Config, out: Callable[[str], None] = _print) -> int:
    """``certbroker serve`` with ``config.workers`` worker processes; the exit status."""
    if config.workers < 2:
        raise ConfigError(
            "certbroker.server.workers.run needs at least 2 workers (1 runs in process)"
        )

    async def main() -> int:
        # The port first: a second broker on it is refused before it creates any state.
        with reserve_port(config.host, config.port) as port:
            await prepare(config)
            return await Supervisor(config, config.workers, port, out).run()

    # Raises WorkerError, BrokerError or OSError if the start fails before any worker ran
    # (nothing to stop then); `certbroker serve` reports it and exits 1.
    return eventloop.run(main())
