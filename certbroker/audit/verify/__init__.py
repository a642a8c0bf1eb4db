"""Verifying the audit log: the hash chain alone, or chain + Merkle tree + signed checkpoints.

- :mod:`~certbroker.audit.verify.chain`: :func:`verify` recomputes the hash chain of a live log.
- :mod:`~certbroker.audit.verify.report`: the one streaming checker of entries against signed
  checkpoints, its :class:`IntegrityReport` and the problem codes (= ``audit verify`` exit
  codes).
- :mod:`~certbroker.audit.verify.parallel` and :mod:`~certbroker.audit.verify.worker`: the same
  verdicts for a large export, on several cores.

Exports and the live database are verified through :mod:`certbroker.audit.export`, which sits
on top of this package.
"""

from certbroker.audit.verify.chain import VerifyReport, verify
from certbroker.audit.verify.parallel import check_export
from certbroker.audit.verify.report import (
    BAD_CHECKPOINT,
    DELETED,
    EDITED,
    EXIT_CODES_HELP,
    INSERTED,
    MALFORMED,
    NAMES,
    OK,
    REORDERED,
    REWRITTEN,
    TRUNCATED,
    WRONG_KEY,
    IntegrityReport,
    check_entries,
)

__all__ = [
    "BAD_CHECKPOINT",
    "DELETED",
    "EDITED",
    "EXIT_CODES_HELP",
    "INSERTED",
    "MALFORMED",
    "NAMES",
    "OK",
    "REORDERED",
    "REWRITTEN",
    "TRUNCATED",
    "WRONG_KEY",
    "IntegrityReport",
    "VerifyReport",
    "check_entries",
    "check_export",
    "verify",
]
