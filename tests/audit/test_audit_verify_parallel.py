"""Parallel offline verification gives exactly the sequential IntegrityReport, tamper or not.

Exports are built by hand (chained bodies, signed checkpoints at chosen sizes, some on range
boundaries) so the tampering can be placed precisely. The parallel path is forced on these
small files by lowering the module's thresholds; the reference is the sequential walk,
``check_entries(_entries(...))``, exactly what ``verify_export`` ran before the parallel path.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit.export import _entries, _header, _Malformed, verify_export
from certbroker.audit.integrity import checkpoint, merkle
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN
from certbroker.audit.verify import parallel, worker
from certbroker.audit.verify.report import (
    DELETED,
    EDITED,
    INSERTED,
    MALFORMED,
    OK,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    UNVERIFIED_CHECKPOINTS,
    WRONG_KEY,
    IntegrityReport,
    check_entries,
    open_checkpoints,
)

N = 160
MARKS = (16, 40, 64, 100, 128, 159, N)  # checkpoint sizes; some land on range boundaries
PROCESSES = 3
RANGE = 2500  # bytes: about 9 ranges of ~18 entries, 3 segments (parent + 2 workers)
KEY = Ed25519PrivateKey.generate()


def body(seq: int) -> bytes:
    # Varying lengths, so byte ranges do not cut at a fixed line count.
    fields = {"seq": seq, "clerk": f"clerk-{seq % 7}", "note": "x" * (seq * 7 % 23)}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def build(n: int = N, marks: tuple[int, ...] = MARKS, first: int = 1) -> list[bytes]:
    """Export lines (header first) of entries ``first..n`` of an ``n``-entry log."""
    tree, prev, lines, notes = merkle.CompactRange(), b"0" * 64, [], []
    header_prev, header_frontier = prev, tree.frontier
    for seq in range(1, n + 1):
        if seq == first:
            header_prev, header_frontier = prev, tree.frontier
        data = body(seq)
        prev = hashlib.sha256(prev + data).hexdigest().encode()
        tree.append(merkle.leaf_hash(data))
        if seq >= first:
            lines.append(b'{"seq":%d,"entry_hash":"%s","body":%s}\n' % (seq, prev, data))
        if seq in marks and seq >= first - 1:
            head = checkpoint.Checkpoint(ORIGIN, seq, tree.root(), datetime.now(UTC))
            notes.append(checkpoint.sign(head, KEY, KEY_NAME))
    header = {
        "certbroker_audit_export": 1,
        "origin": ORIGIN,
        "from": first,
        "to": n,
        "prev_hash": header_prev.decode(),
        "frontier": [h.hex() for h in header_frontier],
        "checkpoints": notes,
    }
    return [json.dumps(header).encode() + b"\n", *lines]


def sequential(path: Path, key: Ed25519PrivateKey = KEY) -> IntegrityReport:
    """The reference: the sequential walk verify_export did before the parallel path."""
    with path.open("rb") as f:
        head = _header(f.readline())
        heads, bad = open_checkpoints(
            head["checkpoints"], key.public_key(), "header checkpoints[{}]"
        )
        if bad is not None:
            return bad
        try:
            return check_entries(
                _entries(iter(f)),
                heads,
                start=head["from"],
                prev_hash=str(head["prev_hash"]).encode("ascii"),
                frontier=[bytes.fromhex(h) for h in head["frontier"]],
                expected_last=head["to"],
            )
        except _Malformed as exc:
            return exc.at(head["from"])


def force_parallel(monkeypatch: pytest.MonkeyPatch, *, steal: bool = False) -> None:
    """Every export takes the parallel path: small ranges, chunks of a few lines. Without
    ``steal`` each worker scans its whole segment, so the workers' part is deterministic."""
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(parallel, "RANGE_BYTES", RANGE)
    monkeypatch.setattr(parallel, "CHUNK_BYTES", 700)
    monkeypatch.setattr(parallel, "PROCESSES", PROCESSES)
    monkeypatch.setattr(parallel, "STEAL", steal)


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    force_parallel(monkeypatch)


@pytest.fixture
def in_process(forced: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ``forced``, with the parent scanning every range itself (same code, no processes):
    the exhaustive grid runs fast; real worker processes are covered below."""
    monkeypatch.setattr(parallel, "_spawn", lambda *args: None)


def range_starts(lines: list[bytes]) -> list[int]:
    """Index (into the entry lines, 0-based) of the first line of each range after the first,
    as check_export cuts them."""
    offsets, total = [], len(lines[0])
    for line in lines[1:]:
        offsets.append(total)
        total += len(line)
    with tempfile.TemporaryFile() as f:
        f.write(b"".join(lines))
        f.flush()
        parts = (total - len(lines[0])) // RANGE
        points = parallel.split_points(f.fileno(), len(lines[0]), total, parts)
    return [offsets.index(p) for p in points[1:-1]]


def segment_starts(starts: list[int]) -> list[int]:
    """The first line of each worker's segment (the parent's segment is the first)."""
    ranges = len(starts) + 1
    return [starts[ranges * k // PROCESSES - 1] for k in range(1, PROCESSES)]


def positions() -> list[int]:
    """Where to tamper: inside the first, a middle and the last range, and on each side of
    every range boundary (the last entry of one range, the first of the next)."""
    starts = range_starts(build())
    assert len(starts) >= 6
    around = {i + d for i in starts for d in (-1, 0)}
    return sorted({1, (starts[3] + starts[4]) // 2, N - 3} | around)


def rehash(entry_lines: list[bytes], prev: bytes) -> list[bytes]:
    """Recompute every chain hash: a consistent rewrite only a checkpoint can expose."""
    out = []
    for line in entry_lines:
        stored = json.loads(line)["entry_hash"].encode()
        data = line[line.index(b'"body":') + 7 : -2]
        prev = hashlib.sha256(prev + data).hexdigest().encode()
        out.append(line.replace(stored, prev))
    return out


def edit(line: bytes) -> bytes:
    return line.replace(b'"clerk-', b'"clerX-')


def forge(ls: list[bytes], i: int) -> list[bytes]:
    """A forged entry put in before entry ``i + 1``, chained onto the one before: it carries
    that entry's number, so the real one follows it (an attacker with the file's rights)."""
    prev = json.loads(ls[i - 1])["entry_hash"].encode() if i else b"0" * 64
    data = edit(ls[i])[ls[i].index(b'"body":') + 7 : -2]
    forged = b'{"seq":%d,"entry_hash":"%s","body":%s}\n' % (
        i + 1,
        hashlib.sha256(prev + data).hexdigest().encode(),
        data,
    )
    return [*ls[:i], forged, *ls[i:]]


def renumber(line: bytes, by: int = 1) -> bytes:
    """The line's sequence field changed; body and hashes untouched."""
    seq = json.loads(line)["seq"]
    return line.replace(b'{"seq":%d,' % seq, b'{"seq":%d,' % (seq + by), 1)


Tamper = Callable[[list[bytes], int], list[bytes]]
TAMPERS: dict[str, Tamper] = {
    "edited": lambda ls, i: [*ls[:i], edit(ls[i]), *ls[i + 1 :]],
    "deleted": lambda ls, i: [*ls[:i], *ls[i + 1 :]],
    "inserted": lambda ls, i: [*ls[:i], edit(ls[i]), *ls[i:]],
    "forged": forge,
    "duplicated": lambda ls, i: [*ls[:i], ls[i], *ls[i:]],
    "reordered": lambda ls, i: [*ls[:i], ls[i + 1], ls[i], *ls[i + 2 :]],
    "moved-far": lambda ls, i: [*ls[:i], *ls[i + 1 : i + 40], ls[i], *ls[i + 40 :]],
    "truncated": lambda ls, i: ls[:i],
    "rewritten": lambda ls, i: [
        *ls[:i],
        *rehash([edit(ls[i]), *ls[i + 1 :]], json.loads(ls[i - 1])["entry_hash"].encode()),
    ],
    "malformed": lambda ls, i: [
        *ls[:i],
        ls[i].replace(b'"entry_hash"', b'"entry_hsh"'),
        *ls[i + 1 :],
    ],
    "blank-line": lambda ls, i: [*ls[:i], b"\n", *ls[i:]],
    "crlf": lambda ls, i: [*ls[:i], ls[i][:-1] + b"\r\n", *ls[i + 1 :]],
    "renumbered": lambda ls, i: [*ls[:i], renumber(ls[i]), *ls[i + 1 :]],
    "renumbered-rest": lambda ls, i: [*ls[:i], *(renumber(line) for line in ls[i:])],
    "leading-zero-seq": lambda ls, i: [
        *ls[:i],
        ls[i].replace(b'"seq":', b'"seq":0', 1),
        *ls[i + 1 :],
    ],
    "upper-case-hash": lambda ls, i: [
        *ls[:i],
        ls[i].replace(
            json.loads(ls[i])["entry_hash"].encode(),
            json.loads(ls[i])["entry_hash"].upper().encode(),
        ),
        *ls[i + 1 :],
    ],
}
EXPECTED = {
    "edited": EDITED,
    "deleted": DELETED,
    "inserted": INSERTED,
    "forged": INSERTED,
    "duplicated": INSERTED,
    "reordered": REORDERED,
    "moved-far": REORDERED,
    "truncated": TRUNCATED,
    "rewritten": REWRITTEN,
    "malformed": MALFORMED,
    "blank-line": MALFORMED,
    "crlf": MALFORMED,
    "renumbered": EDITED,
    "renumbered-rest": EDITED,
    "leading-zero-seq": OK,  # the sequential parser reads 0042 as 42: the worker must agree
    "upper-case-hash": EDITED,
}


def tampered(tmp_path: Path, case: str, at: int, lines: list[bytes] | None = None) -> Path:
    lines = lines or build()
    path = tmp_path / f"{case}-{at}.jsonl"
    path.write_bytes(b"".join([lines[0], *TAMPERS[case](lines[1:], at)]))
    return path


def check_same(path: Path, key: Ed25519PrivateKey = KEY) -> IntegrityReport:
    expected = sequential(path, key)
    got = verify_export(path, key.public_key())
    assert got == expected
    return got


@pytest.mark.parametrize("marks", [MARKS, (16,)], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_every_tamper_anywhere_gives_the_sequential_report(
    in_process: None, tmp_path: Path, case: str, marks: tuple[int, ...]
) -> None:
    # Sparse: one early checkpoint, so later ranges are confirmed by the chain alone.
    lines = build(marks=marks)
    codes = {check_same(tampered(tmp_path, case, at, lines)).code for at in positions()}
    if case == "rewritten" and marks != MARKS:  # only the rewrite at entry 2 is before 16
        assert codes == {REWRITTEN, OK}
    else:
        assert codes == {EXPECTED[case]}, codes


@pytest.mark.parametrize("case", sorted(TAMPERS))
def test_worker_processes_give_the_sequential_report(
    forced: None, tmp_path: Path, case: str
) -> None:
    starts = range_starts(build())
    first, second = segment_starts(starts)
    inner = next(s for s in starts if first < s < second)  # two ranges of the same worker
    for at in (first - 1, first, inner, (inner + second) // 2, second, N - 3):
        report = check_same(tampered(tmp_path, case, at))
        assert report.code == EXPECTED[case]


def spy_on_parent_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The first lines (byte offsets) of the ranges the parent scans itself."""
    scanned: list[int] = []
    real_scan = worker.scan_range

    def scan(fd: int, lo: int, hi: int, marks: list[int], chunk: int) -> worker.RangeScan:
        scanned.append(lo)
        return real_scan(fd, lo, hi, marks, chunk)

    monkeypatch.setattr(worker, "scan_range", scan)  # in this process only, not in workers
    return scanned


def test_an_intact_export_is_confirmed_without_the_sequential_walk(
    forced: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = build()
    path = tmp_path / "intact.jsonl"
    path.write_bytes(b"".join(lines))
    scanned = spy_on_parent_scans(monkeypatch)

    def no_walk(*args: object) -> Iterator[object]:
        raise AssertionError("the sequential walk ran")

    monkeypatch.setattr(parallel, "resume_entries", no_walk)
    report = verify_export(path, KEY.public_key())
    assert (report.code, report.entries, report.checkpoints) == (OK, N, len(MARKS))
    # The parent scanned its own segment only (the first third); the workers sent the rest.
    starts = range_starts(lines)
    assert len(scanned) == (len(starts) + 1) // PROCESSES
    assert max(scanned) < sum(map(len, lines[: segment_starts(starts)[0] + 1]))
    monkeypatch.undo()
    assert report == sequential(path)


def test_a_forged_entry_just_before_a_checkpointed_one_is_inserted_there(
    in_process: None, tmp_path: Path
) -> None:
    # The forged entry chains, so the first thing amiss is the root at the checkpoint's size;
    # the real entry right after it still makes it INSERTED, at its index (not REWRITTEN).
    lines = build()
    for mark in MARKS:
        report = check_same(tampered(tmp_path, "forged", mark - 1, lines))
        assert (report.code, report.first_bad) == (INSERTED, mark), report


def test_entries_after_the_header_s_last_are_inserted(in_process: None, tmp_path: Path) -> None:
    lines = build()
    header = json.loads(lines[0])
    header["to"] = N - 5
    path = tmp_path / "longer.jsonl"
    path.write_bytes(b"".join([json.dumps(header).encode() + b"\n", *lines[1:]]))
    report = check_same(path)
    assert (report.code, report.first_bad) == (INSERTED, N - 4), report


def without_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 1 << 40)


@pytest.mark.parametrize("mode", ["no-key", "chain-only"])
def test_no_key_and_chain_only_give_the_sequential_report(
    forced: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    lines = build()
    intact = tmp_path / "intact.jsonl"
    intact.write_bytes(b"".join(lines))
    paths = [intact] + [
        tampered(tmp_path, case, at, lines)
        for case in ("edited", "forged", "rewritten", "truncated", "malformed")
        for at in (1, 63, N - 3)
    ]
    got = [verify_export(p, None, chain_only=mode == "chain-only") for p in paths]
    without_processes(monkeypatch)
    assert got == [verify_export(p, None, chain_only=mode == "chain-only") for p in paths]
    if mode == "no-key":  # the rewrite is not shown tampered, only not intact
        assert {r.code for r in got[:1] + got[7:10]} == {UNVERIFIED_CHECKPOINTS}
        assert "DISAGREE" in got[8].problem
    else:
        assert (got[0].ok, got[0].chain_only) == (True, True)
        assert {r.code for r in got[7:10]} == {OK}
    assert [r.code for r in got[1:7]] == [EDITED] * 3 + [INSERTED] * 3
    assert [r.code for r in got[10:]] == [TRUNCATED] * 3 + [MALFORMED] * 3


def test_a_segment_export_and_its_tampering(in_process: None, tmp_path: Path) -> None:
    # Starts at 41 with a frontier of 40 leaves; checkpoint 40 is the segment's start.
    lines = build(first=41)
    path = tmp_path / "segment.jsonl"
    path.write_bytes(b"".join(lines))
    assert check_same(path).entries == N - 40
    for case in ("edited", "deleted", "rewritten", "truncated"):
        for at in (1, 50, 100):
            check_same(tampered(tmp_path, case, at, lines))


def test_a_consistent_rewrite_is_found_against_the_checkpoint_on_a_boundary(
    in_process: None, tmp_path: Path
) -> None:
    # A range ends with entry `boundary`, with a checkpoint there (64 < boundary < 100).
    boundary = next(s for s in range_starts(build()) if 66 < s < 100)
    lines = build(marks=(*MARKS, boundary))
    # Rewritten just before the boundary: caught by that checkpoint, named from 64 on.
    report = check_same(tampered(tmp_path, "rewritten", boundary - 2, lines))
    assert (report.code, report.first_bad) == (REWRITTEN, 65)
    assert f"checkpoint of size {boundary}" in report.problem
    # Rewritten from the next range's first entry on: the boundary checkpoint held.
    report = check_same(tampered(tmp_path, "rewritten", boundary, lines))
    assert (report.code, report.first_bad) == (REWRITTEN, boundary + 1)


def test_a_missing_last_newline_and_a_wrong_key(in_process: None, tmp_path: Path) -> None:
    lines = build()
    path = tmp_path / "no-newline.jsonl"
    path.write_bytes(b"".join(lines)[:-1])
    assert check_same(path).code == OK
    assert check_same(path, Ed25519PrivateKey.generate()).code == WRONG_KEY
    path.write_bytes(b"".join(lines) + b"trailing garbage")
    assert check_same(path).code == MALFORMED


def test_an_export_read_from_a_pipe_is_walked_sequentially(forced: None, tmp_path: Path) -> None:
    fifo = tmp_path / "export.fifo"
    os.mkfifo(fifo)
    data = tampered(tmp_path, "deleted", 100).read_bytes()
    writer = threading.Thread(target=fifo.write_bytes, args=(data,))
    writer.start()
    try:
        report = verify_export(fifo, KEY.public_key())
    finally:
        writer.join()
    assert (report.code, report.first_bad) == (DELETED, 101)


def fake_workers(monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    """Workers that run ``script`` (the job's ranges in ``ranges``) instead of the real one."""

    def spawn(fd: int, job: dict[str, object]) -> subprocess.Popen[bytes]:
        code = f"import json, sys, time\nranges = json.load(sys.stdin)['ranges']\n{script}"
        child = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert child.stdin is not None
        child.stdin.write(json.dumps(job).encode())
        child.stdin.close()
        return child

    monkeypatch.setattr(parallel, "_spawn", spawn)


WORKER_FAILURES = {
    "silent": "time.sleep(600)",
    "claims-then-dies": "print(json.dumps({'claim': ranges[0][0]}), flush=True)",
    "claims-then-hangs": "print(json.dumps({'claim': ranges[0][0]}), flush=True); time.sleep(600)",
    "garbage": 'print(\'{"done": 1, "scan": {"ok": true}}\'); print(\'[]\', flush=True)',
    "exits": "sys.exit(3)",
}


@pytest.mark.parametrize("failure", sorted(WORKER_FAILURES))
def test_the_parent_takes_over_from_workers_that_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    force_parallel(monkeypatch, steal=True)
    monkeypatch.setattr(parallel, "STALL_S", 0.2)  # how long a claimed range may take
    fake_workers(monkeypatch, WORKER_FAILURES[failure])
    scanned = spy_on_parent_scans(monkeypatch)
    lines = build()
    intact = tmp_path / "intact.jsonl"
    intact.write_bytes(b"".join(lines))
    assert check_same(intact).code == OK
    assert len(scanned) == len(range_starts(lines)) + 1  # every range, by the parent
    assert check_same(tampered(tmp_path, "edited", N - 3)).code == EDITED
    assert check_same(tampered(tmp_path, "rewritten", 70)).code == REWRITTEN


def test_no_worker_can_start(forced: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel.sys, "executable", "")
    scanned = spy_on_parent_scans(monkeypatch)
    lines = build()
    intact = tmp_path / "intact.jsonl"
    intact.write_bytes(b"".join(lines))
    assert check_same(intact).code == OK
    assert len(scanned) == len(range_starts(lines)) + 1
    assert check_same(tampered(tmp_path, "deleted", 77)).code == DELETED


def test_a_range_whose_numbers_jump_between_chunks_is_not_confirmed(tmp_path: Path) -> None:
    lines = build()
    path = tmp_path / "renumbered.jsonl"
    chunk = sum(map(len, lines[1:33]))  # the first chunk is exactly entries 1..32
    for by in (0, 32, -16):
        renumbered = [renumber(line, by) for line in lines[33:]]
        path.write_bytes(b"".join([*lines[:33], *renumbered]))
        with path.open("rb") as f:
            scan = worker.scan_range(f.fileno(), len(lines[0]), path.stat().st_size, MARKS, chunk)
        assert scan.ok is (by == 0)
        assert sequential(path).code == (OK if by == 0 else EDITED)


@pytest.mark.parametrize("base", [0, 1, 5, 8, 13, 64, 100])
def test_subtree_cover_rebuilds_every_root(base: int) -> None:
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(base + 70)]
    cuts = [c for c in (base + 1, base + 3, base + 32, base + 33, base + 69) if c > base]
    nodes: list[tuple[int, bytes]] = []
    worker._cover(leaves[base:], base, cuts, nodes)
    tree = merkle.CompactRange()
    tree.extend(leaves[:base])
    stack, size, seen = list(tree.frontier), base, []
    for level, node in nodes:
        assert size % (1 << level) == 0
        h, index = node, size >> level
        while index & 1:
            h = merkle.node_hash(stack.pop(), h)
            index >>= 1
        stack.append(h)
        size += 1 << level
        if size in cuts or size == len(leaves):
            seen.append(size)
            assert merkle.CompactRange(size, stack).root() == merkle.root(leaves[:size])
    assert seen == [*cuts, len(leaves)]


def test_worker_messages_round_trip_and_garbage_is_refused() -> None:
    scan = worker.RangeScan(True, (3, b'{"seq":3}', b"ab" * 32), 9, b"cd" * 32, [(2, bytes(32))])
    done = json.dumps({"done": 4, "scan": worker.to_wire(scan)}).encode()
    assert worker.read_message(done) == (4, scan)
    assert worker.read_message(b'{"claim": 5}') == (5, None)
    for junk in (None, [], {"ok": True}, {"ok": True, "first": [1, "zz", "x"]}):
        assert not worker.from_wire(junk).ok
    for line in (b"", b"[]", b'{"claim": "5"}', b'{"done": true}'):
        with pytest.raises(ValueError):
            worker.read_message(line)
