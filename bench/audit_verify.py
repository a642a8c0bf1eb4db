"""Offline audit verification rate: an export of N entries checked with only the public key.

Builds an export file directly (entries shaped like real lookup entries, chained and with a
signed checkpoint every 10 000 entries), then times :func:`broker.audit_export.verify_export`.
Target: at least 200 000 entries per second.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.harness import Options, Result
from broker import checkpoint
from broker.audit_export import FORMAT, verify_export
from broker.audit_proofs import KEY_NAME, ORIGIN
from broker.audit_store import GENESIS_HASH, canonical_body
from broker.merkle import CompactRange, leaf_hash

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


def run(options: Options) -> Result:
    """Generate, verify ``rounds`` times, report the best and median rates."""
    n = 2_000 if options.smoke else 300_000
    rounds = options.count(full=3, smoke=1)
    key = Ed25519PrivateKey.generate()
    rates = []
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp:
        path = Path(tmp) / "export.jsonl"
        _write(path, n, key)
        for _ in range(rounds):
            began = time.perf_counter()
            report = verify_export(path, key.public_key())
            elapsed = time.perf_counter() - began
            if not report.ok:
                raise RuntimeError(f"benchmark export did not verify: {report.problem}")
            rates.append(n / elapsed)
    rates.sort()
    median = rates[len(rates) // 2]
    met = "met" if median >= TARGET else "NOT met"
    return Result(
        section=SECTION,
        setup=(
            f"`verify_export` on a {n}-entry export (realistic lookup bodies, a signed "
            f"checkpoint every {EVERY}), {rounds} round(s)."
        ),
        header=("round", "entries/s"),
        rows=[(str(i + 1), f"{rate:,.0f}") for i, rate in enumerate(rates)],
        verdict=f"median {median:,.0f} entries/s (target ≥ {TARGET:,}: {met})",
    )
