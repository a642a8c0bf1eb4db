"""Verify a large audit export on several cores, with exactly the sequential verdicts.

:func:`check_export` is what :func:`certbroker.audit.export.verify_export` calls once the header
and checkpoints are read. A small export is walked sequentially
(:func:`certbroker.audit.verify.report.check_entries`). A large one is cut into byte ranges of a
few MiB
at line starts, scanned by :func:`certbroker.audit.verify.worker.scan_range` in the parent and in
``python -I -S`` worker processes that read the parent's file descriptor.

Who scans what is decided as it goes, so a worker that starts late or gets little CPU (a busy
machine) never makes the parent wait idle: each worker takes a segment of ranges and works
through it from the end, announcing each range before it starts it; the parent sweeps forward
from the first range and scans every range no worker has announced. Meanwhile it joins the
results in file order: each range's first entry must follow on (sequence number, chain link)
from the previous range's last, and the range's subtree roots are appended to the Merkle
frontier, the root compared with each signed checkpoint as its size is reached: O(log n)
hashes per range instead of one per entry.

The parallel path only ever confirms. The first range that is not confirmed (a worker found
something odd, a link or a root does not match) is re-walked, with the exact sequential
checker and the state the walk would have had there (:class:`Progress`), to the end of the
file; so code, first bad index, entry count, message and notes are always the sequential ones.
A worker that dies or talks nonsense is ignored and its ranges are scanned by the parent.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from itertools import pairwise
from typing import BinaryIO, Final

from certbroker.audit.integrity.checkpoint import Checkpoint
from certbroker.audit.verify import worker
from certbroker.audit.verify.report import (
    Entry,
    IntegrityReport,
    Plan,
    Progress,
    finish,
    frontier_root,
    plan,
    resume_entries,
)

# Module settings, read at each call (tests lower them to force the parallel path).
MIN_PARALLEL_BYTES = 8 << 20
"""Below this many bytes of entries (~10 000) the plain sequential walk is used: starting a
worker process costs tens of milliseconds."""
RANGE_BYTES = 4 << 20
"""The unit of work handed out (~5 000 entries): small enough to balance, big enough that
the per-range messages and joins cost nothing."""
CHUNK_BYTES = worker.CHUNK_BYTES
PROCESSES: int | None = None
"""Processes to use, the parent included; None: the CPUs available (at most 8). 1 is the
plain sequential walk (what the benchmark compares with)."""
MAX_PROCESSES: Final = 8
MAX_RANGES: Final = 1024
"""Bookkeeping is O(ranges) per range, so a huge export gets larger ranges instead."""
STEAL = True
"""The parent scans every range no worker has started. False (tests of the workers): it
leaves each live worker its whole segment."""
STALL_S = 60.0
"""A worker silent this long (a range takes milliseconds) is given up on."""

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
    start=..., ...)``. The module settings above decide whether processes are worth starting.
    """
    prepared = plan(heads, start, prev_hash, frontier)
    if isinstance(prepared, IntegrityReport):
        return prepared
    the_plan, progress = prepared
    fd = f.fileno()
    info = os.fstat(fd)
    # A pipe (``--export <(zcat ...)``) can only be read once, front to back.
    lo, hi = (f.tell(), info.st_size) if stat.S_ISREG(info.st_mode) else (0, 0)
    processes = default_processes()
    if hi - lo < max(1, MIN_PARALLEL_BYTES) or processes < 2:
        return resume_entries(parse(iter(f), 2), the_plan, progress, expected_last=expected_last)
    parts = min((hi - lo) // max(1, RANGE_BYTES), MAX_RANGES)  # bigger ranges for huge files
    points = split_points(fd, lo, hi, max(1, parts))
    ranges = list(pairwise(points))
    marks = sorted(s for s in the_plan.roots if s >= start)
    children: list[_Child] = []
    try:
        children = _start_children(fd, ranges, marks, min(processes, len(ranges)))
        results: dict[int, worker.RangeScan] = {}
        for number, (a, _) in enumerate(ranges):
            while number not in results:
                _next(fd, ranges, marks, number, results, children)
            joined = _join(results.pop(number), the_plan, progress)
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


def _next(
    fd: int,
    ranges: list[tuple[int, int]],
    marks: list[int],
    wanted: int,
    results: dict[int, worker.RangeScan],
    children: list[_Child],
) -> None:
    """Make progress towards ``results[wanted]``: take in what workers said, then scan the
    first range nobody has (or, if every open range is being scanned, wait for a worker)."""
    _listen(children, results, wait=False)
    for child in children:  # met by the parent's sweep: the rest of its list is done already
        if child.alive and all(r < wanted or r in results for r in child.segment):
            child.retire()
    busy = {r for child in children if child.alive for r in child.started}
    if not STEAL:
        busy |= {r for child in children if child.alive for r in child.segment}
    todo = next((r for r in range(wanted, len(ranges)) if r not in results and r not in busy), None)
    if todo is not None:
        results[todo] = worker.scan_range(fd, *ranges[todo], marks, CHUNK_BYTES)
    else:
        _listen(children, results, wait=True)


class _Child:
    """A worker process, and what it has said: ranges started and not yet done."""

    def __init__(self, process: subprocess.Popen[bytes], segment: range) -> None:
        assert process.stdout is not None
        self.process = process
        self.stdout = process.stdout
        self.segment = segment
        self.started: set[int] = set()
        self.alive = True
        self._buffer = b""

    def retire(self) -> None:
        """Stop it: nothing it has left to do is needed (or it can no longer be trusted to
        answer); whatever it started and did not finish is the parent's."""
        self.alive = False
        with suppress(OSError):
            self.process.kill()

    def hear(self, results: dict[int, worker.RangeScan]) -> None:
        """Read what is waiting on its stdout (call when select says it is readable)."""
        data = os.read(self.stdout.fileno(), 1 << 16)
        if not data:  # exited
            self.retire()
            return
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        for line in lines:
            try:
                index, scan = worker.read_message(line)
            except ValueError:
                self.retire()
                return
            if scan is None:
                self.started.add(index)
            else:
                self.started.discard(index)
                results.setdefault(index, scan)


def _listen(children: list[_Child], results: dict[int, worker.RangeScan], *, wait: bool) -> None:
    """Take in the messages of every live worker; ``wait``: block until one says something
    (a worker silent for :data:`STALL_S` is stuck: retired, the parent takes its ranges)."""
    live = {child.stdout.fileno(): child for child in children if child.alive}
    if not live:
        return
    readable, _, _ = select.select(list(live), [], [], STALL_S if wait else 0)
    if wait and not readable:
        for child in live.values():
            child.retire()
    for fileno in readable:
        live[fileno].hear(results)


def _start_children(
    fd: int, ranges: list[tuple[int, int]], marks: list[int], processes: int
) -> list[_Child]:
    """One worker per segment but the first (the parent's); each scans its segment from the
    end, so the parent, sweeping forward, meets it wherever it has got to."""
    children = []
    bounds = [len(ranges) * k // processes for k in range(processes + 1)]
    for first, last in pairwise(bounds[1:]):
        todo = [[r, *ranges[r]] for r in reversed(range(first, last))]
        process = _spawn(fd, {"fd": fd, "ranges": todo, "marks": marks, "chunk": CHUNK_BYTES})
        if process is not None:
            children.append(_Child(process, range(first, last)))
    return children


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
            if frontier_root(stack) != roots[size]:
                return None  # the sequential walk names it (REWRITTEN, with its `good`)
            good = size
    if size != scan.last_seq or size < seq:
        return None
    return Progress(size, scan.last_hash, tuple(stack), good)


def _spawn(fd: int, job: dict[str, object]) -> subprocess.Popen[bytes] | None:
    """A worker process given ``job``; None if none could be started."""
    if not sys.executable or not os.path.isfile(worker.__file__):
        return None
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
    with suppress(OSError):  # if it died at once, its stdout ends and the parent takes over
        child.stdin.write(json.dumps(job).encode())
    with suppress(OSError):
        child.stdin.close()
    return child


def _stop(children: list[_Child]) -> None:
    """End and reap every worker (its remaining work, if any, is no longer needed)."""
    for child in children:
        if child.process.returncode is None:
            with suppress(OSError):
                child.process.kill()
            child.process.wait()
        child.stdout.close()
