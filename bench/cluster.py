"""Scenario "Cluster": how fast one broker's change reaches another, and the signer's takeover.

Two ``certbroker serve`` processes share one PostgreSQL schema (and the keys a cluster shares).
Each round a security officer disables a clerk through broker A, and the clerk's next lookup
goes to broker B, which must refuse it; then the officer enables the clerk through B and the
next lookup at A must be served. Measured per change:

* **propagation**: from the change's commit (``cluster_versions.changed_at``) to the moment the
  other broker holds it in memory (its ``cluster_brokers.applied_at``), both read from
  PostgreSQL's clock, so no two clocks are compared;
* **officer's call**: the Admin call's duration at the client -- it returns only once every
  live broker holds the change (:meth:`certbroker.cluster.pg.ClusterDb.settle`).

Then the checkpoint signer is killed (``kill -9``) a few times, with
``checkpoint_interval_s = 1``: **takeover** is the time from the kill to the other broker
holding the signer's lock (polled every 10 ms), to be compared with the interval.

PostgreSQL as in the "Audit backends" scenario; without a server the scenario cannot run.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.audit_backends import postgres
from bench.harness import BenchError, Options, Processes, Result, percentile
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.cluster.lease import signer_of
from certbroker.cluster.pg import ClusterDb
from certbroker.config import PostgresLocation
from certbroker.v1 import admin_pb2, admin_pb2_grpc, broker_pb2_grpc

OFFICE = "gz-haizhu-24h-01"
MATTER = "BDC-ZY-001"
CHECKPOINT_S = 1.0
WHY = admin_pb2.Justification(reason="benchmark", ticket="BENCH-1")


def run(options: Options) -> Result:
    """Start two brokers on one schema, change controls back and forth, kill the signer."""
    changes = options.count(full=50, smoke=4)
    kills = 5 if not options.smoke else 1
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp, postgres() as pg:
        if pg is None:
            raise BenchError("no PostgreSQL server to run a cluster on")
        base = Path(tmp)
        datasets = base / "datasets"
        synthetic.generate(datasets, citizens=200)
        subject = synthetic.sample_couple(datasets)[0]
        keys = DevIdentityProvider(base / "keys")
        config = base / "broker.toml"
        config.write_text(
            f"[audit]\ndsn = {pg.dsn!r}\nschema = {pg.schema!r}\n"
            f'checkpoint_key = "{base / "checkpoint.pem"}"\n'
            f"checkpoint_interval_s = {CHECKPOINT_S}\n"
        )
        env = {"CERTBROKER_DATASET_DIR": str(datasets)}
        with Processes(base) as processes:
            brokers = processes.start(
                {name: _serve(base, name, config) for name in ("a", "b")}, env=env
            )
            targets = {name: f"127.0.0.1:{child.port}" for name, child in brokers.items()}
            clerk = keys.issue("clerk-7", ("window_clerk",), OFFICE)
            officer = keys.issue("sec-1", ("security_officer",), "security-office")
            calls = _change_back_and_forth(pg, targets, clerk, officer, subject, changes)
            takeovers = []
            for n in range(kills):
                takeovers.append(_kill_the_signer(pg, processes, brokers, base, config, env, n))
    return _result(calls, takeovers)


def _serve(base: Path, name: str, config: Path) -> list[str]:
    state = base / name
    state.mkdir(exist_ok=True)
    if not (state / "idp").exists():  # the cluster's one token issuer
        shutil.copytree(base / "keys" / "idp", state / "idp")
    args = ["-m", "certbroker", "serve", "--config", str(config), "--port", "0"]
    return [*args, "--metrics-port", "0", "--state-dir", str(state)]


def _change_back_and_forth(
    pg: PostgresLocation,
    targets: dict[str, str],
    clerk: str,
    officer: str,
    subject: str,
    changes: int,
) -> list[tuple[float, float]]:
    """(propagation s, officer's call s) of each change."""
    channels = {name: grpc.insecure_channel(target) for name, target in targets.items()}
    import psycopg

    try:
        admin = {n: admin_pb2_grpc.AdminStub(c) for n, c in channels.items()}
        lookup = {n: broker_pb2_grpc.CertificateBrokerStub(c) for n, c in channels.items()}
        samples = []
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {pg.schema}")
            for n in range(changes):
                at, other = ("a", "b") if n % 2 == 0 else ("b", "a")
                started = time.perf_counter()
                if n % 2 == 0:
                    request: Any = admin_pb2.DisableClerkRequest(sub="clerk-7", why=WHY)
                    admin[at].DisableClerk(request, metadata=client.bearer(officer), timeout=30)
                else:
                    request = admin_pb2.EnableClerkRequest(sub="clerk-7", why=WHY)
                    admin[at].EnableClerk(request, metadata=client.bearer(officer), timeout=30)
                call_s = time.perf_counter() - started
                refused = _refused(lookup[other], clerk, subject, n)
                if refused != (n % 2 == 0):
                    raise BenchError(f"change {n} made at {at} was not in force at {other}")
                samples.append((_propagation(conn), call_s))
        return samples
    finally:
        for channel in channels.values():
            channel.close()


def _refused(stub: broker_pb2_grpc.CertificateBrokerStub, token: str, subject: str, n: int) -> bool:
    request = client.lookup_request("household", subject, MATTER, f"GZ20261203-{n:06d}")
    try:
        stub.Lookup(request, metadata=client.bearer(token), timeout=30)
    except grpc.RpcError as exc:
        return client.call_error(exc).reason == "CLERK_DISABLED"
    return False


def _propagation(conn: Any) -> float:
    """Seconds from the last controls change's commit to the latest broker holding it."""
    (seconds,) = conn.execute(
        "SELECT extract(epoch FROM max(b.applied_at) - v.changed_at)::float8"
        " FROM cluster_brokers b, cluster_versions v"
        " WHERE v.name = 'controls' AND b.controls_version = v.version"
        " GROUP BY v.changed_at"
    ).fetchone()
    return float(seconds)


def _kill_the_signer(
    pg: PostgresLocation,
    processes: Processes,
    brokers: dict[str, Any],
    base: Path,
    config: Path,
    env: dict[str, str],
    n: int,
) -> float:
    """Seconds from ``kill -9`` of the signer to the other broker holding the lock; the
    killed broker is started again (under a new name) for the next round."""
    import psycopg

    db = ClusterDb(pg, "bench")
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        holder = _wait(lambda: signer_of(conn, db))
        victim = next(name for name, c in brokers.items() if f":{c.process.pid}" in holder)
        survivor = next(name for name in brokers if name != victim)
        killed = time.perf_counter()
        brokers[victim].process.send_signal(signal.SIGKILL)
        pid = brokers[survivor].process.pid
        _wait(lambda: f":{pid}" in (signer_of(conn, db) or ""), poll_s=0.01)
        takeover = time.perf_counter() - killed
    brokers[victim].process.wait()
    again = f"{victim}{n}"
    (base / again).mkdir()
    shutil.copytree(base / "keys" / "idp", base / again / "idp")
    started = processes.start({again: _serve(base, again, config)}, env=env)
    del brokers[victim]
    brokers[again] = started[again]
    return takeover


def _wait(condition: Any, *, poll_s: float = 0.05, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise BenchError("timed out waiting for the cluster")


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _result(calls: list[tuple[float, float]], takeovers: list[float]) -> Result:
    propagation = [p for p, _ in calls]
    officer = [c for _, c in calls]
    rows = [
        ("propagation (commit at A → in force at B)", *_stats(propagation)),
        ("officer's call at A (returns once B holds it)", *_stats(officer)),
        (f"signer takeover after kill -9 (interval {CHECKPOINT_S:g} s)", *_stats(takeovers)),
    ]
    return Result(
        section="Cluster",
        setup=(
            f"two `certbroker serve` processes on one PostgreSQL schema; {len(calls)} control "
            f"changes alternating between them, {len(takeovers)} kills of the checkpoint signer"
        ),
        header=("measured", "n", "median ms", "p95 ms", "max ms"),
        rows=rows,
        verdict=(
            "every change was in force at the other broker on the next call; "
            f"takeover within one checkpoint interval: {max(takeovers) <= CHECKPOINT_S}"
        ),
    )


def _stats(samples: list[float]) -> tuple[str, str, str, str]:
    return (
        str(len(samples)),
        _ms(percentile(samples, 50)),
        _ms(percentile(samples, 95)),
        _ms(max(samples)),
    )
