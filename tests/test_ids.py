"""certbroker.ids: UUIDv7 hex ids from pooled randomness, never shared across a fork."""

from __future__ import annotations

import os
import time
import uuid

from certbroker import ids


def test_ids_are_uuid7_hex_carrying_the_time() -> None:
    before = time.time_ns() // 1_000_000
    drawn = [ids.new_id() for _ in range(3 * ids.BLOCK_IDS)]  # across several blocks
    after = time.time_ns() // 1_000_000
    for value in drawn:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert before <= parsed.int >> 80 <= after  # RFC 9562 §5.7: unix_ts_ms first


def test_ids_made_in_a_later_millisecond_sort_later() -> None:
    first = ids.new_id()
    time.sleep(0.002)
    assert ids.new_id() > first  # the entry_id index appends instead of scattering


def test_ids_do_not_repeat_and_their_random_bits_vary() -> None:
    drawn = [ids.new_id() for _ in range(20_000)]
    assert len(set(drawn)) == len(drawn)
    # Ids of one millisecond differ only in their 74 random bits: every one of them moves.
    mask = (1 << 76) - 1
    bits = [uuid.UUID(hex=v).int & mask for v in drawn[:2000]]
    varied = 0
    for bit in range(76):
        if bit in (62, 63):  # the variant
            continue
        if len({b >> bit & 1 for b in bits}) == 2:
            varied += 1
    assert varied == 74


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
