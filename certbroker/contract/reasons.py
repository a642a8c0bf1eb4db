"""The ErrorInfo reasons an adapter reports (domain "certbroker"): part of the adapter contract.

The adapter SDK raises these (:mod:`certbroker.adapters.sdk`), and the broker forwards a
refusing adapter's reason to the clerk (ErrorInfo metadata ``adapter_reason``) only when it is
one of them: any other text an adapter puts in its status stays in the broker's log, cleaned
and cut, since it is another organisation's free text (it may hold control characters, a
citizen's resident ID or kilobytes of anything).
"""

from __future__ import annotations

#: Every reason an adapter of this contract may report.
ADAPTER_REASONS: frozenset[str] = frozenset(
    {
        # The citizen is unknown to the department (NOT_FOUND).
        "SUBJECT_NOT_FOUND",
        # The department's own source (database) cannot be reached (UNAVAILABLE).
        "SOURCE_UNAVAILABLE",
        # The broker's decision token is absent, invalid, or does not cover the request.
        "DECISION_TOKEN_MISSING",
        "DECISION_TOKEN_INVALID",
        "DECISION_TOKEN_MISMATCH",
        # The request itself is wrong (the broker should have caught it first).
        "UNKNOWN_RECORD_TYPE",
        "UNKNOWN_FIELD",
        "BAD_SUBJECT_ID",
        # Anything unexpected inside the adapter.
        "INTERNAL",
    }
)

#: PERMISSION_DENIED: the clerk reached a quota of the policy (certbroker.policy.quota); the
#: ErrorInfo names the quota (``rule``), and the lookup is audited as a denial naming it.
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
#: UNAVAILABLE: the quota counters (the state dir's SQLite, or PostgreSQL) cannot be reached;
#: a lookup under a quota is then refused rather than waved through uncounted.
QUOTA_UNAVAILABLE = "QUOTA_UNAVAILABLE"
