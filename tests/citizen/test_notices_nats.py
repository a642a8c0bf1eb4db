"""The notice relay against a real NATS JetStream server: every allowed and denied lookup is
published exactly once (JetStream deduplicates by the entry id), and neither a kill -9 of the
broker mid-load nor a NATS restart loses a notice (duplicates would be allowed, identified by
entry id). A notice never carries record values."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.audit.outbox import read_notices
from certbroker.audit.store.db import backend_for
from certbroker.cli import client
from certbroker.v1 import broker_pb2_grpc
from tests.citizen.nats_support import NatsServer, nats_server, stream_messages
from tests.citizen.support import CASE, TRANSFER
from tests.helpers import ROOT, Env, make_config, running_env

NOTICE_KEYS = {
    "entry_id",
    "subject_id",
    "time",
    "office",
    "clerk",
    "matter_code",
    "matter_name",
    "record_type",
    "record_label",
    "decision",
}
RECORD_TYPES = ("household", "marriage", "property", "social_security")  # the last is denied


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path) as server:
        yield server


def access_ids(db: Path) -> list[str]:
    """The entry ids of every access (allowed or denied lookup of a citizen) in the log."""
    return [
        e.entry_id
        for e in audit.query(db, audit.QueryFilter(limit=1_000_000))
        if e.event.kind == "lookup" and e.event.subject_id and e.event.decision in ("allow", "deny")
    ]


def wait_all_sent(db: Path, deadline_s: float = 60.0) -> None:
    """Until the outbox holds no unsent notice (the relay caught up); fails at the deadline."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if all(n["sent"] for n in read_notices(backend_for(db))):
            return
        time.sleep(0.1)
    pytest.fail("the relay did not publish every notice")


def check_stream(url: str, db: Path, *, exactly_once: bool) -> None:
    messages = stream_messages(url)
    for key, notice in messages:
        assert key == notice["entry_id"]  # the idempotency key is the entry id
        assert set(notice) == NOTICE_KEYS  # identifiers and names: no record field at all
    published = [key for key, _ in messages]
    expected = access_ids(db)
    assert expected
    assert set(published) == set(expected)  # none lost, none without its access
    if exactly_once:
        assert sorted(published) == sorted(expected)


def test_every_access_is_published_once_with_the_entry_id(
    tmp_path: Path, dataset_dir: Path, nats: NatsServer
) -> None:
    cfg = make_config(tmp_path, dataset_dir, nats_url=nats.url, notify_interval_s=0.05)
    people = synthetic.sample_citizens(dataset_dir, 5)
    with running_env(cfg, dataset_dir) as env:
        values = _lookups(env, people)
        wait_all_sent(cfg.audit_file)
    check_stream(nats.url, cfg.audit_file, exactly_once=True)
    payloads = " ".join(str(n) for _, n in stream_messages(nats.url))
    assert not [v for v in values if v in payloads]


def _lookups(env: Env, people: list[str]) -> set[str]:
    """Allowed and denied lookups of ``people``; the record values the clerk got."""
    values: set[str] = set()
    for subject in people:
        for record_type in RECORD_TYPES:
            request = client.lookup_request(record_type, subject, TRANSFER, CASE)
            try:
                reply = env.stub.Lookup(request, metadata=env.md(env.token()), timeout=30)
            except grpc.RpcError:
                continue
            record = getattr(reply.record, record_type)
            values.update(str(v) for f, v in record.ListFields() if f.type == f.TYPE_STRING)
    return {v for v in values if len(v) >= 4}


class BrokerProcess:
    """``certbroker serve`` as its own process (so it can be killed -9)."""

    def __init__(self, state_dir: Path, dataset_dir: Path, nats_url: str) -> None:
        env = {
            **os.environ,
            "CERTBROKER_DATASET_DIR": str(dataset_dir),
            "CERTBROKER_NATS_URL": nats_url,
        }
        cmd = [sys.executable, "-m", "certbroker", "serve", "--port", "0", "--metrics-port", "0"]
        cmd += ["--state-dir", str(state_dir)]
        self.log = state_dir.parent / "broker.log"
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
        assert self.process.stdout is not None
        # Blocking reads: the broker prints READY or exits (EOF); pytest's timeout bounds it.
        match = None
        for line in self.process.stdout:
            match = re.match(r"READY port=(\d+)", line)
            if match is not None:
                break
        if match is None:
            self.kill()
            pytest.fail("broker did not start:\n" + self.log.read_text()[-3000:])
        self.target = f"127.0.0.1:{match.group(1)}"

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        assert self.process.stdout is not None
        self.process.stdout.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        assert self.process.stdout is not None
        self.process.stdout.close()


def _load(target: str, token: str, people: list[str], count: int, started: threading.Event) -> None:
    """Up to ``count`` lookups, allowed and denied, until the broker goes away."""
    channel = grpc.insecure_channel(target)
    stub = broker_pb2_grpc.CertificateBrokerStub(channel)
    try:
        for i in range(count):
            subject = people[i % len(people)]
            record_type = RECORD_TYPES[i % len(RECORD_TYPES)]
            request = client.lookup_request(record_type, subject, TRANSFER, CASE)
            try:
                stub.Lookup(request, metadata=client.bearer(token), timeout=10)
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    return  # the broker was killed
            if i == 20:
                started.set()
    finally:
        started.set()
        channel.close()


def test_kill_9_of_the_broker_mid_load_and_a_nats_restart_lose_no_notice(
    tmp_path: Path, dataset_dir: Path, nats: NatsServer
) -> None:
    state = tmp_path / "state"
    db = state / "audit.sqlite"
    people = synthetic.sample_citizens(dataset_dir, 8)
    broker = BrokerProcess(state, dataset_dir, nats.url)
    from certbroker.auth.authenticator import DevIdentityProvider

    token = DevIdentityProvider(state).issue("clerk-001", ["window_clerk"], "gz-haizhu-24h-01")
    started = threading.Event()
    load = threading.Thread(target=_load, args=(broker.target, token, people, 5000, started))
    load.start()
    started.wait(60)
    broker.kill()  # mid-load: lookups in flight, notices written but perhaps not relayed
    load.join(60)
    before_kill = len(access_ids(db))
    assert before_kill > 20
    # NATS goes down; a new broker keeps serving, its notices wait in the outbox.
    nats.stop()
    broker = BrokerProcess(state, dataset_dir, nats.url)
    try:
        _load(broker.target, token, people, 40, threading.Event())
        assert any(n["sent"] is None for n in read_notices(backend_for(db)))
        nats.start()  # same port, same store: the stream and what it had survive
        wait_all_sent(db)
    finally:
        broker.stop()
    check_stream(nats.url, db, exactly_once=False)
