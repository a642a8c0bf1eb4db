"""Integrity verification of the audit log: hash chain + Merkle tree + signed checkpoints.

One streaming checker serves an export file (offline, with only the checkpoint public key;
:mod:`certbroker.audit.export`) and the live database. It walks entries in order, keeping the hash
chain and a :class:`~certbroker.audit.integrity.merkle.CompactRange`; at each signed checkpoint's
size it compares
the recomputed root with the signed one. The first problem found is classified:

======  ======================  ======================================================
exit    problem                 meaning (``first_bad`` = 1-based entry index)
======  ======================  ======================================================
0       (none)                  intact
3       MALFORMED               not an export file / unreadable, or a stored value is
                                not of its column's kind (``location`` names it)
10      EDITED                  entry ``first_bad`` does not match its stored hash
11      DELETED                 entry ``first_bad`` is missing (later ones follow)
12      INSERTED                an entry that does not belong is at ``first_bad``
13      REORDERED               entry ``first_bad`` is found later in the log
14      TRUNCATED               fewer entries than a signed checkpoint (or the export)
                                covers; ``first_bad`` is the first missing one
15      REWRITTEN               the log is internally consistent but its tree root
                                disagrees with a signed checkpoint; ``first_bad`` is the
                                first entry after the last checkpoint that still matched
                                (the rewrite starts at or after it)
16      WRONG_KEY               a checkpoint is not signed by the given public key
17      BAD_CHECKPOINT          a checkpoint's signature does not verify / is malformed /
                                other log, or a stored checkpoint row disagrees with its
                                signed note
18      UNVERIFIED_CHECKPOINTS  everything else holds, but there are checkpoints and no
                                public key to check them (``--chain-only`` asks for 0)
19      BAD_TREE                a stored Merkle tree row disagrees with the entries;
                                ``first_bad`` is the first entry under the bad node
======  ======================  ======================================================

Problems found before any entry is read (checkpoints) come first, then the walk's, then those
of the stored rows that only the live database has (indexed columns, tree tables). Every
report of a stored row names it in ``location``: ``table[key=value].column``, or ``line N``
of an export.

The walk can stop and resume: :func:`plan` does the checks before any entry,
:func:`resume_entries` goes on from a :class:`Progress`. A large export is checked in byte
ranges by several processes (:mod:`certbroker.audit.verify.parallel`), which resumes this walk
from the first range it cannot confirm, so every report is the one this walk gives.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from certbroker.audit.integrity import checkpoint
from certbroker.audit.integrity.merkle import CompactRange
from certbroker.audit.integrity.proofs import KEY_NAME, ORIGIN

OK: Final = 0
MALFORMED: Final = 3
EDITED: Final = 10
DELETED: Final = 11
INSERTED: Final = 12
REORDERED: Final = 13
TRUNCATED: Final = 14
REWRITTEN: Final = 15
WRONG_KEY: Final = 16
BAD_CHECKPOINT: Final = 17
UNVERIFIED_CHECKPOINTS: Final = 18
BAD_TREE: Final = 19
NAMES: Final = {
    OK: "OK",
    MALFORMED: "MALFORMED",
    EDITED: "EDITED",
    DELETED: "DELETED",
    INSERTED: "INSERTED",
    REORDERED: "REORDERED",
    TRUNCATED: "TRUNCATED",
    REWRITTEN: "REWRITTEN",
    WRONG_KEY: "WRONG_KEY",
    BAD_CHECKPOINT: "BAD_CHECKPOINT",
    UNVERIFIED_CHECKPOINTS: "UNVERIFIED_CHECKPOINTS",
    BAD_TREE: "BAD_TREE",
}
EXIT_CODES_HELP: Final = (
    "exit codes: 0 intact, 2 usage/no such file, 3 malformed export or stored row, "
    "10 edited entry, 11 deleted entry, 12 inserted entry, 13 reordered entries, "
    "14 truncated tail, 15 rewritten log disagreeing with a signed checkpoint, 16 checkpoint "
    "signed by the wrong key, 17 checkpoint signature invalid/malformed or its row altered, "
    "18 checkpoints present but no public key to check them (see --chain-only), "
    "19 stored Merkle tree disagrees with the entries"
)

Entry = tuple[int, bytes, bytes]
"""(stored sequence, body bytes exactly as hashed, stored entry_hash as ASCII hex bytes)."""


@dataclass(frozen=True)
class IntegrityReport:
    """Outcome of a verification: ``code`` is the exit code (see the module docstring).

    ``location`` names the stored row (and column) or export line at fault, when there is one;
    ``chain_only`` says that checkpoints were deliberately not checked.
    """

    code: int
    entries: int
    first_bad: int | None = None
    problem: str = ""
    checkpoints: int = 0
    notes: list[str] = field(default_factory=list)
    location: str = ""
    chain_only: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return self.code == OK

    @property
    def name(self) -> str:
        """The problem's name, e.g. ``"EDITED"``."""
        return NAMES[self.code]


class Malformed(Exception):
    """A stored value (or export line) that is not of its kind: the report is MALFORMED, at
    ``location``; ``first_bad`` when the value belongs to an entry."""

    def __init__(self, location: str, message: str, first_bad: int | None = None) -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message
        self.first_bad = first_bad

    def report(self, entries: int = 0, checkpoints: int = 0) -> IntegrityReport:
        """The MALFORMED report."""
        return IntegrityReport(
            MALFORMED, entries, self.first_bad, str(self), checkpoints, location=self.location
        )


def open_note(
    note: str, public_key: Ed25519PublicKey | None, location: str
) -> checkpoint.Checkpoint | IntegrityReport:
    """One signed checkpoint note of this log: verified with ``public_key``, or, without a key,
    only read (its signature unchecked; the caller must not call the result signed).

    A note that is not a checkpoint of this log is BAD_CHECKPOINT with or without a key: no
    honest broker stores one."""
    try:
        if public_key is None:
            head = checkpoint.read_unverified(note)
            if head.origin != ORIGIN:
                raise checkpoint.CheckpointError(
                    checkpoint.WRONG_ORIGIN, f"checkpoint is for log {head.origin!r}"
                )
            return head
        return checkpoint.open_note(note, public_key, KEY_NAME, origin=ORIGIN)
    except checkpoint.CheckpointError as exc:
        code = WRONG_KEY if exc.reason == checkpoint.WRONG_KEY else BAD_CHECKPOINT
        return IntegrityReport(code, 0, None, f"{location}: {exc}", location=location)


def open_checkpoints(
    notes: Sequence[str], public_key: Ed25519PublicKey | None, where: str = "checkpoints[{}]"
) -> tuple[list[checkpoint.Checkpoint], IntegrityReport | None]:
    """Verify every note with ``public_key`` (None: read them unverified, see
    :func:`open_note`); the first failure as a report. ``where`` names note ``n`` (from 0)."""
    heads: list[checkpoint.Checkpoint] = []
    for number, note in enumerate(notes):
        head = open_note(note, public_key, where.format(number))
        if isinstance(head, IntegrityReport):
            return heads, head
        heads.append(head)
    return heads, None


def _body_seq(body: bytes) -> int | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    seq = data.get("seq") if isinstance(data, dict) else None
    return seq if type(seq) is int else None


def _classify(
    position: int, prev: bytes, entry: Entry, rest: Iterator[Entry], count: int
) -> IntegrityReport:
    """Why ``entry`` cannot be at ``position``; consumes ``rest`` to look ahead."""
    _, body, _ = entry
    seq = _body_seq(body)
    later = list(rest)
    total = count + len(later)
    if seq is None:
        return IntegrityReport(EDITED, total, position, "body is not a JSON entry")
    if seq == position:
        if later and _body_seq(later[0][1]) == position and _chains(prev, later[0]):
            msg = "an entry not in the chain precedes the real one"
            return IntegrityReport(INSERTED, total, position, msg)
        return IntegrityReport(
            EDITED, total, position, "content does not match its hash (entry edited)"
        )
    if seq > position:
        if any(_body_seq(b) == position for _, b, _ in later):
            msg = f"entry {position} appears later; entry {seq} is here (order changed)"
            return IntegrityReport(REORDERED, total, position, msg)
        return IntegrityReport(
            DELETED, total, position, f"entries {position}..{seq - 1} missing (next is {seq})"
        )
    if seq == position - 1:  # a forged entry with a good chain sat at position - 1
        return IntegrityReport(INSERTED, total, seq, f"entry {seq} occurs twice (one inserted)")
    return IntegrityReport(INSERTED, total, position, f"entry {seq} occurs again at {position}")


def _chains(prev: bytes, entry: Entry) -> bool:
    return hashlib.sha256(prev + entry[1]).hexdigest().encode("ascii") == entry[2]


@dataclass(frozen=True)
class Progress:
    """Where a walk stands: entries up to ``position`` passed every check.

    ``prev_hash`` is the stored hash of entry ``position``, ``frontier`` the CompactRange
    frontier of the first ``position`` leaves, ``good`` the largest checkpoint size reached
    whose root matched (or the walk's ``start - 1``). A walk resumed from a Progress gives the
    very report an uninterrupted walk would (:func:`resume_entries`).
    """

    position: int
    prev_hash: bytes
    frontier: tuple[bytes, ...]
    good: int


@dataclass(frozen=True)
class Plan:
    """The checkpoints a walk from ``start`` checks against, prepared by :func:`plan`."""

    start: int
    roots: dict[int, bytes]
    checkpoints: int
    notes: tuple[str, ...]


def plan(
    heads: Sequence[checkpoint.Checkpoint], start: int, prev_hash: bytes, frontier: Sequence[bytes]
) -> tuple[Plan, Progress] | IntegrityReport:
    """The checks before any entry is read: a fork between checkpoints, or a segment start
    (``frontier`` of ``start - 1`` leaves) that disagrees with one, is reported at once."""
    tree = CompactRange(start - 1, frontier)  # validates the frontier's shape
    roots: dict[int, bytes] = {}
    for head in heads:
        roots.setdefault(head.size, head.root_hash)
        if roots[head.size] != head.root_hash:
            msg = f"two signed checkpoints of size {head.size} with different roots (fork)"
            return IntegrityReport(REWRITTEN, 0, head.size, msg, len(heads))
    notes = tuple(
        f"checkpoint of size {s} precedes this segment; not checked" for s in roots if s < start - 1
    )
    good = start - 1
    if good in roots and tree.root() != roots[good]:
        return IntegrityReport(REWRITTEN, 0, start, "segment start disagrees with a checkpoint")
    return Plan(start, roots, len(heads), notes), Progress(good, prev_hash, tree.frontier, good)


def check_entries(
    entries: Iterable[Entry],
    heads: Sequence[checkpoint.Checkpoint],
    *,
    start: int = 1,
    prev_hash: bytes = b"0" * 64,
    frontier: Sequence[bytes] = (),
    expected_last: int | None = None,
) -> IntegrityReport:
    """Verify ``entries`` (sequence ``start`` onwards) against verified checkpoints ``heads``.

    ``prev_hash``/``frontier`` describe the log before ``start`` (chain head and the
    CompactRange frontier of ``start - 1`` leaves). ``expected_last`` is the last sequence the
    source claims to hold (an export's header), for the truncation check.
    """
    prepared = plan(heads, start, prev_hash, frontier)
    if isinstance(prepared, IntegrityReport):
        return prepared
    return resume_entries(entries, *prepared, expected_last=expected_last)


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    """The root of a non-empty frontier (CompactRange.root without building one)."""
    r = frontier[-1]
    for h in reversed(frontier[:-1]):
        r = hashlib.sha256(b"\x01" + h + r).digest()
    return r


def resume_entries(
    entries: Iterable[Entry], walk: Plan, progress: Progress, *, expected_last: int | None = None
) -> IntegrityReport:
    """Go on with the walk :func:`plan` began: ``entries`` follow ``progress.position``."""
    roots, start = walk.roots, walk.start
    prev, good, position = progress.prev_hash, progress.good, progress.position
    # The CompactRange, inlined: this loop is the verifier's hot path, and a method call with
    # argument checks per leaf cost a third of it. stack[i] is the frontier (leftmost first).
    stack = list(progress.frontier)
    it = iter(entries)
    before = prev  # the hash before entry `position` (for _disagrees)
    sha256 = hashlib.sha256
    push = stack.append
    pop = stack.pop
    leaf_prefix, node_prefix = b"\x00", b"\x01"  # RFC 9162 §2.1.1
    for entry in it:
        position += 1
        seq, body, stored = entry
        if seq != position or sha256(prev + body).hexdigest().encode("ascii") != stored:
            return _classify(position, prev, entry, it, position - start + 1)
        before, prev = prev, stored
        h = sha256(leaf_prefix + body).digest()
        index = position - 1  # the new leaf's index; each trailing 1 bit is one merge
        while index & 1:
            h = sha256(node_prefix + pop() + h).digest()
            index >>= 1
        push(h)
        if position in roots:
            if frontier_root(stack) != roots[position]:
                return _disagrees(walk, position, good, before, it)
            good = position
    return finish(walk, position, good, expected_last)


def _disagrees(
    walk: Plan, position: int, good: int, before: bytes, rest: Iterator[Entry]
) -> IntegrityReport:
    """The report when entry ``position`` chained (from ``before``) but the tree root at
    ``position`` disagrees with its signed checkpoint.

    Usually a consistent rewrite. But a forged entry chained onto ``before`` and put in just
    before the checkpointed entry ``position`` gets that far too; it is told apart as the
    middle of the log tells it apart (:func:`_classify`): the real entry ``position``, still
    chained from ``before``, comes next.
    """
    after = next(rest, None)
    total = position - walk.start + 1 + (after is not None) + sum(1 for _ in rest)
    if after is not None and _body_seq(after[1]) == position and _chains(before, after):
        msg = f"entry {position} occurs twice (a forged one, chained in, precedes it)"
        return IntegrityReport(INSERTED, total, position, msg, walk.checkpoints)
    msg = (
        f"entries {good + 1}..{position} are chained consistently but the tree "
        f"root disagrees with the signed checkpoint of size {position}"
    )
    return IntegrityReport(REWRITTEN, total, good + 1, msg, walk.checkpoints)


def finish(walk: Plan, position: int, good: int, expected_last: int | None) -> IntegrityReport:
    """The report once every entry up to ``position`` (the last one) passed."""
    start, checkpoints = walk.start, walk.checkpoints
    count = position - start + 1
    covered = max([s for s in walk.roots if s >= start - 1], default=0)
    claimed = max(covered, expected_last or 0)
    if claimed > position:
        why = "a signed checkpoint covers" if covered > position else "the export header claims"
        msg = f"log ends at entry {position} but {why} {claimed} entries"
        return IntegrityReport(TRUNCATED, count, position + 1, msg, checkpoints)
    if expected_last is not None and position > expected_last:
        msg = f"the export header ends at entry {expected_last} but entries follow it"
        return IntegrityReport(INSERTED, count, expected_last + 1, msg, checkpoints)
    notes = list(walk.notes)
    if position > good:
        notes.append(f"entries {good + 1}..{position} are not yet covered by a checkpoint")
    return IntegrityReport(OK, count, None, "", checkpoints, notes)
