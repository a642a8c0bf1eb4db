"""Scenario "Audit backends": lookups per second with the SQLite vs the PostgreSQL audit log.

Two ``certbroker serve`` processes, identical but for ``[audit]``: one writes the embedded
SQLite file (WAL, ``synchronous=FULL``), the other a PostgreSQL schema (``synchronous_commit``
on, an advisory lock per batch, tables append-only). Both use the in-process demo adapters and
the shipped policies with the record cache off (:func:`bench.policies.uncached_policies`):
every call is one citizen's marriage record, and the shipped catalogue would otherwise answer
all but the first from the cache; a lookup here fetches, as lookups of different citizens do.
One client drives each in turn with the same closed-loop load (``CONCURRENCY`` calls in
flight, every call a marriage-record ``Lookup`` with its own case number, each audited before
it is answered), alternating which backend goes first every round.

Target (issue 4): PostgreSQL-backed lookups at least ``TARGET`` x the SQLite-backed rate.

PostgreSQL: ``CERTBROKER_BENCH_POSTGRES`` (a libpq URL), else the local test server
(``postgres`` or ``root`` on 127.0.0.1:5432, database ``test``). The scenario uses a fresh
schema and drops it afterwards; without a server it reports the SQLite row only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.harness import BenchError, Options, Processes, Result
from bench.policies import POLICY_DIR_ENV, uncached_policies
from certbroker.adapters.demo import synthetic
from certbroker.audit.verify.chain import verify
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.config import PostgresLocation
from certbroker.v1 import broker_pb2_grpc

SECTION = "Audit backends"
TARGET = 0.8
CONCURRENCY = 32
RECORD_TYPE = "marriage"
MATTER = "BDC-ZY-001"
OFFICE = "gz-haizhu-24h-01"  # a 24-hour hall: the policy allows it at any hour
CITIZENS = 300
URLS = ("postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test")


def run(options: Options) -> Result:
    """Start both brokers, drive them in alternating rounds, report rates and their ratio."""
    rounds = options.count(full=3, smoke=1)
    calls = 40 if options.smoke else 3000
    warmup = 8 if options.smoke else 200
    with (
        tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp,
        postgres() as pg,
    ):
        base = Path(tmp)
        datasets = base / "datasets"
        synthetic.generate(datasets, citizens=CITIZENS)
        subject = synthetic.sample_couple(datasets)[0]
        policies = uncached_policies(base / "policies-ttl0")
        backends = {"SQLite": ""} | ({"PostgreSQL": _pg_config(pg)} if pg else {})
        specs = {name: _serve(base, name, audit) for name, audit in backends.items()}
        rates: dict[str, list[float]] = {name: [] for name in backends}
        with Processes(base) as processes:
            # No CERTBROKER_* variable from the shell reaches them (a CERTBROKER_AUDIT_DSN
            # would move the SQLite broker to PostgreSQL): see harness.child_environment.
            env = {"CERTBROKER_DATASET_DIR": str(datasets), POLICY_DIR_ENV: str(policies)}
            children = processes.start(specs, env=env)
            tokens = {
                name: DevIdentityProvider(base / name).issue("bench", ("window_clerk",), OFFICE)
                for name in backends
            }
            order = list(backends)
            for n in range(rounds):
                for name in order[n % len(order) :] + order[: n % len(order)]:
                    target = f"127.0.0.1:{children[name].port}"
                    rate = _drive(target, tokens[name], subject, calls, warmup, round_no=n)
                    rates[name].append(asyncio.run(rate))
        if pg is not None:
            report = verify(pg)  # the benchmark's entries form one intact chain
            if not report.ok or report.entries != rounds * (calls + warmup):
                raise BenchError(f"PostgreSQL audit log after the run: {report}")
    return _result(rates, rounds, calls, pg is None)


def _serve(base: Path, name: str, audit: str) -> list[str]:
    state = base / name
    state.mkdir()
    DevIdentityProvider(state)  # the dev IdP key, so the bench can issue tokens
    config = base / f"{name}.toml"
    config.write_text(audit)
    args = ["-m", "certbroker", "serve", "--config", str(config), "--port", "0"]
    return [*args, "--metrics-port", "0", "--state-dir", str(state)]


def _pg_config(pg: PostgresLocation) -> str:
    return f"[audit]\ndsn = {pg.dsn!r}\nschema = {pg.schema!r}\n"


def admin_sql(location: PostgresLocation, *statements: str) -> None:
    """Run trusted ``statements`` (schema and table names of the benchmark's own) on
    ``location``'s server outside a transaction (``DROP SCHEMA``, ``VACUUM``)."""
    import psycopg

    with psycopg.connect(location.dsn, autocommit=True) as admin:
        for statement in statements:
            admin.execute(statement.encode())


def drop_schema(location: PostgresLocation) -> None:
    """Drop ``location``'s schema and everything in it, if it exists."""
    admin_sql(location, f"DROP SCHEMA IF EXISTS {location.schema} CASCADE")


@contextlib.contextmanager
def postgres(*, schema: str | None = None) -> Iterator[PostgresLocation | None]:
    """A fresh schema on a reachable server (dropped afterwards), or None. A named ``schema``
    is kept: it is made or reused, never dropped."""
    try:
        import psycopg
    except ImportError:
        yield None
        return
    for url in filter(None, (os.environ.get("CERTBROKER_BENCH_POSTGRES", ""), *URLS)):
        try:
            with psycopg.connect(url, connect_timeout=3):
                pass
        except psycopg.OperationalError:
            continue
        location = PostgresLocation(url, schema or f"bench_{secrets.token_hex(6)}")
        if schema is not None:
            yield location
            return
        try:
            yield location
        finally:
            drop_schema(location)
        return
    yield None


async def _drive(
    target: str, token: str, subject: str, calls: int, warmup: int, *, round_no: int
) -> float:
    """Lookups per second over ``calls`` lookups, ``CONCURRENCY`` in flight (after ``warmup``)."""
    metadata = client.bearer(token)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)

        async def worker(numbers: Iterator[int]) -> None:
            for n in numbers:  # shared by the workers: each number is called once
                # A case number per call, in the policy's format: every call its own entry.
                case = f"GZ{20260000 + round_no:08d}-{n:06d}"
                request = client.lookup_request(RECORD_TYPE, subject, MATTER, case)
                try:
                    await stub.Lookup(request, metadata=metadata, timeout=30)
                except grpc.RpcError as exc:
                    raise BenchError(f"Lookup: {client.call_error(exc)}") from None

        async def phase(numbers: Iterator[int]) -> None:
            await asyncio.gather(*(worker(numbers) for _ in range(CONCURRENCY)))

        await phase(iter(range(warmup)))  # connections, caches and the schema settle first
        started = time.perf_counter()
        await phase(iter(range(warmup, warmup + calls)))
        return calls / (time.perf_counter() - started)


def _result(rates: dict[str, list[float]], rounds: int, calls: int, no_pg: bool) -> Result:
    median = {name: statistics.median(values) for name, values in rates.items()}
    rows = [
        (
            name,
            f"{median[name]:,.0f}",
            f"{max(values):,.0f}",
            f"{min(values):,.0f}",
            str(len(values)),
        )
        for name, values in rates.items()
    ]
    notes = []
    if no_pg:
        notes.append("PostgreSQL unreachable: only the SQLite broker was measured")
        verdict = "PostgreSQL / SQLite: not measured"
    else:
        ratio = median["PostgreSQL"] / median["SQLite"]
        met = "met" if ratio >= TARGET else "NOT met"
        verdict = f"PostgreSQL / SQLite lookups/s (median): {ratio:.2f} (target ≥ {TARGET}: {met})"
    return Result(
        section=SECTION,
        setup=(
            "Two `certbroker serve` processes, in-process demo adapters, differing only in the "
            "audit backend (SQLite WAL synchronous=FULL vs PostgreSQL synchronous_commit=on, "
            "advisory lock per batch); record cache off, so every lookup fetches; "
            f"{CONCURRENCY} concurrent marriage Lookups from one "
            f"client, {calls} measured calls per round, {rounds} round(s) alternating order."
        ),
        header=("audit backend", "lookups/s (median)", "best", "worst", "rounds"),
        rows=rows,
        verdict=verdict,
        notes=notes,
    )
