"""``certbroker serve --workers N``: real supervisor and worker processes sharing one port.

The clients open many channels, each on its own TCP connection (a local subchannel pool), so
the kernel's SO_REUSEPORT hashing spreads them over the workers; each worker's own /metrics
shows what it served. The audit log is the real SQLite file, read back after the fact.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from certbroker import config
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    broker_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.helpers import start_adapter, stored_rows

CLI = [sys.executable, "-m", "certbroker"]
ROOT = Path(__file__).resolve().parents[2]
OFFICE = "gz-haizhu-24h-01"  # only the 24-hour rule lets a window clerk in here, at any hour
CASE = "GZ20261121-000777"
WAIT_S = 90.0  # generous: six engineers share two cores; never an assertion about speed
CHANNELS = 24  # all landing on one of two workers by chance: 2 * 2**-24


@dataclass
class Worker:
    index: int
    pid: int
    metrics_port: int
    restarts: int


@dataclass
class Served:
    """A running ``serve --workers N`` and what its stdout said."""

    proc: subprocess.Popen[str]
    port: int
    state_dir: Path
    policy_dir: Path
    workers: dict[int, Worker]
    lines: queue.Queue[str]
    pump: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.state_dir / "audit.sqlite"

    def wait_worker(self, index: int, restarts: int) -> Worker:
        """Wait for the WORKER line of ``index``'s ``restarts``-th replacement."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1.0)
            except queue.Empty:
                continue
            found = _worker(line)
            if found is not None:
                self.workers[found.index] = found
                if found.index == index and found.restarts == restarts:
                    return found
        pytest.fail(f"no WORKER line for worker {index} after {restarts} restart(s)")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)


def _worker(line: str) -> Worker | None:
    m = re.match(r"WORKER index=(\d+) pid=(\d+) port=\d+ metrics_port=(\d+) .*restarts=(\d+)", line)
    if m is None:
        return None
    return Worker(int(m[1]), int(m[2]), int(m[3]), int(m[4]))


def _pump(stream: Iterator[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    path = tmp_path / "policies"
    subprocess.run(["cp", "-r", str(config.DEFAULT_POLICY_DIR), str(path)], check=True)
    # The load tests drive one clerk far past the shipped quotas (120 lookups a minute).
    (path / "quotas.yaml").unlink()
    return path


def start(tmp_path: Path, dataset_dir: Path, policy_dir: Path, **extra_env: str) -> Served:
    """``certbroker serve --workers 2`` on port 0; checkpoints every 0.2 s (worker 0 signs)."""
    state = tmp_path / "state"
    cfg = tmp_path / "broker.toml"
    cfg.write_text("[audit]\ncheckpoint_interval_s = 0.2\n")
    env = {
        **os.environ,
        "CERTBROKER_POLICY_DIR": str(policy_dir),
        "CERTBROKER_DATASET_DIR": str(dataset_dir),
        **extra_env,
    }
    command = [*CLI, "serve", "--config", str(cfg), "--port", "0", "--metrics-port", "0"]
    command += ["--state-dir", str(state), "--workers", "2"]
    with (tmp_path / "serve.log").open("w") as stderr:
        proc = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env
        )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    found: dict[int, Worker] = {}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if (worker := _worker(line)) is not None:
            found[worker.index] = worker
        elif m := re.fullmatch(r"READY port=(\d+) metrics_port=(\d+) workers=2\n", line):
            assert sorted(found) == [0, 1]
            assert int(m[2]) == found[0].metrics_port
            return Served(proc, int(m[1]), state, policy_dir, found, lines, pump)
    proc.kill()
    proc.wait()
    pump.join(WAIT_S)
    proc.stdout.close()
    pytest.fail(f"serve --workers 2 did not start:\n{(tmp_path / 'serve.log').read_text()}")


@pytest.fixture
def served(tmp_path: Path, dataset_dir: Path, policy_dir: Path) -> Iterator[Served]:
    s = start(tmp_path, dataset_dir, policy_dir)
    try:
        yield s
    finally:
        stop_served(s)


def stop_served(s: Served) -> None:
    if s.proc.poll() is None:
        s.proc.kill()  # the workers notice their parent is gone and stop
        s.proc.wait()
    s.pump.join(WAIT_S)  # EOF once the workers (which share the pipe) are gone too
    assert s.proc.stdout is not None
    s.proc.stdout.close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, check=False
    )


def channels(target: str, n: int = CHANNELS) -> list[grpc.Channel]:
    """``n`` channels with one TCP connection each (no subchannel shared between them)."""
    return [
        grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(n)
    ]


def metrics(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """One worker's samples by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def lookups(port: int, decision: str | None = None) -> float:
    """Lookups a worker counted (optionally only those with ``decision``)."""
    return sum(
        value
        for labels, value in metrics(port).get("certbroker_lookups_total", [])
        if decision is None or labels["decision"] == decision
    )


def reloads_ok(port: int) -> float:
    return sum(
        value
        for labels, value in metrics(port).get("certbroker_policy_reloads_total", [])
        if labels["result"] == "ok"
    )


def entries(db: Path) -> dict[str, tuple[int, str, str]]:
    """entry_id -> (seq, entry_hash, kind) of every stored entry."""
    bodies = [(row, json.loads(row.body)) for row in stored_rows(db)]
    return {body["entry_id"]: (row.seq, row.entry_hash, body["kind"]) for row, body in bodies}


def wait_until(what: str, condition: object) -> None:
    """Poll ``condition()`` (observable effects of another process) until true."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


class Clerk:
    """Lookups as one window clerk; every answered call's receipt is kept."""

    def __init__(self, state_dir: Path, dataset_dir: Path) -> None:
        self.token = DevIdentityProvider(state_dir).issue("clerk-w", ["window_clerk"], OFFICE)
        self.subjects = synthetic.sample_citizens(dataset_dir, 8)
        self.lock = threading.Lock()
        self.receipts: dict[str, tuple[int, str]] = {}
        self.errors: list[str] = []

    def lookup(self, channel: grpc.Channel, i: int) -> grpc.StatusCode:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        request = client.lookup_request(
            "marriage", self.subjects[i % len(self.subjects)], "BDC-ZY-001", CASE
        )
        try:
            response = stub.Lookup(request, metadata=client.bearer(self.token), timeout=30)
        except grpc.RpcError as exc:
            with self.lock:
                self.errors.append(str(client.call_error(exc)))
            return exc.code()  # type: ignore[no-any-return]
        receipt = response.receipt
        assert receipt.entry_id
        assert receipt.sequence > 0
        assert len(receipt.entry_hash) == 64
        with self.lock:
            self.receipts[receipt.entry_id] = (receipt.sequence, receipt.entry_hash)
        return grpc.StatusCode.OK

    @property
    def answered(self) -> int:
        with self.lock:
            return len(self.receipts)


def test_two_workers_serve_and_audit_every_lookup(served: Served, dataset_dir: Path) -> None:
    clerk = Clerk(served.state_dir, dataset_dir)
    chans = channels(served.target)
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: clerk.lookup(chans[i % CHANNELS], i), range(72)))
    finally:
        for chan in chans:
            chan.close()
    assert codes == [grpc.StatusCode.OK] * 72, clerk.errors

    # Both workers answered some: each counts only its own calls, and together all of them.
    per_worker = [lookups(w.metrics_port) for w in served.workers.values()]
    assert all(n > 0 for n in per_worker), per_worker
    assert sum(per_worker) == 72
    assert served.workers[0].pid != served.workers[1].pid
    # Several processes: the quota counts are in the state dir's file they share.
    assert (served.state_dir / "quotas.sqlite").exists()

    # One log, one sequence: every answer's receipt is the stored entry, and nothing else is.
    stored = entries(served.db)
    assert {e: (seq, h) for e, (seq, h, _) in stored.items()} == clerk.receipts
    assert sorted(seq for seq, _ in clerk.receipts.values()) == list(range(1, 73))

    # Worker 0 signs checkpoints for the whole log (the others do not run the task).
    def checkpointed() -> bool:
        with closing(sqlite3.connect(f"{served.db.as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT max(size) FROM checkpoints").fetchone()[0] == 72

    wait_until("a checkpoint covering all 72 entries", checkpointed)
    pid_file = served.state_dir / "broker.pid"
    assert pid_file.read_text().strip() == str(served.proc.pid)

    assert served.stop() == 0
    assert not pid_file.exists()
    verify = run("audit", "verify", "--state-dir", str(served.state_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "ok: 72 entries, hash chain intact" in verify.stdout


def test_sigkill_of_a_worker_mid_load_loses_no_answered_entry(
    served: Served, dataset_dir: Path
) -> None:
    clerk = Clerk(served.state_dir, dataset_dir)
    victim = served.workers[1]
    stop = threading.Event()
    chans = channels(served.target, 12)

    def drive(n: int) -> None:
        i = n
        while not stop.is_set():
            clerk.lookup(chans[n], i)
            i += len(chans)

    threads = [threading.Thread(target=drive, args=(n,)) for n in range(len(chans))]
    for t in threads:
        t.start()
    try:
        # Kill the worker once it is carrying part of a steady load.
        wait_until("load on both workers", lambda: lookups(victim.metrics_port) >= 20)
        wait_until("40 answers", lambda: clerk.answered >= 40)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = clerk.answered
        replacement = served.wait_worker(1, restarts=1)
        assert replacement.pid != victim.pid
        # Keep going: the connections to the dead worker reconnect (to a live one).
        wait_until("answers after the kill", lambda: clerk.answered >= killed_at + 40)
    finally:
        stop.set()
        for t in threads:
            t.join(WAIT_S)
        for chan in chans:
            chan.close()
    # New connections reach the replacement too.
    fresh = channels(served.target)
    try:
        codes = [clerk.lookup(chan, i) for i, chan in enumerate(fresh)]
    finally:
        for chan in fresh:
            chan.close()
    assert codes == [grpc.StatusCode.OK] * CHANNELS
    assert lookups(replacement.metrics_port) > 0
    assert served.stop() == 0

    # Every answer a client received has its entry in the log, exactly as receipted.
    stored = entries(served.db)
    missing = [e for e in clerk.receipts if e not in stored]
    assert not missing, f"{len(missing)} answered lookups have no audit entry"
    for entry_id, (seq, entry_hash) in clerk.receipts.items():
        assert stored[entry_id][:2] == (seq, entry_hash)
    # Entries may outnumber answers (a call cut off after its commit), never the reverse.
    assert len(stored) >= len(clerk.receipts)
    verify = run("audit", "verify", "--state-dir", str(served.state_dir))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert f"ok: {len(stored)} entries" in verify.stdout


def test_policy_reload_reaches_every_worker(
    served: Served, dataset_dir: Path, policy_dir: Path
) -> None:
    clerk = Clerk(served.state_dir, dataset_dir)
    chans = channels(served.target)
    try:
        assert clerk.lookup(chans[0], 0) == grpc.StatusCode.OK
        rules = policy_dir / "rules.yaml"
        original = rules.read_text()
        start = original.index("  - id: window-clerk-24h")
        end = original.index("  - id: property-clerk-hall")
        rules.write_text(original[:start] + original[end:])  # no rule lets this office in now

        # `policy reload` signals the pid in the pid file: the supervisor, which forwards it.
        reload = run("policy", "reload", "--state-dir", str(served.state_dir))
        assert reload.returncode == 0, reload.stderr
        assert str(served.proc.pid) in reload.stdout
        ports = [w.metrics_port for w in served.workers.values()]
        wait_until("a reload in every worker", lambda: all(reloads_ok(p) == 1 for p in ports))

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: clerk.lookup(chans[i], i), range(CHANNELS)))
    finally:
        for chan in chans:
            chan.close()
    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * CHANNELS
    assert all(lookups(p, "deny") > 0 for p in ports)  # both workers use the new set

    # Each worker audited its own reload: two entries, both with the new version.
    bodies = [json.loads(row.body) for row in stored_rows(served.db)]
    first = bodies[0]["policy_version"]
    reloads = [b for b in bodies if b["kind"] == "policy_reload"]
    assert len(reloads) == 2
    assert {b["decision"] for b in reloads} == {"allow"}
    assert len({b["policy_version"] for b in reloads}) == 1
    assert reloads[0]["policy_version"] != first
    assert served.stop() == 0


def adapter_calls_ok(port: int) -> float:
    """Marriage records a worker fetched from an adapter successfully."""
    return sum(
        value
        for labels, value in metrics(port).get("certbroker_adapter_call_seconds_count", [])
        if labels == {"record_type": "marriage", "status": "OK"}
    )


def test_an_adapter_registered_through_one_worker_is_routed_by_all(
    tmp_path: Path, dataset_dir: Path, policy_dir: Path
) -> None:
    adapter = start_adapter("marriage", dataset_dir, tmp_path / "adapter.log")
    served = start(tmp_path, dataset_dir, policy_dir, CERTBROKER_ADAPTER_MARRIAGE="registry")
    try:
        idp = DevIdentityProvider(served.state_dir)
        with grpc.insecure_channel(served.target) as channel:  # one connection: one worker
            registry_pb2_grpc.RegistryStub(channel).Register(
                registry_pb2.RegisterRequest(
                    department="civil_affairs",
                    record_types=["marriage"],
                    endpoint=adapter.target,
                    schema_version="certbroker.v1",
                ),
                metadata=client.bearer(idp.issue_department("civil_affairs")),
                timeout=30,
            )
        clerk = Clerk(served.state_dir, dataset_dir)
        clerk.subjects = synthetic.sample_citizens(dataset_dir, 240)  # a fresh one per call
        ports = [w.metrics_port for w in served.workers.values()]
        calls = iter(range(10**6))

        def both_route() -> bool:
            # Fresh connections, spread over the workers; the worker that did not take the
            # registration learns of it from the shared file.
            chans = channels(served.target, 8)
            try:
                for chan in chans:
                    clerk.lookup(chan, next(calls))
            finally:
                for chan in chans:
                    chan.close()
            return all(adapter_calls_ok(p) > 0 for p in ports)

        wait_until("both workers fetching from the registered adapter", both_route)
    finally:
        stop_served(served)
        adapter.stop()


def test_a_clerk_disabled_through_one_worker_is_refused_by_all(
    served: Served, dataset_dir: Path
) -> None:
    clerk = Clerk(served.state_dir, dataset_dir)
    officer = DevIdentityProvider(served.state_dir).issue("sec-01", ["security_officer"], "sec")
    with grpc.insecure_channel(served.target) as channel:  # one connection: one worker
        admin_pb2_grpc.AdminStub(channel).DisableClerk(
            admin_pb2.DisableClerkRequest(
                sub="clerk-w",
                why=admin_pb2.Justification(reason="browsing neighbours", ticket="SEC-7"),
            ),
            metadata=client.bearer(officer),
            timeout=30,
        )
    calls = iter(range(10**6))
    rounds: list[bool] = []

    def all_refuse() -> bool:
        # Fresh connections, spread over the workers by the kernel: each must refuse the
        # disabled clerk (the worker that did not take the change reads it from the shared
        # file). Three rounds of eight in a row: 24 connections all landing on one worker while
        # the other still answered would be a 1 in 2**23 chance.
        chans = channels(served.target, 8)
        try:
            codes = {clerk.lookup(chan, next(calls)) for chan in chans}
        finally:
            for chan in chans:
                chan.close()
        rounds.append(codes == {grpc.StatusCode.PERMISSION_DENIED})
        return rounds[-3:] == [True, True, True]

    wait_until("every worker refusing the disabled clerk", all_refuse)
    assert any("CLERK_DISABLED" in e for e in clerk.errors)
