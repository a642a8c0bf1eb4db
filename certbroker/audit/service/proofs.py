"""The proof half of the Audit service: checkpoints, inclusion and consistency proofs, export.

:class:`certbroker.audit.service.servicer.AuditService` gates and audits every call; the functions
here check
a request against the log's state and compute the answer. Request checks come in two steps:
the request alone (``*_request``, no I/O, also run for refused callers so their entry says what
was asked) and then the log (``resolve_*``, blocking, run in a worker thread). Both raise
:class:`~certbroker.errors.BrokerError` with these reasons:

==========================  ==================  ============================================
reason                      status              when
==========================  ==================  ============================================
``NO_CHECKPOINT``           NOT_FOUND           no checkpoint signed yet, and the request
                                                defaults to the latest one
``ENTRY_NOT_FOUND``         NOT_FOUND           no entry has that ``entry_id``
``ENTRY_ARCHIVED``          NOT_FOUND           the entry (or the end of ``old_size``) is
                                                archived, a node its proof needs was not
                                                kept, and its archive file is not readable
                                                here (missing, encrypted)
``BAD_ENTRY_ID``            INVALID_ARGUMENT    ``entry_id`` is not 32 lowercase hex digits
``AMBIGUOUS_ENTRY``         INVALID_ARGUMENT    both ``entry_id`` and ``sequence`` given
``BAD_SEQUENCE``            INVALID_ARGUMENT    sequence < 1, or beyond the proof's tree
``BAD_TREE_SIZE``           INVALID_ARGUMENT    a size < 0, or beyond the stored log
``BAD_SIZE_RANGE``          INVALID_ARGUMENT    consistency ``old_size > new_size``
``BAD_SEQUENCE_RANGE``      INVALID_ARGUMENT    export bounds < 0, ``from > to``, beyond the
                                                log, or ``from`` in the archived entries
==========================  ==================  ============================================

Sizes given as 0 mean "the latest checkpoint's size" (``tree_size``, ``new_size``,
``to_sequence``), so an auditor holding that checkpoint can check the answer against it;
``from_sequence`` 0 means the first live entry (1, or the one after the archived ones).
The log only grows, so a request checked against the state read here stays answerable.

``db`` is the audit log's location, passed through unchanged to
:mod:`certbroker.audit.integrity.proofs`
and :mod:`certbroker.audit.export`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Final, cast

from google.protobuf import timestamp_pb2

from certbroker import errors
from certbroker.audit import archived as archived_entries
from certbroker.audit.archive import archived_leaves
from certbroker.audit.export import export
from certbroker.audit.integrity.proofs import (
    CheckpointSigner,
    StoredCheckpoint,
    consistency_proof,
    inclusion_proof,
    latest_checkpoint,
    sign_checkpoint,
    tree_size,
)
from certbroker.audit.service.messages import unsearched_message
from certbroker.audit.store.db import connect_read
from certbroker.audit.store.rows import archived_head, select_rows
from certbroker.config import AuditLocation
from certbroker.v1 import audit_pb2

AuditDB = AuditLocation
"""Where the audit log lives (what the server passes as the service's ``db``)."""

CHUNK_SIZE: Final = 64 * 1024
"""Bytes per ``ExportChunk``: well under gRPC's 4 MiB message limit, few messages per MB."""
CHUNKS_AHEAD: Final = 4
"""Chunks the export thread may read ahead of the client: bounds an export's memory."""
_ENTRY_ID: Final = re.compile(r"[0-9a-f]{32}")


def _invalid(reason: str, message: str, argument: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(reason, message, argument=argument)


def _no_checkpoint() -> errors.NotFound:
    return errors.NotFound(
        "NO_CHECKPOINT", "no checkpoint has been signed yet (ask for a fresh one)"
    )


# --- the log's state --------------------------------------------------------------------------


@dataclass(frozen=True)
class LogState:
    """The newest checkpoint (or None), the number of entries the stored tree covers and the
    last archived sequence (0 if none: the live log starts after it)."""

    checkpoint: StoredCheckpoint | None
    size: int
    archived: int = 0

    def default_size(self, given: int) -> int:
        """``given``, or the latest checkpoint's size when it is 0."""
        if given:
            return given
        if self.checkpoint is None:
            raise _no_checkpoint()
        return self.checkpoint.size


def read_state(db: AuditDB) -> LogState:
    """Blocking. The checkpoint is read first: it never covers more than the tree read after."""
    latest = latest_checkpoint(db)
    with closing(connect_read(db)) as conn:
        archived, _ = archived_head(conn)
    return LogState(latest, tree_size(db), archived)


def _within(state: LogState, size: int, argument: str) -> int:
    if size > state.size:
        raise _invalid(
            "BAD_TREE_SIZE", f"{argument} is beyond the log ({state.size} entries)", argument
        )
    return size


def checkpoint_message(stored: StoredCheckpoint) -> audit_pb2.Checkpoint:
    """A stored checkpoint as the contract's message (the note is what auditors verify)."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(stored.time))
    return audit_pb2.Checkpoint(
        size=stored.size, root_hash=stored.root_hash, time=stamp, note=stored.note
    )


def get_checkpoint(db: AuditDB, signer: CheckpointSigner, fresh: bool) -> audit_pb2.Checkpoint:
    """Blocking. Sign one now (``fresh``) or return the latest; NOT_FOUND if there is none."""
    stored = sign_checkpoint(db, signer) if fresh else latest_checkpoint(db)
    if stored is None:
        raise _no_checkpoint()
    return checkpoint_message(stored)


# --- inclusion --------------------------------------------------------------------------------


@dataclass(frozen=True)
class InclusionQuery:
    """An inclusion proof request that passed the checks needing no log."""

    entry_id: str
    sequence: int
    tree_size: int


def inclusion_request(request: audit_pb2.InclusionProofRequest) -> InclusionQuery:
    """Either a well-formed ``entry_id`` or a ``sequence`` >= 1; ``tree_size`` >= 0."""
    if request.entry_id and request.sequence:
        raise _invalid("AMBIGUOUS_ENTRY", "give entry_id or sequence, not both", "entry_id")
    if request.entry_id:
        if not _ENTRY_ID.fullmatch(request.entry_id):
            raise _invalid("BAD_ENTRY_ID", "entry_id is not 32 lowercase hex digits", "entry_id")
    elif request.sequence < 1:
        raise _invalid("BAD_SEQUENCE", "sequence must be at least 1 (or give entry_id)", "sequence")
    if request.tree_size < 0:
        raise _invalid("BAD_TREE_SIZE", "tree_size must not be negative", "tree_size")
    return InclusionQuery(request.entry_id, request.sequence, request.tree_size)


def sequence_of(db: AuditDB, entry_id: str) -> int | None:
    """Blocking. The sequence number of the entry with ``entry_id`` (an indexed column)."""
    # The proof modules have no lookup by entry id; this is the one place that reads the
    # store directly, through the read-only connection and store.rows' indexed select.
    with closing(connect_read(db)) as conn:
        rows = select_rows(conn, equals={"entry_id": entry_id}, since=None, until=None, limit=1)
    return rows[0].seq if rows else None


def resolve_inclusion(
    db: AuditDB, query: InclusionQuery, archive_dir: Path | None = None
) -> audit_pb2.InclusionProof:
    """Blocking. The proof of the entry in the tree of ``tree_size`` (0: latest checkpoint).

    An archived entry is found by its ``sequence`` (``entry_id`` looks in the live log only);
    the nodes of archived compact entries that nobody stored come from their archive file
    in ``archive_dir`` (:func:`certbroker.audit.archive.archived_leaves`), and so do its body
    and previous hash (``archived``: the Export serves live entries only), or why the file
    could not be used."""
    state = read_state(db)
    size = _within(state, state.default_size(query.tree_size), "tree_size")
    sequence = query.sequence
    if query.entry_id:
        found = sequence_of(db, query.entry_id)
        if found is None:
            where = "no audit entry has this entry_id"
            if state.archived:  # ids are looked up in the live log, not in the archive files
                where = (
                    f"no live audit entry has this entry_id (entries 1..{state.archived} are "
                    "archived: ask for an archived entry by its sequence)"
                )
            raise errors.NotFound("ENTRY_NOT_FOUND", where, argument="entry_id")
        sequence = found
    if sequence > size:
        raise _invalid(
            "BAD_SEQUENCE", f"entry {sequence} is not in the tree of size {size}", "sequence"
        )
    archived = None if archive_dir is None else archived_leaves(db, archive_dir)
    try:
        leaf, path = inclusion_proof(db, sequence, size, archived=archived)
    except KeyError:
        raise errors.NotFound(
            "ENTRY_ARCHIVED",
            f"entry {sequence} is archived and its archive file cannot be read here: "
            "prove it from the file (certbroker audit verify --with-archives checks it)",
            argument="sequence",
        ) from None
    proof = audit_pb2.InclusionProof(
        leaf_index=sequence - 1, tree_size=size, hashes=path, leaf_hash=leaf
    )
    if sequence <= state.archived and archive_dir is not None:
        try:
            proof.archived.body, proof.archived.prev_hash = archived_entries.entry_at(
                db, archive_dir, sequence
            )
        except archived_entries.ArchiveUnreadable as exc:
            unsearched_message(exc.gap, proof.archived.unreadable)
        except KeyError:  # archived after the state was read: not in the records read then
            pass
    return proof


# --- consistency ------------------------------------------------------------------------------


def consistency_request(request: audit_pb2.ConsistencyProofRequest) -> tuple[int, int]:
    """(old_size, new_size), both >= 0; new 0 = the latest checkpoint's size."""
    for name in ("old_size", "new_size"):
        if getattr(request, name) < 0:
            raise _invalid("BAD_TREE_SIZE", f"{name} must not be negative", name)
    if request.new_size and request.old_size > request.new_size:
        raise _invalid("BAD_SIZE_RANGE", "old_size must not exceed new_size", "old_size")
    return request.old_size, request.new_size


def resolve_consistency(
    db: AuditDB, old: int, new: int, archive_dir: Path | None = None
) -> audit_pb2.ConsistencyProof:
    """Blocking. RFC 9162 proof that the tree of ``old`` entries is a prefix of ``new``'s
    (archived nodes nobody stored from the archive files in ``archive_dir``)."""
    state = read_state(db)
    new = _within(state, state.default_size(new), "new_size")
    if old > new:
        raise _invalid("BAD_SIZE_RANGE", "old_size must not exceed new_size", "old_size")
    archived = None if archive_dir is None else archived_leaves(db, archive_dir)
    try:
        hashes = consistency_proof(db, old, new, archived=archived)
    except KeyError:
        raise errors.NotFound(
            "ENTRY_ARCHIVED",
            f"the tree of {old} entries ends in archived entries whose archive file cannot be "
            "read here",
            argument="old_size",
        ) from None
    return audit_pb2.ConsistencyProof(old_size=old, new_size=new, hashes=hashes)


# --- export -----------------------------------------------------------------------------------


def export_request(request: audit_pb2.ExportRequest) -> tuple[int, int]:
    """(first, last) as asked: first 0 = the first live entry, last 0 = the latest
    checkpoint's size."""
    first, last = request.from_sequence, request.to_sequence
    if first < 0 or last < 0:
        raise _invalid(
            "BAD_SEQUENCE_RANGE", "from_sequence and to_sequence must not be negative", "range"
        )
    if first and last and first > last:
        raise _invalid(
            "BAD_SEQUENCE_RANGE", "from_sequence must not exceed to_sequence", "from_sequence"
        )
    return first, last


def resolve_export(db: AuditDB, first: int, last: int) -> tuple[int, int]:
    """Blocking. The range to export, checked against the log: from the first live entry
    (``first`` 0), to the latest checkpoint (``last`` 0)."""
    state = read_state(db)
    # Archived entries are in the archive files, not the live log: an export starts after them.
    if first and first <= state.archived:
        raise _invalid(
            "BAD_SEQUENCE_RANGE",
            f"entries 1..{state.archived} are archived: from_sequence must be at least "
            f"{state.archived + 1}",
            "from_sequence",
        )
    first = first or state.archived + 1
    last = state.default_size(last)
    if last > state.size:
        raise _invalid(
            "BAD_SEQUENCE_RANGE", f"to_sequence is beyond the log ({state.size})", "to_sequence"
        )
    if first > last:
        raise _invalid(
            "BAD_SEQUENCE_RANGE", f"from_sequence is beyond to_sequence ({last})", "from_sequence"
        )
    return first, last


class _Abandoned(Exception):
    """The client went away: the export thread stops writing."""


class _Pipe:
    """A write-only file for :func:`certbroker.audit.export.export` in a worker thread that hands
    fixed-size chunks to the event loop, at most ``ahead`` chunks before the reader takes them.

    The thread blocks on ``slots`` when the client is slow, so an export of any size holds about
    ``(ahead + 1) * chunk_size`` bytes in memory.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, chunk_size: int, ahead: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.slots = threading.Semaphore(ahead)
        self._loop = loop
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self._abandoned = False

    def write(self, data: bytes) -> int:
        """Thread side: buffer ``data``; hand over every full chunk."""
        self._buffer += data
        while len(self._buffer) >= self._chunk_size:
            self._send(bytes(self._buffer[: self._chunk_size]))
            del self._buffer[: self._chunk_size]
        return len(data)

    def _send(self, chunk: bytes) -> None:
        self.slots.acquire()
        if self._abandoned:
            raise _Abandoned
        self._loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def run(self, db: AuditDB, first: int, last: int) -> None:
        """Thread side: the whole export, then the end marker (also after a failure)."""
        try:
            export(db, cast(IO[bytes], self), first, last)
            if self._buffer:
                self._send(bytes(self._buffer))
        except _Abandoned:
            pass
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self.queue.put_nowait, None)

    def abandon(self) -> None:
        """Loop side: make the thread stop at its next chunk (and wake it if it waits)."""
        self._abandoned = True
        self.slots.release()


def _retrieve(task: asyncio.Future[None]) -> None:
    # An export abandoned by its client may still fail afterwards; nobody is left to tell.
    if not task.cancelled():
        task.exception()


async def export_chunks(
    db: AuditDB,
    first: int,
    last: int,
    *,
    chunk_size: int = CHUNK_SIZE,
    ahead: int = CHUNKS_AHEAD,
) -> AsyncIterator[bytes]:
    """The export file of entries ``first..last`` (:mod:`certbroker.audit.export`), in chunks.

    The export runs in a worker thread over one read snapshot; a failure is raised after the
    chunks already produced.
    """
    pipe = _Pipe(asyncio.get_running_loop(), chunk_size, ahead)
    task = asyncio.ensure_future(asyncio.to_thread(pipe.run, db, first, last))
    task.add_done_callback(_retrieve)
    try:
        while (chunk := await pipe.queue.get()) is not None:
            yield chunk
            pipe.slots.release()
        await task
    finally:
        pipe.abandon()
