"""Scenario "Audit log at scale": bytes per entry and auditor queries over millions of entries.

The entries are generated straight into the store (not through gRPC), by the writer's own
append step (:func:`certbroker.audit.append.append_rows`: chain, compact rows, Merkle nodes) in
transactions of :data:`CHUNK` entries, with a signed checkpoint every :data:`CHECKPOINT_EVERY`
entries: the log verifies like one the broker wrote. Entries are realistic and varied: clerks
of many offices, citizens seen a few times each, matters, record types, denials (about one
in eight), bundles, withheld fields; :data:`PER_DAY` entries a day.

Measured, on SQLite and (when reachable) PostgreSQL, both in entry format version 2:

- bytes per entry: the whole SQLite file (WAL checkpointed) / PostgreSQL's total relation
  size of the log's tables and indexes, divided by N;
- p99 of a citizen report for one subject (:func:`certbroker.audit.scan.scan`, as the
  Audit service's CitizenReport reads it), an auditor's query by clerk for one day, and the
  anomaly scan for one day (:func:`certbroker.audit.anomaly_scan.find_in_store`, as the
  Audit service runs it: the rules counted in SQL, and the day's disputes);
- append speed (entries/s through the group-commit store, batches of 16, :data:`APPENDS`
  of them, the WAL checkpoints included) at N = 10 thousand and at the full N.

Before generating, free disk space is checked (:data:`BYTES_BUDGET` per entry, twice); N is
scaled down with a message when it does not fit. ``CERTBROKER_BENCH_SCALE_N`` sets N (default
1,000,000; smoke: 3,000).

Generating 10 million entries takes a while (about half an hour on SQLite, longer on
PostgreSQL, on this 2-core machine). ``CERTBROKER_BENCH_SCALE_KEEP=DIR`` keeps the generated
stores (``DIR/scale-N.sqlite``, PostgreSQL schema ``bench_scale_N``, with the checkpoint key in
``DIR``) and a later run with the same N reuses them instead of generating again; the reported
generation rate is then the one recorded when they were made. Each run's append measurement
adds its entries to a kept store (dated after the generated days, so the reads see the same
days).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.audit_backends import admin_sql, drop_schema, postgres
from bench.harness import Options, Result, percentile
from certbroker import config, policy
from certbroker.audit.anomaly_scan import find_in_store
from certbroker.audit.append import ChainStore, append_rows
from certbroker.audit.events import AuditEvent, epoch_time, event_fields
from certbroker.audit.integrity.proofs import CheckpointSigner, sign_checkpoint
from certbroker.audit.scan import Criteria, scan
from certbroker.audit.store.compact import Terms
from certbroker.audit.store.db import backend_for
from certbroker.config import AuditLocation, PostgresLocation
from certbroker.ids import new_id

SECTION = "Audit log at scale"
TARGET_BYTES = 400
TARGET_P99_MS = 100.0
CHUNK = 5000
CHECKPOINT_EVERY = 250_000
PER_DAY = 20_000
BYTES_BUDGET = 600  # per entry, generous: the check is for the disk, not the target
APPENDS = 16_384  # entries per append measurement: several WAL checkpoints on SQLite
START = datetime(2026, 1, 5, tzinfo=UTC).timestamp()
CLERKS = 2000
OFFICES = 120
SUBJECTS_PER_ENTRY = 3  # on average each citizen is looked up about three times
MATTERS = ("BDC-ZY-001", "HJ-QY-002", "SB-ZM-003", "HY-DJ-004", "BDC-DY-005", "JY-RX-006")
RECORDS = {"hukou": "public_security", "social_security": "hrss", "property": "natural_resources",
           "marriage": "civil_affairs"}  # fmt: skip
WITHHELD = (("members.id_number",), (), ("address.detail", "phone"), ())
#: Every generated office keeps the shipped policy's hall hours (Mon–Sat 08:30–17:30 at
#: UTC+08:00, :data:`certbroker.audit.anomalies.HALL_HOURS`): a working day's lookups fall in
#: them, but for the last :data:`LATE_SHARE` (overtime, 17:30–21:30), which the anomaly scan
#: reports as OUTSIDE_HOURS. START is a Monday; Sundays have no entries.
OPEN_S = 30 * 60  # 08:30 local is 00:30 UTC
OPEN_LEN_S = 9 * 3600
LATE_LEN_S = 4 * 3600
LATE_SHARE = 0.01


def working_day(day: int) -> float:
    """The UTC midnight (epoch seconds) starting generated day ``day`` (0: START)."""
    return START + ((day // 6) * 7 + day % 6) * 86_400


def entry_time(n: int) -> float:
    """Entry ``n``'s time (epoch seconds): :data:`PER_DAY` a working day, evenly spread over
    the opening hours, then the day's overtime share over the evening."""
    day, k = divmod(n, PER_DAY)
    inside = round(PER_DAY * (1 - LATE_SHARE))
    if k < inside:
        return working_day(day) + OPEN_S + k * OPEN_LEN_S / inside
    return working_day(day) + OPEN_S + OPEN_LEN_S + (k - inside) * LATE_LEN_S / (PER_DAY - inside)


def _event(rng: random.Random, n: int, total: int) -> AuditEvent:
    clerk = rng.randrange(CLERKS)
    record = rng.choice(tuple(RECORDS))
    denied = rng.random() < 0.12
    bundle = rng.random() < 0.2
    return AuditEvent(
        kind="lookup",
        clerk=f"clerk-{clerk:04d}",
        office=f"wz-hall-{clerk % OFFICES:03d}",
        roles=("window_clerk",) if clerk % 9 else ("window_clerk", "supervisor"),
        subject_id=f"3303{rng.randrange(max(1, total // SUBJECTS_PER_ENTRY)):014d}",
        matter_code=rng.choice(MATTERS),
        case_number="" if rng.random() < 0.03 else f"WZ{2026}{n:09d}",
        consent_method=rng.choice(("id_card_read", "signed_form")),
        record_type=record,
        decision="deny" if denied else "allow",
        rule_id=f"{record}-{'deny' if denied else 'allow'}-{rng.randrange(4)}",
        withheld_fields=() if denied else rng.choice(WITHHELD),
        outcome="POLICY_DENIED" if denied else "OK",
        status="PERMISSION_DENIED" if denied else "OK",
        policy_version="5f1c" + "0" * 56 + "9ab2",
        department=RECORDS[record],
        latency_ms=round(rng.uniform(2, 80), 3),
        decision_id=new_id(),
        bundle_id=new_id() if bundle else "",
        relation=rng.choice(("seller", "buyer")) if bundle else "",
        from_cache=rng.random() < 0.1,
    )


def _bodies(rng: random.Random, first: int, count: int, total: int) -> list[dict[str, object]]:
    bodies = []
    for n in range(first, first + count):
        fields = event_fields(_event(rng, n, total))
        fields["entry_id"] = new_id()
        fields["time"] = epoch_time(entry_time(n))
        bodies.append(fields)
    return bodies


def generate(location: AuditLocation, total: int, signer: CheckpointSigner) -> float:
    """Write ``total`` entries (format 2) into a new log at ``location``; seconds taken."""
    rng = random.Random(18)  # noqa: S311 - reproducible test data
    began = time.perf_counter()
    store = ChainStore.open(backend_for(location), entry_format=2)
    terms = Terms()
    head = None
    try:
        for first in range(0, total, CHUNK):
            bodies = _bodies(rng, first, min(CHUNK, total - first), total)
            with store.session.transaction() as conn:
                _, head = append_rows(conn, bodies, head, terms=terms)
            if (first + CHUNK) % CHECKPOINT_EVERY == 0 or first + CHUNK >= total:
                sign_checkpoint(location, signer, clock=lambda: entry_time(total))
    finally:
        store.close()
    if isinstance(location, PostgresLocation):
        _vacuum(location)
    return time.perf_counter() - began


def _vacuum(location: PostgresLocation) -> None:
    """``VACUUM ANALYZE`` the log's tables: what autovacuum does to an insert-only table as it
    grows (PostgreSQL 13+), here at once after the bulk load. It summarizes the BRIN ranges on
    ``time`` (until then a range query reads every unsummarized block) and gives the planner
    the partitions' statistics."""
    admin_sql(
        location,
        f"VACUUM ANALYZE {location.schema}.audit_entries",
        f"VACUUM ANALYZE {location.schema}.audit_terms",
    )


def append_rate(location: AuditLocation, count: int) -> float:
    """Entries per second appended in batches of 16 through the writer's store, its close
    included: on SQLite that copies what is left in the WAL into the database file, so a run
    that ends between two checkpoints (one per ~3,000 entries of a large log, see
    :data:`certbroker.audit.store.sqlite.WAL_CHECKPOINT_PAGES`) does not leave that work out.
    The entries continue the log's days, as a broker's next appends would."""
    rng = random.Random(7)  # noqa: S311 - reproducible test data
    backend = backend_for(location)
    with contextlib.closing(backend.connect_read()) as conn:
        (last,) = conn.execute("SELECT max(seq) FROM audit_entries").fetchone()
    store = ChainStore.open(backend, entry_format=2)
    try:
        batches = [_bodies(rng, int(last) + i * 16, 16, 10**6) for i in range(count // 16)]
        began = time.perf_counter()
        for bodies in batches:
            store.write_batch(bodies)
    except BaseException:
        store.close()
        raise
    store.close()
    return count / (time.perf_counter() - began)


def size_bytes(location: AuditLocation) -> int:
    """The log's storage: the SQLite file, or PostgreSQL's total size of the log's tables."""
    backend = backend_for(location)
    if isinstance(location, PostgresLocation):
        with contextlib.closing(backend.connect_read()) as conn:
            (size,) = conn.execute(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = ? AND c.relkind = 'r'",
                (location.schema,),
            ).fetchone()
        return int(size)
    with contextlib.closing(sqlite3.connect(location)) as raw:
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return Path(location).stat().st_size


def _timed(samples: list[float], action: Callable[[], object]) -> None:
    began = time.perf_counter()
    action()
    samples.append((time.perf_counter() - began) * 1000)


def _anomalies(location: AuditLocation, criteria: Criteria, rules: policy.PolicySet) -> None:
    find_in_store(location, rules, since=criteria.since, until=criteria.until)


def queries(location: AuditLocation, total: int, runs: int) -> dict[str, list[float]]:
    """Latency samples (ms) of the three auditor reads, on random subjects, clerks and days."""
    rng = random.Random(99)  # noqa: S311 - reproducible test data
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    days = max(1, total // PER_DAY)
    out: dict[str, list[float]] = {"citizen": [], "clerk_day": [], "anomaly_day": []}
    # One untimed round first, as a running broker has had: its first anomaly scan of a log
    # learns the offices' opening hours (kept per policy), its first reads load the terms.
    for round_no in range(runs + 1):
        subject = f"3303{rng.randrange(max(1, total // SUBJECTS_PER_ENTRY)):014d}"
        day = datetime.fromtimestamp(working_day(rng.randrange(days)), tz=UTC)
        clerk = f"clerk-{rng.randrange(CLERKS):04d}"
        until = day + timedelta(days=1)
        citizen = Criteria(subject_id=subject, kinds=("lookup",))
        by_clerk = Criteria(clerk=clerk, since=day, until=until)
        whole_day = Criteria(kinds=("lookup",), since=day, until=until)
        into = out if round_no else {key: [] for key in out}
        _timed(into["citizen"], functools.partial(scan, location, citizen))
        _timed(into["clerk_day"], functools.partial(scan, location, by_clerk))
        _timed(into["anomaly_day"], functools.partial(_anomalies, location, whole_day, rules))
    return out


def _scaled(total: int, where: Path) -> tuple[int, str]:
    free = shutil.disk_usage(where).free
    fits = free // (2 * BYTES_BUDGET)
    if total <= fits:
        return total, ""
    return int(fits), f"only {free / 2**30:.1f} GiB free: N scaled down from {total:,} to {fits:,}"


@contextlib.contextmanager
def _locations(base: Path, keep: Path | None, total: int) -> Iterator[dict[str, AuditLocation]]:
    if keep is not None:
        found: dict[str, AuditLocation] = {"SQLite": keep / f"scale-{total}.sqlite"}
        with postgres(schema=f"bench_scale_{total}") as pg:
            if pg is not None:
                found["PostgreSQL"] = pg
            yield found
        return
    with postgres() as pg:
        found = {"SQLite": base / "scale.sqlite"}
        if pg is not None:
            found["PostgreSQL"] = pg
        yield found


def _generated(
    location: AuditLocation, count: int, signer: CheckpointSigner, keep: Path | None
) -> float:
    """Entries generated per second: now, or as recorded when a kept store was made."""
    if keep is None:
        return count / generate(location, count, signer)
    marker = keep / f"{'pg' if isinstance(location, PostgresLocation) else 'sqlite'}-{count}.done"
    if marker.exists():
        return float(marker.read_text())
    # A store whose generation did not finish is made again from nothing.
    if isinstance(location, PostgresLocation):
        drop_schema(location)
    else:
        Path(location).unlink(missing_ok=True)
    rate = count / generate(location, count, signer)
    marker.write_text(f"{rate:.1f}")
    return rate


def _small_rate(name: str, base: Path, count: int, signer: CheckpointSigner, appends: int) -> float:
    """Appends per second to a new log of ``count`` entries of store kind ``name``."""
    if name == "SQLite":
        small_log = base / "small.sqlite"
        generate(small_log, count, signer)
        return append_rate(small_log, appends)
    with postgres() as pg:  # a fresh schema, dropped afterwards
        assert pg is not None  # the large log's server answered a moment ago
        generate(pg, count, signer)
        return append_rate(pg, appends)


def run(options: Options) -> Result:
    """Generate N entries per backend, measure size, reads and appends."""
    wanted = int(os.environ.get("CERTBROKER_BENCH_SCALE_N", "3000" if options.smoke else "1000000"))
    runs = options.count(full=100, smoke=3)
    pg_env = os.environ.get("CERTBROKER_BENCH_SCALE_PG_N")
    pg_total = int(pg_env) if pg_env else None
    notes: list[str] = []
    rows: list[tuple[str, ...]] = []
    keep_env = os.environ.get("CERTBROKER_BENCH_SCALE_KEEP")
    keep = Path(keep_env) if keep_env else None
    with tempfile.TemporaryDirectory(prefix="certbroker-scale-") as tmp:
        base = Path(tmp)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        total, message = _scaled(wanted, keep or base)
        if message:
            notes.append(message)
        if keep is not None:
            notes.append(f"stores kept in {keep} (CERTBROKER_BENCH_SCALE_KEEP)")
        signer = CheckpointSigner.load(keep or base)
        with _locations(base, keep, total) as locations:
            for name, location in locations.items():
                count = total
                if name == "PostgreSQL" and pg_total is not None and pg_total < total:
                    count = pg_total
                    notes.append(f"PostgreSQL: N = {count:,} (CERTBROKER_BENCH_SCALE_PG_N)")
                rate = _generated(location, count, signer, keep)
                size = size_bytes(location)
                samples = queries(location, count, runs)
                appends = APPENDS if not options.smoke else 64
                rate_large = append_rate(location, appends)
                # The same appends to a log of 10 thousand entries in the same store kind.
                small = f"{_small_rate(name, base, min(count, 10_000), signer, appends):,.0f}"
                rows.append(
                    (
                        name,
                        f"{count:,}",
                        f"{size / count:.0f}",
                        *(
                            f"{percentile(samples[k], 50):.1f} / {percentile(samples[k], 99):.1f}"
                            for k in samples
                        ),
                        small,
                        f"{rate_large:,.0f}",
                        f"{rate:,.0f}",
                    )
                )
    verdict = f"target: ≤ {TARGET_BYTES} bytes/entry live and p99 ≤ {TARGET_P99_MS:.0f} ms per read"
    return Result(
        section=SECTION,
        setup=(
            f"N entries (format 2) generated into each store with chain, tree and a signed "
            f"checkpoint every {CHECKPOINT_EVERY:,}; {PER_DAY:,} entries/day, {CLERKS} clerks, "
            f"{runs} runs per read on random subjects/clerks/days"
        ),
        header=(
            "store",
            "N",
            "bytes/entry",
            "citizen p50 / p99 ms",
            "clerk-day p50 / p99 ms",
            "anomaly-day p50 / p99 ms",
            "append/s @10k",
            "append/s @N",
            "generated/s",
        ),
        rows=rows,
        verdict=verdict,
        notes=notes,
    )
