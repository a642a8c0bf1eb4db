"""broker.ids: UUID4 hex ids from pooled randomness, never shared across a fork."""

from __future__ import annotations

import os
import uuid

from broker import ids


def test_ids_are_uuid4_hex() -> None:
    for _ in range(3 * ids.BLOCK_IDS):  # across several blocks of randomness
        value = ids.new_id()
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat() -> None:
    drawn = [ids.new_id() for _ in range(20_000)]
    assert len(set(drawn)) == len(drawn)


def test_a_forked_child_does_not_continue_the_parents_block() -> None:
    """Without the at-fork reset, parent and child would hand out the same next id."""
    ids.new_id()  # a block is in use
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        try:
            os.write(write, ids.new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert len(child) == 32
    assert child != ids.new_id()
