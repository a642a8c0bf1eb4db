"""Check one byte range of an audit export fast: the per-entry work of parallel verification.

:mod:`certbroker.audit.verify.parallel` splits an export's entry lines into byte ranges; each range
is scanned here, in the parent or in a worker process, by :func:`scan_range`:

- parse whole chunks with one regular expression (the exact line layout
  :func:`certbroker.audit.export.export` writes, and only that: any other line makes the range
  "not ok" rather than being guessed at);
- check that sequence numbers run on by one, and the hash chain between consecutive lines of
  the range (the first line's link to the line before is left to the parent, who knows it);
- hash every body as a Merkle leaf and return, instead of the leaves, the roots of the
  aligned perfect subtrees that cover the range, cut at the checkpoint sizes (``marks``): the
  parent appends those O(log n) nodes per piece to its CompactRange frontier and compares
  roots at the marks.

A range is only ever *accepted* here; anything odd (a malformed line, a broken link, a
missing final newline, a file that changed size) answers ``ok=False`` and the parent
re-walks from that range with the exact sequential checker, so every verdict, first bad index
and message is the sequential one.

Standard library only, and runnable as a script (``python -I -S`` on this file's path:
job as JSON on stdin, one JSON message a line on stdout, see :func:`main`), so a worker
process starts in milliseconds without importing the broker, and reads the export through a
file descriptor it inherits rather than by re-opening a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from bisect import bisect_right
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: every import is start-up time of each worker process
    from collections.abc import Iterator, Sequence
    from typing import Any, Final

CHUNK_BYTES: Final = 256 << 10
"""Bytes parsed at a time: enough lines to amortise per-chunk work, few enough that a chunk's
lines, bodies and hashes stay in the CPU cache between passes (4 MiB chunks measured ~15%
slower)."""

_LINE: Final = re.compile(
    # Exactly one entry line of an export (no leading zeros, at most 19 digits so int() is
    # cheap and bounded; the stored hash as lower-case hex, as the chain produces it).
    rb'^\{"seq":([1-9][0-9]{0,18}),"entry_hash":"([0-9a-f]{64})","body":(.*)\}$',
    re.MULTILINE,
)
_LEAF: Final = b"\x00"  # RFC 9162 §2.1.1 leaf and node prefixes
_NODE: Final = b"\x01"
_MAX_LEVEL: Final = 64


class RangeScan:
    """What a range contributes, when ``ok``.

    ``first`` is the range's first entry (seq, body, stored hash): its chain link to the entry
    before the range is the parent's to check. ``nodes`` are (level, root) of perfect subtrees
    covering leaves ``first seq - 1 .. last_seq - 1`` in order, cut at every mark in between.
    (A plain class: importing dataclasses would double a worker's start-up time.)
    """

    __slots__ = ("first", "last_hash", "last_seq", "nodes", "ok")

    def __init__(
        self,
        ok: bool,
        first: tuple[int, bytes, bytes] | None = None,
        last_seq: int = 0,
        last_hash: bytes = b"",
        nodes: list[tuple[int, bytes]] | None = None,
    ) -> None:
        """A range's outcome; ``RangeScan(ok=False)`` is "not confirmed"."""
        self.ok = ok
        self.first = first
        self.last_seq = last_seq
        self.last_hash = last_hash
        self.nodes: list[tuple[int, bytes]] = [] if nodes is None else nodes

    def _fields(self) -> tuple[object, ...]:
        return (self.ok, self.first, self.last_seq, self.last_hash, self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeScan) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like a dataclass with eq


def _chunks(fd: int, lo: int, hi: int, size: int) -> Iterator[bytes | None]:
    """Bytes ``lo..hi`` of ``fd`` in pieces ending at a newline (the last may not);
    None if the file ended early (it changed under us)."""
    pos, rest = lo, b""
    while pos < hi:
        data = os.pread(fd, min(size, hi - pos), pos)
        if not data:
            yield None
            return
        pos += len(data)
        if rest:
            data = rest + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a chunk: keep reading
            rest = data
            continue
        rest = data[cut:]
        yield data[:cut] if rest else data
    if rest:
        yield rest


def _perfect_root(hashes: list[bytes]) -> bytes:
    """MTH of a power-of-two count of subtree roots, one level at a time."""
    sha256 = hashlib.sha256
    while len(hashes) > 1:
        pairs = iter(hashes)  # zipped with itself: (h0, h1), (h2, h3), ...
        hashes = [sha256(_NODE + a + b).digest() for a, b in zip(pairs, pairs, strict=True)]
    return hashes[0]


def _cover(
    leaves: list[bytes], base: int, cuts: Sequence[int], out: list[tuple[int, bytes]]
) -> None:
    """Append the aligned perfect subtrees covering leaves ``base .. base+len-1`` to ``out``,
    piece by piece between ``cuts`` (each strictly inside the span)."""
    i = base
    for stop in (*cuts, base + len(leaves)):
        while i < stop:
            # The largest subtree starting at i is limited by i's alignment and by the stop.
            size = i & -i or 1 << _MAX_LEVEL
            while size > stop - i:
                size >>= 1
            out.append((size.bit_length() - 1, _perfect_root(leaves[i - base : i - base + size])))
            i += size


def scan_range(
    fd: int, lo: int, hi: int, marks: Sequence[int], chunk_bytes: int = CHUNK_BYTES
) -> RangeScan:
    """Scan export lines in bytes ``lo..hi`` of ``fd`` (``lo`` at a line start, ``hi`` at a
    line start or the end of the file); ``marks`` are the checkpoint sizes, sorted."""
    sha256 = hashlib.sha256
    scan = RangeScan(ok=False)
    prev: bytes | None = None
    expected = 0
    for data in _chunks(fd, lo, hi, max(1, chunk_bytes)):
        if data is None or not data.endswith(b"\n"):
            return RangeScan(ok=False)
        matches = _LINE.findall(data)
        if len(matches) != data.count(b"\n"):
            return RangeScan(ok=False)
        seqs, hashes, bodies = zip(*matches, strict=True)
        first = int(seqs[0])
        n = len(seqs)
        if (prev is not None and first != expected) or list(map(int, seqs)) != list(
            range(first, first + n)
        ):
            return RangeScan(ok=False)
        if prev is None:  # the range's first line: its link is checked by the parent
            scan.first = (first, bodies[0], hashes[0])
            links = zip(hashes[:-1], bodies[1:], strict=True)
            stored = b"".join(hashes[1:])
        else:
            links = zip((prev, *hashes[:-1]), bodies, strict=True)
            stored = b"".join(hashes)
        # One join and compare for the chunk: every hexdigest is 64 characters, so equal
        # concatenations mean every link holds.
        if "".join([sha256(p + b).hexdigest() for p, b in links]).encode("ascii") != stored:
            return RangeScan(ok=False)
        leaves = [sha256(_LEAF + b).digest() for b in bodies]
        cuts = marks[bisect_right(marks, first - 1) : bisect_right(marks, first + n - 2)]
        _cover(leaves, first - 1, cuts, scan.nodes)
        prev, expected = hashes[-1], first + n
    if prev is None:  # nothing in the range
        return RangeScan(ok=False)
    scan.ok, scan.last_seq, scan.last_hash = True, expected - 1, prev
    return scan


def to_wire(scan: RangeScan) -> dict[str, object]:
    """A scan as JSON-ready data."""
    if not scan.ok or scan.first is None:
        return {"ok": False}
    seq, body, stored = scan.first
    return {
        "ok": True,
        "first": [seq, body.hex(), stored.decode("ascii")],
        "last_seq": scan.last_seq,
        "last_hash": scan.last_hash.decode("ascii"),
        "nodes": [[level, h.hex()] for level, h in scan.nodes],
    }


def from_wire(data: Any) -> RangeScan:
    """Read :func:`to_wire` data; anything unexpected is a range that is not ok."""
    try:
        if data.get("ok") is not True:
            return RangeScan(ok=False)
        seq, body, stored = data["first"]
        return RangeScan(
            ok=True,
            first=(int(seq), bytes.fromhex(body), str(stored).encode("ascii")),
            last_seq=int(data["last_seq"]),
            last_hash=str(data["last_hash"]).encode("ascii"),
            nodes=[(int(level), bytes.fromhex(h)) for level, h in data["nodes"]],
        )
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeError):
        return RangeScan(ok=False)


def read_message(line: bytes) -> tuple[int, RangeScan | None]:
    """A worker's stdout line: (range, None) when it starts a range, (range, scan) when done.
    ValueError if the line is not a message (the worker is then treated as dead)."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a worker message")
    if type(data.get("claim")) is int:
        return data["claim"], None
    if type(data.get("done")) is int:
        return data["done"], from_wire(data.get("scan"))
    raise ValueError("not a worker message")


def main() -> int:
    """Worker process. The job, as JSON on stdin: ``fd``, ``marks``, ``chunk`` and ``ranges``
    (``[index, lo, hi]`` in the order to scan them). Before scanning a range it says so
    (``{"claim": index}``), so the parent, who scans unclaimed ranges itself, need not wait
    for a slow worker; then it sends the result (``{"done": index, "scan": ...}``)."""
    job = json.loads(sys.stdin.buffer.read())
    fd, marks, chunk = int(job["fd"]), list(job["marks"]), int(job["chunk"])
    for index, lo, hi in job["ranges"]:
        print(json.dumps({"claim": index}), flush=True)
        scan = scan_range(fd, int(lo), int(hi), marks, chunk)
        print(json.dumps({"done": index, "scan": to_wire(scan)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
