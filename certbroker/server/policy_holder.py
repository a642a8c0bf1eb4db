"""The policy set in force, and its audited reloads (SIGHUP, ``certbroker policy reload``).

Every reload attempt -- accepted or rejected -- is an entry in the audit log, written BEFORE a
new set takes effect: a reload whose entry cannot be written keeps the old set (no audit, no
change). A set that fails validation is never used. Entries reuse the lookup entry's fields::

    kind             "policy_reload"
    rule_id          "policy.reload"
    decision         "allow" (accepted) | "deny" (rejected)
    outcome, status  "OK", "OK" | "POLICY_INVALID", "INVALID_ARGUMENT"
    policy_version   the version in force after the attempt (the new one if accepted)
    decision_id      "old=<version before>;new=<version loaded, "" if rejected>" and, when
                     rejected, ";errors=<the validation errors>" (runs to the end of the text)
    subject_id       the policy directory reloaded
    latency_ms       time taken to read and validate the files
    clerk, office, roles and the rest: empty (a signal carries no identity)

The errors are the ``path:line: message`` strings of :class:`certbroker.policy.PolicyError`, cut
to :data:`MAX_ERROR_TEXT` characters: file positions and rule names, never record contents.

The entry is written by :class:`certbroker.audit.guard.AuditedCall` like every audited call's; a
reload whose reading crashed (not a :class:`~certbroker.policy.PolicyError`) is recorded as
rejected with outcome and status ``INTERNAL``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Final

from certbroker import policy
from certbroker.audit.events import AuditEvent, AuditLog
from certbroker.audit.guard import AuditedCall, Result
from certbroker.errors import BrokerError
from certbroker.metrics import Metrics

log = logging.getLogger(__name__)

KIND: Final = "policy_reload"
REJECTED: Final = "POLICY_INVALID"
MAX_ERROR_TEXT: Final = 2000


def reload_event(
    directory: Path,
    old_version: str,
    fresh: policy.PolicySet | None,
    problems: list[str],
    latency_ms: float,
) -> AuditEvent:
    """The entry of one reload attempt: accepted when ``fresh`` is a set, else rejected."""
    summary = f"old={old_version};new={fresh.version if fresh else ''}"
    if fresh is None:
        text = "; ".join(problems) or "invalid policy"
        if len(text) > MAX_ERROR_TEXT:
            text = text[: MAX_ERROR_TEXT - 1] + "…"
        summary += f";errors={text}"
    return AuditEvent(
        kind=KIND,
        clerk="",
        office="",
        roles=(),
        subject_id=str(directory),
        matter_code="",
        case_number="",
        consent_method="",
        record_type="",
        decision="allow" if fresh else "deny",
        rule_id="policy.reload",
        withheld_fields=(),
        outcome="OK" if fresh else REJECTED,
        status="OK" if fresh else "INVALID_ARGUMENT",
        policy_version=fresh.version if fresh else old_version,
        department="",
        latency_ms=latency_ms,
        decision_id=summary,
    )


class PolicyHolder:
    """The policy set in force. Reloads are audited (module docstring) through ``audit``,
    which the server attaches once its audit log is open; until then reloads are refused."""

    def __init__(self, directory: Path, metrics: Metrics, audit: AuditLog | None = None) -> None:
        self._directory = directory
        self._metrics = metrics
        self.audit = audit
        self.current: policy.PolicySet = policy.load(directory)
        # One reload at a time, so each entry's old version is the one it replaced.
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[bool]] = set()

    async def reload(self) -> bool:
        """Re-read the directory (in a worker thread); True if the new set is now in force.

        Must run on the broker's event loop. The attempt's audit entry is written first
        (:class:`~certbroker.audit.guard.AuditedCall`); if that fails the old set stays and the
        failure is logged (and counted "unaudited").
        """
        async with self._lock:
            previous = self.current
            fresh: policy.PolicySet | None = None
            problems: list[str] = []

            def entry(result: Result) -> AuditEvent:
                event = reload_event(
                    self._directory, previous.version, fresh, problems, result.latency_ms
                )
                if result.failure is not None:  # not a policy error: reading the set crashed
                    event = dataclasses.replace(event, outcome=result.outcome, status=result.status)
                return event

            call = AuditedCall(self.audit, entry)
            try:
                async with call:
                    try:
                        fresh = await asyncio.to_thread(policy.load, self._directory)
                    except policy.PolicyError as exc:
                        problems = exc.errors
            except BrokerError:
                if not call.written:  # any failure to audit keeps the old set
                    log.exception(
                        "policy reload not audited, keeping version %s", previous.version[:12]
                    )
                    self._metrics.policy_reloads.labels("unaudited").inc()
                    return False
                # Audited as INTERNAL; the traceback is logged where the error was mapped.
                log.error("policy reload failed, keeping version %s", previous.version[:12])
                self._metrics.policy_reloads.labels("rejected").inc()
                return False
            if fresh is None:
                log.error(
                    "policy reload rejected, keeping version %s: %s",
                    previous.version[:12],
                    "; ".join(problems),
                )
                self._metrics.policy_reloads.labels("rejected").inc()
                return False
            self.current = fresh
            log.info("policy reloaded: %s -> %s", previous.version[:12], fresh.version[:12])
            self._metrics.policy_reloads.labels("ok").inc()
            return True

    def reload_soon(self) -> None:
        """Start :meth:`reload` on the running loop without waiting (the SIGHUP handler)."""
        task = asyncio.get_running_loop().create_task(self.reload(), name="policy-reload")
        self._pending.add(task)  # a strong reference until it finishes
        task.add_done_callback(self._pending.discard)
