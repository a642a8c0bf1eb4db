"""Identifiers on the fast path: UUIDv7s (RFC 9562 §5.7) as 32 lowercase hex digits.

Every lookup mints two (its decision id and its audit entry id). Version 7, not 4: the first
48 bits are the Unix time in milliseconds, so ids made later sort later. The audit log keeps a
UNIQUE index on ``entry_id``; random ids put each entry of a batch on a different page of that
index, and every page a commit touches is one more page written to the WAL. Time-ordered ids
append to its last page (measured: a third less CPU per stored entry). The other 74 bits are
random, so an id is still unguessable; the time it reveals is already in the entry.

``uuid.uuid4()`` builds a ``UUID`` object and makes a ``getrandom`` system call per id; under
load that call also hands the GIL to another thread, which the event loop then waits to get
back. Here the randomness comes from ``os.urandom`` (the same CSPRNG) in blocks of
:data:`BLOCK_IDS` ids. A forked child gets a fresh block (``os.register_at_fork``): parent and
child never hand out the same bytes. Thread-safe: one lock around taking the next bytes.
"""

from __future__ import annotations

import os
import threading
import time

#: Ids per ``os.urandom`` call.
BLOCK_IDS = 256
_RANDOM_BYTES = 10  # 80 bits drawn (20 hex digits), 74 used
#: The variant digit (RFC 9562: bits 10xx) for each random hex digit: its two low bits kept.
_VARIANT_DIGIT = {f"{n:x}": f"{8 | n & 3:x}" for n in range(16)}

_lock = threading.Lock()
_tails: list[str] = []  # the ids' last 20 hex digits, made a block at a time
_offset = 0


def _reset() -> None:
    global _tails, _offset
    _tails, _offset = [], 0


os.register_at_fork(after_in_child=_reset)


def _make_tails() -> list[str]:
    """A block's worth of id tails: version 7, 12 random bits, the variant and 62 random bits,
    as 20 hex digits (the formatting done once per block, not per id)."""
    digits = os.urandom(_RANDOM_BYTES * BLOCK_IDS).hex()
    tails = []
    for start in range(0, len(digits), 2 * _RANDOM_BYTES):
        h = digits[start : start + 2 * _RANDOM_BYTES]
        tails.append(f"7{h[0:3]}{_VARIANT_DIGIT[h[3]]}{h[4:19]}")
    return tails


def new_id() -> str:
    """A UUIDv7 as 32 lowercase hex digits: time-ordered to the millisecond, 74 random bits."""
    global _tails, _offset  # noqa: PLW0603 - module state, guarded by _lock
    millis = time.time_ns() // 1_000_000
    with _lock:
        if _offset >= len(_tails):
            _tails, _offset = _make_tails(), 0
        tail = _tails[_offset]
        _offset += 1
    return f"{millis:012x}{tail}"
