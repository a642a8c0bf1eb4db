"""Offline audit verification rate: an export of N entries checked with only the public key.

Builds an export file directly (entries shaped like real lookup entries, chained and with a
signed checkpoint every 10 000 entries), then times :func:`certbroker.audit.export.verify_export`
twice per round: with one process (the sequential walk) and with the default process count
(byte ranges scanned in parallel, :mod:`certbroker.audit.verify.parallel`). Both must give the same
report. Target: at least 200 000 entries per second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import BenchError, Options, Result
from certbroker.audit.export import FORMAT, verify_export
from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity.merkle import CompactRange, leaf_hash
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.audit.segment import open_envelope, opened_export, write_segment
from certbroker.audit.store.rows import GENESIS_HASH, canonical_body
from certbroker.audit.verify import parallel
from certbroker.audit.verify.report import IntegrityReport

SECTION = "Offline audit verification"
TARGET = 200_000
EVERY = 10_000


def _body(seq: int) -> bytes:
    return canonical_body(
        {
            "v": 1,
            "seq": seq,
            "entry_id": f"{seq:032x}",
            "time": "2025-03-01T08:30:00.123Z",
            "kind": "lookup",
            "clerk": f"clerk-{seq % 97}",
            "office": "hall-3",
            "roles": ["clerk"],
            "subject_id": f"11010519491231{seq % 9999:04d}",
            "matter_code": "M-001",
            "case_number": f"C-{seq}",
            "consent_method": "id_card_read",
            "record_type": "household",
            "decision": "allow",
            "rule_id": "household-basic",
            "withheld_fields": ["members"],
            "outcome": "OK",
            "status": "OK",
            "policy_version": "ab" * 32,
            "department": "civil_affairs",
            "decision_id": "d" * 32,
            "latency_ms": 1.234,
            "bundle_id": "",
            "relation": "",
            "item_entry_ids": [],
            "outcome_counts": {},
        }
    ).encode("utf-8")


def _write(path: Path, n: int, key: Ed25519PrivateKey) -> None:
    tree, prev, notes = CompactRange(), GENESIS_HASH.encode(), []
    lines = []
    for seq in range(1, n + 1):
        body = _body(seq)
        prev = hashlib.sha256(prev + body).hexdigest().encode()
        tree.append(leaf_hash(body))
        lines.append(b'{"seq":%d,"entry_hash":"%s","body":%s}\n' % (seq, prev, body))
        if seq % EVERY == 0 or seq == n:
            head = checkpoint.Checkpoint(ORIGIN, seq, tree.root(), datetime.now(UTC))
            notes.append(checkpoint.sign(head, key, KEY_NAME))
    header = {
        "certbroker_audit_export": FORMAT,
        "origin": ORIGIN,
        "from": 1,
        "to": n,
        "prev_hash": GENESIS_HASH,
        "frontier": [],
        "checkpoints": notes,
    }
    with path.open("wb") as f:
        f.write(json.dumps(header).encode() + b"\n")
        f.writelines(lines)


@contextmanager
def _settings(**values: object) -> Iterator[None]:
    """Set :mod:`certbroker.audit.verify.parallel` settings for a block, then restore them."""
    saved = {name: getattr(parallel, name) for name in values}
    for name, value in values.items():
        setattr(parallel, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(parallel, name, value)


def _timed(
    path: Path, key: Ed25519PrivateKey, processes: int | None
) -> tuple[float, IntegrityReport]:
    with _settings(PROCESSES=processes):
        began = time.perf_counter()
        report = verify_export(path, key.public_key())
        elapsed = time.perf_counter() - began
    if not report.ok:
        raise BenchError(f"benchmark export did not verify: {report.problem}")
    return elapsed, report


def _segment(export: Path, n: int, key: Ed25519PrivateKey) -> Path:
    """The export as an archive segment (zstd, signed envelope), as `audit archive --compress`
    writes it."""
    segment = export.with_suffix(".segment")
    facts = {"from": 1, "to": n, "prev_hash": GENESIS_HASH, "last_entry_hash": ""}
    with export.open("rb") as source:
        write_segment(segment, lambda out: shutil.copyfileobj(source, out), facts, key, KEY_NAME)
    return segment


def _timed_segment(segment: Path, key: Ed25519PrivateKey) -> float:
    """Seconds to check a segment offline as `audit verify` does: the envelope's signature and
    payload hash, then the export inside (decompressed to a temporary file), in parallel."""
    began = time.perf_counter()
    open_envelope(segment, key.public_key())
    with opened_export(segment) as plain:
        report = verify_export(plain, key.public_key())
    elapsed = time.perf_counter() - began
    if not report.ok:
        raise BenchError(f"benchmark segment did not verify: {report.problem}")
    return elapsed


def run(options: Options) -> Result:
    """Generate, verify ``rounds`` times each way, report rates against the target."""
    n = 2_000 if options.smoke else 300_000
    rounds = options.count(full=3, smoke=1)
    key = Ed25519PrivateKey.generate()
    processes = parallel.default_processes()
    # The smoke run is far below the sizes that are worth a process; force the parallel path
    # anyway (small ranges and chunks) so CI keeps the worker processes working.
    small = {"MIN_PARALLEL_BYTES": 0, "RANGE_BYTES": 128 << 10, "CHUNK_BYTES": 64 << 10}
    rows = []
    sequential, parallel_rates = [], []
    load_before = os.getloadavg()[0]
    with (
        tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp,
        _settings(**(small if options.smoke else {})),
    ):
        path = Path(tmp) / "export.jsonl"
        _write(path, n, key)
        segment = _segment(path, n, key)
        segment_bytes = segment.stat().st_size
        segment_rates = []
        for i in range(rounds):
            one, seq_report = _timed(path, key, 1)
            many, par_report = _timed(path, key, None)
            if par_report != seq_report:
                raise BenchError(f"parallel and sequential reports differ: {par_report}")
            packed = _timed_segment(segment, key)
            sequential.append(n / one)
            parallel_rates.append(n / many)
            segment_rates.append(n / packed)
            rows.append(
                (
                    str(i + 1),
                    f"{n / one:,.0f}",
                    f"{n / many:,.0f}",
                    f"{one / many:.2f}",
                    f"{n / packed:,.0f}",
                )
            )
    seq_median, par_median = _median(sequential), _median(parallel_rates)
    seg_median = _median(segment_rates)
    met = "met" if par_median >= TARGET else "NOT met"
    return Result(
        section=SECTION,
        setup=(
            f"`verify_export` on a {n}-entry export (realistic lookup bodies, a signed "
            f"checkpoint every {EVERY}), {rounds} round(s), each sequential (1 process) then "
            f"parallel (up to {processes} processes, the parent included)."
        ),
        header=(
            "round",
            "sequential entries/s",
            "parallel entries/s",
            "speed-up",
            "zstd segment entries/s",
        ),
        rows=rows,
        verdict=(
            f"median parallel {par_median:,.0f} entries/s = {par_median / TARGET:.2f}× the "
            f"{TARGET:,} target ({met}); sequential {seq_median:,.0f} entries/s = "
            f"{seq_median / TARGET:.2f}×; a zstd archive segment (signature, payload hash, "
            f"decompression, then the parallel walk) {seg_median:,.0f} entries/s = "
            f"{seg_median / TARGET:.2f}×, {segment_bytes / n:.0f} bytes per entry"
        ),
        notes=[
            # Other work on the machine takes CPU from both measurements alike.
            f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on "
            f"{os.cpu_count()} CPU(s): other work divides both rates",
            *(
                ["smoke: the parallel path is forced on a tiny file; its rate is start-up cost"]
                if options.smoke
                else []
            ),
        ],
    )


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]
