"""Verify a large audit export on several cores, with exactly the sequential verdicts.

:func:`check_export` is what :func:`broker.audit_export.verify_export` calls once the header
and checkpoints are read. A small export is walked sequentially
(:func:`broker.audit_verify.check_entries`). A large one is cut into byte ranges at line
starts, one per process: the parent scans the first range itself while ``python -I -S``
worker processes scan the others (:mod:`broker.audit_verify_worker`, reading the parent's file
descriptor). Then the parent, in file order, joins each range to what came before: the first
entry's sequence number and chain link, and the range's subtree roots appended to the Merkle
frontier, comparing the root with each signed checkpoint as its size is reached. That is
O(log n) hashes per chunk instead of a hash per entry.

The parallel path only ever confirms. The first range that is not confirmed (a worker found
something odd, a link or a root does not match, a worker died) is re-walked, with the exact
sequential checker and the state the walk would have had there (:class:`Progress`), to the
end of the file; so code, first bad index, entry count, message and notes are always the
sequential ones, and a worker that fails cannot make a bad log pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from itertools import pairwise
from typing import BinaryIO, Final

from broker import audit_verify_worker as worker
from broker.audit_verify import (
    Entry,
    IntegrityReport,
    Plan,
    Progress,
    finish,
    plan,
    resume_entries,
)
from broker.checkpoint import Checkpoint

# Module settings, read at each call (tests lower them to force the parallel path).
MIN_PARALLEL_BYTES = 1 << 20
"""Below this many bytes of entries the plain sequential walk is used."""
MIN_RANGE_BYTES = 16 << 20
"""Each worker process gets at least this much (~20 000 entries): starting one costs tens of
milliseconds, so smaller ranges are not worth a process."""
CHUNK_BYTES = worker.CHUNK_BYTES
PROCESSES: int | None = None
"""Processes to use, the parent included; None: the CPUs available (at most 8). 1 is the
plain sequential walk (what the benchmark compares with)."""
MAX_PROCESSES: Final = 8

Parse = Callable[[Iterator[bytes], int], Iterator[Entry]]
"""``parse(lines, first_line_number)``: the exact line parser of the sequential path."""


def default_processes() -> int:
    """:data:`PROCESSES`, or the CPUs this process may run on (at most :data:`MAX_PROCESSES`)."""
    if PROCESSES is not None:
        return max(1, PROCESSES)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_PROCESSES))


def split_points(fd: int, lo: int, hi: int, parts: int) -> list[int]:
    """Cut bytes ``lo..hi`` of ``fd`` into at most ``parts`` ranges at line starts; returns
    the boundaries ``[lo, ..., hi]`` (strictly increasing)."""
    points = [lo]
    for k in range(1, parts):
        cut = _line_start(fd, lo + (hi - lo) * k // parts, hi)
        if cut > points[-1] and cut < hi:
            points.append(cut)
    points.append(hi)
    return points


def _line_start(fd: int, pos: int, hi: int) -> int:
    """The first line start at or after ``pos`` (``pos - 1`` is looked at), or ``hi``."""
    pos -= 1
    while pos < hi:
        window = os.pread(fd, min(1 << 16, hi - pos), pos)
        if not window:
            return hi
        newline = window.find(b"\n")
        if newline >= 0:
            return pos + newline + 1
        pos += len(window)
    return hi


def check_export(
    f: BinaryIO,
    heads: Sequence[Checkpoint],
    parse: Parse,
    *,
    start: int,
    prev_hash: bytes,
    frontier: Sequence[bytes],
    expected_last: int | None,
) -> IntegrityReport:
    """Verify the entry lines of ``f`` from its current position to the end of the file.

    Same arguments and the very same report as ``check_entries(parse(iter(f), 2), heads,
    start=..., ...)``. The module settings above decide how many processes are worth
    starting, at most :func:`default_processes`.
    """
    prepared = plan(heads, start, prev_hash, frontier)
    if isinstance(prepared, IntegrityReport):
        return prepared
    the_plan, progress = prepared
    fd = f.fileno()
    info = os.fstat(fd)
    # A pipe (``--export <(zcat ...)``) can only be read once, front to back.
    lo, hi = (f.tell(), info.st_size) if stat.S_ISREG(info.st_mode) else (0, 0)
    chunk_bytes = CHUNK_BYTES
    parts = min(default_processes(), (hi - lo) // max(1, MIN_RANGE_BYTES))
    if hi - lo < MIN_PARALLEL_BYTES or parts < 2:
        return resume_entries(parse(iter(f), 2), the_plan, progress, expected_last=expected_last)
    points = split_points(fd, lo, hi, parts)
    marks = sorted(s for s in the_plan.roots if s >= start)
    children: list[subprocess.Popen[bytes] | None] = [None]
    try:
        ranges = list(pairwise(points))
        children += [_spawn(fd, a, b, marks, chunk_bytes) for a, b in ranges[1:]]
        for number, (a, b) in enumerate(ranges):
            child = children[number]
            if child is None:
                scan = worker.scan_range(fd, a, b, marks, chunk_bytes)
            else:
                scan = _collect(child)
            joined = _join(scan, the_plan, progress)
            if joined is None:
                _stop(children)
                f.seek(a)
                first_line = 2 + progress.position - start + 1
                entries = parse(iter(f), first_line)
                return resume_entries(entries, the_plan, progress, expected_last=expected_last)
            progress = joined
    finally:
        _stop(children)
    return finish(the_plan, progress.position, progress.good, expected_last)


def _join(scan: worker.RangeScan, the_plan: Plan, progress: Progress) -> Progress | None:
    """``progress`` extended by a scanned range, or None if the range is not confirmed."""
    if not scan.ok or scan.first is None:
        return None
    seq, body, stored = scan.first
    if seq != progress.position + 1:
        return None
    if hashlib.sha256(progress.prev_hash + body).hexdigest().encode("ascii") != stored:
        return None
    roots, good = the_plan.roots, progress.good
    stack, size = list(progress.frontier), progress.position
    for level, node in scan.nodes:
        # The worker's nodes are trusted only as far as they fit: aligned, in order, adding
        # up to exactly the range's entries.
        if not 0 <= level < 64 or size % (1 << level) or len(node) != 32:
            return None
        h, index = node, size >> level
        while index & 1:  # carry, as CompactRange.append does at level 0
            h = hashlib.sha256(b"\x01" + stack.pop() + h).digest()
            index >>= 1
        stack.append(h)
        size += 1 << level
        if size in roots:
            if _fold(stack) != roots[size]:
                return None  # the sequential walk names it (REWRITTEN, with its `good`)
            good = size
    if size != scan.last_seq or size < seq:
        return None
    return Progress(size, scan.last_hash, tuple(stack), good)


def _fold(stack: Sequence[bytes]) -> bytes:
    r = stack[-1]
    for h in reversed(stack[:-1]):
        r = hashlib.sha256(b"\x01" + h + r).digest()
    return r


def _spawn(
    fd: int, lo: int, hi: int, marks: list[int], chunk_bytes: int
) -> subprocess.Popen[bytes] | None:
    """A worker process scanning bytes ``lo..hi``; None if none could be started (the
    parent then scans the range itself)."""
    if not sys.executable or not os.path.isfile(worker.__file__):
        return None
    job = json.dumps({"fd": fd, "lo": lo, "hi": hi, "marks": marks, "chunk": chunk_bytes})
    try:
        # -I -S: no environment variables, user site or site-packages; the worker needs only
        # the standard library, and nothing from the environment can run code in it.
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", worker.__file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
        )
    except OSError:
        return None
    assert child.stdin is not None
    try:
        child.stdin.write(job.encode())
        child.stdin.close()
    except OSError:  # it died at once; _collect reports the range as not confirmed
        pass
    return child


def _collect(child: subprocess.Popen[bytes]) -> worker.RangeScan:
    assert child.stdout is not None
    with child.stdout:
        out = child.stdout.read()
    if child.wait() != 0:
        return worker.RangeScan(ok=False)
    return worker.from_json(out)


def _stop(children: list[subprocess.Popen[bytes] | None]) -> None:
    """End and reap every worker still running (after a fallback, or on an exception)."""
    for child in children:
        if child is None:
            continue
        if child.returncode is None:
            with suppress(OSError):
                child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
