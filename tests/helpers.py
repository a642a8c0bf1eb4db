"""Test helpers: a real broker on port 0 in a background event loop, and a clerk's view of it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker import config as config_mod
from certbroker.audit.store.db import connect_read
from certbroker.audit.store.rows import StoredRow, iter_rows, select_rows
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.server import app as server
from certbroker.v1 import broker_pb2_grpc


class BrokerThread:
    """Runs ``server.start(config)`` on its own event loop thread until ``stop``.

    ``start_kwargs`` go to :func:`certbroker.server.app.start` (e.g. ``lease_clock=FakeClock()``).
    """

    def __init__(self, cfg: config_mod.Config, **start_kwargs: Any) -> None:
        self.config = cfg
        self._start_kwargs = start_kwargs
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.broker: server.Broker | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        assert self.broker is not None, "broker did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.broker = self.loop.run_until_complete(
                server.start(self.config, **self._start_kwargs)
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced to the test thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the broker's loop (e.g. to reach the audit log)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def target(self) -> str:
        assert self.broker is not None
        return f"127.0.0.1:{self.broker.port}"

    def stop(self) -> None:
        if self.broker is not None:
            self.call(self.broker.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        self.loop.close()


@dataclass
class Env:
    """A running broker plus what a test needs to talk to it as a clerk."""

    broker: BrokerThread
    state_dir: Path
    dataset_dir: Path
    idp: DevIdentityProvider
    channel: grpc.Channel
    stub: broker_pb2_grpc.CertificateBrokerStub

    def token(
        self,
        roles: tuple[str, ...] = ("window_clerk",),
        office: str = "",
        sub: str = "clerk-001",
        **kw: Any,
    ) -> str:
        return self.idp.issue(sub, roles, office or DEFAULT_OFFICE, **kw)

    def md(self, token: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {token}"),)


@contextlib.contextmanager
def running_env(cfg: config_mod.Config, dataset_dir: Path, **start_kwargs: Any) -> Iterator[Env]:
    """A broker on ``cfg`` (``start_kwargs`` go to :class:`BrokerThread`) and a clerk's view of
    it; stopped on exit. The one way tests bring up an in-process broker."""
    broker = BrokerThread(cfg, **start_kwargs)
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


DEFAULT_OFFICE = "gz-haizhu-24h-01"


class FakeClock:
    """A clock tests move by hand: pass it where code takes ``clock``/``*_clock`` callables."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()  # read from the broker's loop thread, moved by the test

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def make_config(tmp: Path, dataset_dir: Path, **overrides: Any) -> config_mod.Config:
    # Entry format 2 unless a test asks for 1: see tests/conftest.py.
    overrides.setdefault(
        "audit_entry_format", int(os.environ.get("CERTBROKER_AUDIT_ENTRY_FORMAT", "2"))
    )
    return config_mod.load(
        None,
        env={},
        port=0,
        metrics_port=0,
        state_dir=tmp / "state",
        dataset_dir=dataset_dir,
        **overrides,
    )


# --- the audit log as stored, in either entry format -------------------------------------------
# Tests that look at stored entries read them through the store's own readers, never by SQL on
# one format's table: a broker writes format 2 (audit_entries + audit_terms) by default, a log
# may begin in format 1 (audit_log), and the body each reader rebuilds is the one hashed.


def stored_rows(db: config_mod.AuditLocation, entry_id: str | None = None) -> list[StoredRow]:
    """The live entries of the audit log at ``db`` (all, or the one with ``entry_id``) as
    stored: ``body`` is the text exactly as hashed, with ``prev_hash`` and ``entry_hash``."""
    with contextlib.closing(connect_read(db)) as conn:
        if entry_id is None:
            return list(iter_rows(conn))
        equals = {"entry_id": entry_id}
        return select_rows(conn, equals=equals, since=None, until=None, limit=1)


def stored_body(db: config_mod.AuditLocation, entry_id: str) -> dict[str, Any] | None:
    """The hashed body of the entry with ``entry_id`` as a dict; None if there is none."""
    rows = stored_rows(db, entry_id)
    return json.loads(rows[0].body) if rows else None


def compact_log(conn: Any) -> bool:
    """Whether the log ``conn`` (an attacker's sqlite3 or PostgreSQL connection,
    ``tests.audit.pg_support.attacker``) holds entries in format 2."""
    try:
        return conn.execute("SELECT 1 FROM audit_entries LIMIT 1").fetchone() is not None
    except Exception:  # noqa: BLE001 - no such table: a format 1 log from before version 2
        return False


def edit_entry(conn: Any, seq: int) -> None:
    """Change one stored value of entry ``seq`` as someone with the database's own rights
    could, in the format the entry is stored in: format 1, the clerk in its body text; format
    2, its ``subject_id`` column (the hash then no longer matches the rebuilt body)."""
    conn.execute(
        "UPDATE audit_log SET body = replace(body, '\"clerk-', '\"clerX-') WHERE seq = ?", (seq,)
    )
    if compact_log(conn):
        conn.execute(
            "UPDATE audit_entries SET subject_id = subject_id || 'X' WHERE seq = ?", (seq,)
        )


def refuse_appends(conn: Any, when: str = "1") -> None:
    """An SQLite trigger that fails every insert of an entry (``when``: an SQL condition on
    ``NEW.kind``, ``NEW.record_type``...: text values, in either format): the disk full."""
    conn.execute(
        f"CREATE TRIGGER refuse_v1 BEFORE INSERT ON audit_log WHEN {when} "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    # Format 2 keeps the text values as ids into audit_terms: the condition reads them back.
    terms = re.sub(
        r"NEW\.(\w+)",
        lambda m: f"(SELECT term FROM audit_terms WHERE id = NEW.{m.group(1)})",
        when,
    )
    conn.execute(
        f"CREATE TRIGGER refuse_v2 BEFORE INSERT ON audit_entries WHEN {terms} "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    conn.commit()


def allow_appends(conn: Any) -> None:
    """Drop the triggers of :func:`refuse_appends`."""
    conn.execute("DROP TRIGGER refuse_v1")
    conn.execute("DROP TRIGGER refuse_v2")
    conn.commit()


ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 30.0


@dataclass
class AdapterProcess:
    record_type: str
    process: subprocess.Popen[str]
    port: int
    log: Path
    more_output: str = ""  # stdout after the READY line, read once stopped

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 15.0) -> int:
        assert self.process.stdout is not None
        if self.process.stdout.closed:  # already stopped
            return self.process.wait()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            assert self.process.stdout is not None
            self.more_output = self.process.stdout.read()
            self.process.stdout.close()


def start_adapter(
    record_type: str, dataset_dir: Path, log: Path, *extra_args: str
) -> AdapterProcess:
    """Start ``python -m certbroker.adapters`` and wait for its ``READY port=N`` line.

    ``extra_args`` go after the required ones. Unless they say how to treat the broker's
    decision token (``--broker-public-key`` or ``--no-decision-token``), the adapter runs with
    ``--no-decision-token``: the adapter refuses to start without one of the two.
    """
    args = ["-m", "certbroker.adapters", "--record-type", record_type]
    args += ["--dataset-dir", str(dataset_dir), "--port", "0", *extra_args]
    if not {"--broker-public-key", "--no-decision-token"} & set(extra_args):
        args.append("--no-decision-token")
    return start_process(args, log, record_type)


def start_process(args: list[str], log: Path, record_type: str) -> AdapterProcess:
    """Start ``python ARGS`` (an adapter process) and wait for its ``READY port=N`` line."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    match = re.fullmatch(r"READY port=(\d+)\n", line)
    if match is None:
        process.kill()
        process.wait()
        process.stdout.close()
        pytest.fail(f"adapter did not start: {line!r}\n{log.read_text()}")
    return AdapterProcess(record_type, process, int(match.group(1)), log)
