"""Aligned text tables for terminals: CJK-aware widths, escaped values.

The one renderer of the CLI's tables: :func:`render_table` for any rows (the auditor commands,
:mod:`certbroker.cli.auditor`), :func:`format_table` for audit log entries (``certbroker audit
query``, the demo).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence

from certbroker.audit import AuditEntry, AuditEvent
from certbroker.validation import CONTROL_CATEGORIES

_TABLE_COLUMNS: tuple[tuple[str, Callable[[AuditEntry], str]], ...] = (
    ("SEQ", lambda e: str(e.sequence)),
    ("TIME", lambda e: e.time),
    ("CLERK", lambda e: e.event.clerk),
    ("OFFICE", lambda e: e.event.office),
    ("SUBJECT", lambda e: e.event.subject_id),
    ("MATTER", lambda e: e.event.matter_code),
    ("CASE", lambda e: e.event.case_number),
    ("RECORD TYPE", lambda e: _record_type_cell(e.event)),
    ("DECISION", lambda e: e.event.decision),
    ("RULE", lambda e: e.event.rule_id),
    ("OUTCOME", lambda e: e.event.outcome),
)


def _record_type_cell(event: AuditEvent) -> str:
    if event.kind in ("bundle", "package"):  # no record type of its own; say what it holds
        return f"[{event.kind} of {len(event.item_entry_ids)}]"
    return event.record_type


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes: wide/fullwidth (CJK) count 2, combining marks 0."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def printable(text: str) -> str:
    """``text`` safe for a terminal cell: control and format characters escaped
    (``\\x1b`` ...), and ``-`` for an empty value."""
    # Values come from callers' tokens and requests: escape control and format characters so
    # a crafted value cannot break the table or send escape sequences to the user's terminal.
    out = [
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in CONTROL_CATEGORIES
        else ch
        for ch in text
    ]
    return "".join(out) or "-"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """An aligned text table (header, rule, one line per row), padded by display width so CJK
    text lines up; every cell goes through :func:`printable` (empty shows as ``-``)."""
    lines = [list(header), *([printable(cell) for cell in row] for row in rows)]
    widths = [max(display_width(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        padded = [
            cell + " " * (width - display_width(cell))
            for cell, width in zip(cells, widths, strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = ["-" * width for width in widths]
    return "\n".join(render(line) for line in [lines[0], rule, *lines[1:]])


def format_table(entries: Sequence[AuditEntry]) -> str:
    """Audit entries as an aligned text table, one line per entry (:func:`render_table`)."""
    header = [name for name, _ in _TABLE_COLUMNS]
    return render_table(header, [[cell(entry) for _, cell in _TABLE_COLUMNS] for entry in entries])
