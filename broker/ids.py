"""Random identifiers on the fast path: UUID4s as 32 lowercase hex digits.

Every lookup mints two (its decision id and its audit entry id). ``uuid.uuid4().hex`` builds a
``UUID`` object and makes a ``getrandom`` system call per id; under load that call also hands
the GIL to another thread, which the event loop then waits to get back. Here the randomness
comes from ``os.urandom`` (the same CSPRNG) in blocks of :data:`BLOCK_IDS` ids, and each id is
formatted straight from its 16 bytes with the version and variant bits of RFC 9562 §5.4 set,
so ``uuid.UUID(hex=new_id()).version == 4``.

A forked child gets a fresh block (``os.register_at_fork``): parent and child never hand out
the same bytes. Thread-safe: one lock around taking the next 16 bytes.
"""

from __future__ import annotations

import os
import threading

#: Ids per ``os.urandom`` call (4 KiB of randomness).
BLOCK_IDS = 256
_ID_BYTES = 16
# RFC 9562: version 4 in the high nibble of byte 6, variant 10xx in the top bits of byte 8.
_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_SET = (0x4 << 76) | (0x2 << 62)

_lock = threading.Lock()
_block = b""
_offset = 0


def _reset() -> None:
    global _block, _offset
    _block, _offset = b"", 0


os.register_at_fork(after_in_child=_reset)


def new_id() -> str:
    """A random UUID4 as 32 lowercase hex digits (what ``uuid.uuid4().hex`` returns)."""
    global _block, _offset  # noqa: PLW0603 - module state, guarded by _lock
    with _lock:
        if _offset >= len(_block):
            _block, _offset = os.urandom(_ID_BYTES * BLOCK_IDS), 0
        start = _offset
        _offset = start + _ID_BYTES
        raw = _block[start : start + _ID_BYTES]
    return f"{int.from_bytes(raw) & _CLEAR | _SET:032x}"
