"""Chain verification of a stored audit log (:func:`verify`), on either backend.

It needs no event model: it recomputes the hash chain over the stored rows
(:func:`certbroker.audit.store.rows.check_chain`). :func:`certbroker.audit.export.verify_db`
adds the Merkle tree and signed checkpoints on top.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

from certbroker.audit.store.db import backend_for
from certbroker.audit.store.rows import archived_head, check_chain, iter_rows
from certbroker.config import AuditLocation
from certbroker.errors import BrokerError


@dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`.

    ``first_bad`` is the sequence (1-based position) of the first entry that fails; ``problem``
    says why ("" when intact). ``head_hash`` is the last entry's hash when intact (compare it
    with a receipt kept elsewhere to catch a cut tail), else "". ``entries`` counts the live
    entries checked; ``archived`` the ones before them that were moved to archive files.
    """

    ok: bool
    entries: int
    first_bad: int | None
    problem: str
    head_hash: str = ""
    archived: int = 0


def verify(db: AuditLocation) -> VerifyReport:
    """Recompute the whole chain of the live log at ``db``; opens it read-only.

    After archival the check starts at the first live entry, chaining from the last archived
    hash. Raises ``FileNotFoundError`` if there is no log (and ``Unavailable`` if PostgreSQL
    cannot be reached); an unreadable database is reported as not ok with ``first_bad=None``.
    """
    try:
        backend = backend_for(db)
        with closing(backend.connect_read()) as conn:
            backend.snapshot(conn)
            archived, prev = archived_head(conn)
            rows = iter_rows(conn, archived)
            result = check_chain(rows, start=archived + 1, prev_hash=prev)
    except (FileNotFoundError, BrokerError):
        raise
    except Exception as exc:  # noqa: BLE001 - database errors, or tampered values of any type
        return VerifyReport(False, 0, None, f"audit log unreadable: {exc}")
    return VerifyReport(
        ok=result.first_bad is None,
        entries=result.entries,
        first_bad=result.first_bad,
        problem=result.problem,
        head_hash=result.head_hash,
        archived=archived,
    )
