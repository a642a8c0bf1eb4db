"""Several broker processes writing ONE PostgreSQL audit log at once: no gaps, no duplicates.

Three real ``certbroker serve`` processes share a DSN and schema (and a checkpoint key; each
signs checkpoints every 0.2 s while the test hammers all three with Lookups from many threads).
Afterwards ``certbroker audit verify`` must pass and the log must hold exactly one entry per
call made.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.audit import QueryFilter, query
from certbroker.audit.integrity import proofs as audit_proofs
from certbroker.audit.verify.chain import verify
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.config import PostgresLocation
from certbroker.v1 import broker_pb2_grpc
from tests.audit.pg_support import fresh_schema
from tests.helpers import ROOT, START_TIMEOUT

pytestmark = pytest.mark.postgres

BROKERS = 3
CALLS_PER_BROKER = 40
RECORD_TYPES = ("household", "marriage", "property")
MATTER = "BDC-ZY-001"  # the property transfer: these three record types, any hour in a 24h hall
OFFICE = "gz-haizhu-24h-01"


def case(broker: int, n: int) -> str:
    """A case number (办件号) in the format the policy requires, unique per call."""
    return f"GZ2026112{broker}-{n:06d}"


@pytest.fixture
def pg() -> Iterator[PostgresLocation]:
    with fresh_schema() as location:
        yield location


class Broker:
    """A ``certbroker serve`` process; ``port`` from its ``READY port=N ...`` line."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with log.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True
            )
        found: queue.SimpleQueue[int] = queue.SimpleQueue()

        def read() -> None:  # a thread: select() on a buffered pipe misses buffered lines
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if line.startswith("READY "):
                    found.put(int(dict(p.split("=", 1) for p in line.split()[1:])["port"]))
            found.put(0)  # stdout closed: the process ended

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        try:
            self.port = found.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.port = 0
        if not self.port:
            self.stop()
            pytest.fail(f"broker did not start:\n{log.read_text()}")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(30)  # it ends at EOF, now that the process is gone
        assert self.process.stdout is not None
        self.process.stdout.close()
        return code


def start_broker(n: int, base: Path, pg: PostgresLocation, datasets: Path) -> Broker:
    state = base / f"broker-{n}"
    state.mkdir()
    DevIdentityProvider(state)  # its key, before the broker reads it
    config = base / f"broker-{n}.toml"
    config.write_text(
        f'[server]\nport = 0\nmetrics_port = 0\nstate_dir = "{state}"\n'
        f'[datasets]\ndir = "{datasets}"\n'
        f"[audit]\ndsn = {pg.dsn!r}\nschema = {pg.schema!r}\n"
        f'checkpoint_key = "{base / "checkpoint.pem"}"\ncheckpoint_interval_s = 0.2\n'
    )
    return Broker(["-m", "certbroker", "serve", "--config", str(config)], base / f"b{n}.log")


def test_three_brokers_append_one_verifiable_log(
    pg: PostgresLocation, tmp_path: Path, dataset_dir: Path
) -> None:
    signer = audit_proofs.CheckpointSigner.load(tmp_path, tmp_path / "checkpoint.pem")
    subject, _ = synthetic.sample_couple(dataset_dir)
    brokers = [start_broker(n, tmp_path, pg, dataset_dir) for n in range(BROKERS)]
    try:
        calls = [
            (broker, n, RECORD_TYPES[n % len(RECORD_TYPES)])
            for n in range(CALLS_PER_BROKER)
            for broker in range(BROKERS)
        ]
        tokens = [
            DevIdentityProvider(tmp_path / f"broker-{n}").issue(
                f"clerk-{n}", ("window_clerk",), OFFICE
            )
            for n in range(BROKERS)
        ]
        channels = [grpc.insecure_channel(b.target) for b in brokers]
        stubs = [broker_pb2_grpc.CertificateBrokerStub(c) for c in channels]

        def call(item: tuple[int, int, str]) -> int:
            broker, n, record_type = item
            request = client.lookup_request(record_type, subject, MATTER, case(broker, n))
            metadata = client.bearer(tokens[broker])
            reply = stubs[broker].Lookup(request, metadata=metadata, timeout=60)
            return int(reply.receipt.sequence)

        try:
            with ThreadPoolExecutor(max_workers=12) as pool:
                receipts = list(pool.map(call, calls))
        finally:
            for channel in channels:
                channel.close()
    finally:
        codes = [b.stop() for b in brokers]
    # Every call got its own receipt, and together they are 1..N: no gap, no duplicate.
    assert sorted(receipts) == list(range(1, BROKERS * CALLS_PER_BROKER + 1))
    assert codes == [0] * BROKERS, [b.log.read_text()[-2000:] for b in brokers]

    report = verify(pg)
    assert report.ok, report
    entries = query(pg, QueryFilter(limit=10_000))
    assert len(entries) == report.entries == len(calls)  # nothing else was written
    assert [e.sequence for e in entries] == list(range(1, len(calls) + 1))
    assert sorted(e.event.case_number for e in entries) == sorted(case(b, n) for b, n, _ in calls)
    assert {e.event.clerk for e in entries} == {f"clerk-{n}" for n in range(BROKERS)}

    where = ["--dsn", pg.dsn, "--schema", pg.schema, "--public-key", str(signer.public_key_path)]
    out = subprocess.run(
        [sys.executable, "-m", "certbroker", "audit", "verify", *where],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok: {len(calls)} entries" in out.stdout
