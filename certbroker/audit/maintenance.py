"""The broker's periodic audit upkeep: signed checkpoints and, if configured, archival.

Kept apart from :mod:`certbroker.audit.integrity.proofs` (what it signs with) and
:mod:`certbroker.audit.archive` (what it archives with) because it uses both, and archival
itself signs checkpoints: the task sits on top, so neither needs the other's caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

from certbroker.audit.archive import archive_older_than
from certbroker.audit.integrity.proofs import (
    CheckpointSigner,
    latest_checkpoint,
    sign_checkpoint,
    tree_size,
)
from certbroker.config import ArchiveSchedule, AuditLocation

log = logging.getLogger(__name__)

#: How many times per interval a process that does not sign asks whether it may.
STANDBY_ASKS = 4


async def checkpoint_task(
    db: AuditLocation,
    signer: CheckpointSigner,
    interval_s: float,
    *,
    archive: ArchiveSchedule | None = None,
    may_sign: Callable[[], bool] | None = None,
) -> None:
    """Sign a checkpoint every ``interval_s`` seconds until cancelled; failures are logged.

    A new checkpoint is only signed when the tree grew (or none exists yet). With ``archive``
    (``[audit] archive_after_days``), old entries are also moved to archive files, at most
    every ``archive.every_s`` seconds (:mod:`certbroker.audit.archive`).

    ``may_sign`` (blocking, asked in a worker thread before each round) says whether this
    process signs now: of the brokers sharing one PostgreSQL log, only the holder of the
    signer's lease does (:mod:`certbroker.cluster.lease`); the others skip the round and ask
    again after a quarter of the interval.
    """
    last_archive = -math.inf
    # A process that may not be the signer asks early: it may be the one to take over.
    wait = interval_s if may_sign is None else interval_s / STANDBY_ASKS
    while True:
        await asyncio.sleep(wait)
        if may_sign is not None and not await asyncio.to_thread(may_sign):
            # A standby asks four times an interval, so that it takes over within one
            # interval of the signer's death whatever the phase of the two schedules.
            wait = interval_s / STANDBY_ASKS
            continue
        wait = interval_s
        try:
            latest = await asyncio.to_thread(latest_checkpoint, db)
            size = await asyncio.to_thread(tree_size, db)
            if latest is None or latest.size != size:
                await asyncio.to_thread(sign_checkpoint, db, signer)
        except Exception:
            log.exception("signing an audit checkpoint failed")
        if archive is not None and time.monotonic() - last_archive >= archive.every_s:
            last_archive = time.monotonic()
            try:
                await asyncio.to_thread(
                    archive_older_than,
                    db,
                    signer,
                    archive.directory,
                    archive.after_days,
                )
            except Exception:
                log.exception("archiving old audit entries failed")
