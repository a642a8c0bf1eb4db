"""The broker's process log: text (the default) or one JSON object per line, and the call a
record belongs to.

``[server] log_format = "json"`` (``CERTBROKER_LOG_FORMAT``, ``certbroker serve --log-format``)
writes every record as one line of JSON with these keys, the first four always present::

    time      UTC, milliseconds: "2026-03-01T08:30:00.123Z" (the audit entries' format)
    level     "DEBUG", "INFO", "WARNING", "ERROR" or "CRITICAL"
    logger    the module that logged, e.g. "certbroker.server.calls"
    message   the text
    rpc, status, reason, latency_ms, decision_id, audit_entry_id, bundle_id, worker
              when known: the call the record was logged in (see below), or given by the
              caller with ``extra=``; ``worker`` is the index of a ``serve --workers`` worker
    exception the traceback, when the record has one

Only the keys above ever appear: a record's other attributes are not copied out, so a value
passed with ``extra=`` under another name cannot leak into the log. What the broker logs is
identifiers and outcomes; never tokens and never record contents (the messages are ours, and
callers' text reaches the log only inside error messages, which never quote either).

The call a record belongs to is a context variable: the server sets a :class:`CallLog` for
every RPC of its services (:mod:`certbroker.server.app`), so anything logged while the call
runs -- in the servicer, the routing, a task the call started -- carries its ``rpc`` and the
ids learned so far. A servicer may add ids as it learns them (:func:`annotate`); the server
fills in the audit entry and decision ids of the answer when the call ends and logs one line
per call (:mod:`certbroker.server.app`).

The text format keeps its familiar layout and appends the same fields as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

#: The fields a record may carry besides time, level, logger and message, in output order.
FIELDS: Final = (
    "worker",
    "rpc",
    "status",
    "reason",
    "latency_ms",
    "decision_id",
    "audit_entry_id",
    "bundle_id",
)
#: Of those, the ones a :class:`CallLog` holds.
_CALL_FIELDS: Final = ("rpc", "decision_id", "audit_entry_id", "bundle_id")

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(slots=True)
class CallLog:
    """The RPC being served in this context, and the ids it produced so far ("" = none yet)."""

    rpc: str
    decision_id: str = ""
    audit_entry_id: str = ""
    bundle_id: str = ""


_CALL: ContextVar[CallLog | None] = ContextVar("certbroker_call", default=None)


def current_call() -> CallLog | None:
    """The call this code runs for, or None outside a call."""
    return _CALL.get()


def enter_call(call: CallLog) -> object:
    """Make ``call`` the current call; returns the token :func:`leave_call` takes back.

    Tasks the call starts from here on see the same :class:`CallLog` (a task copies its
    context), so ids one of them learns show in the others' records too.
    """
    return _CALL.set(call)


def leave_call(token: object) -> None:
    """Undo :func:`enter_call`."""
    _CALL.reset(token)  # type: ignore[arg-type]


def annotate(*, decision_id: str = "", audit_entry_id: str = "", bundle_id: str = "") -> None:
    """Record ids of the current call (those given non-empty); nothing outside a call."""
    call = _CALL.get()
    if call is None:
        return
    if decision_id:
        call.decision_id = decision_id
    if audit_entry_id:
        call.audit_entry_id = audit_entry_id
    if bundle_id:
        call.bundle_id = bundle_id


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The :data:`FIELDS` of ``record``: the current call's, overridden by the record's own
    (``extra=``); empty values left out."""
    found: dict[str, object] = {}
    call = _CALL.get()
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is None and call is not None and name in _CALL_FIELDS:
            value = getattr(call, name)
        if value is not None and value != "":
            found[name] = value
    return found


def iso_time(epoch: float) -> str:
    """``epoch`` as UTC ISO 8601 with milliseconds and a ``Z``."""
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (module docstring). ``static`` fields (e.g.
    ``{"worker": 0}``) are added to every record that does not carry its own."""

    def __init__(self, static: Mapping[str, object] | None = None) -> None:
        super().__init__()
        self._static = {k: v for k, v in (static or {}).items() if k in FIELDS}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = {**self._static, **record_fields(record)}
        out.update((name, fields[name]) for name in FIELDS if name in fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # json.dumps escapes newlines (in messages and tracebacks): one record, one line.
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The text layout (``fmt``), with the record's :data:`FIELDS` appended as ``key=value``."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = record_fields(record)
        fields.pop("worker", None)  # the worker text format names the worker in its prefix
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return text


def configure(
    log_format: str = "text",
    level: str = "info",
    *,
    text_format: str = TEXT_FORMAT,
    static: Mapping[str, object] | None = None,
) -> None:
    """Send the root logger's records to stderr in ``log_format`` ("text" or "json"),
    replacing any handler set before (``logging.basicConfig``'s).

    ``level`` applies to the broker's own loggers (``certbroker.*``); other libraries' stay at
    INFO and above even when it is "debug" (grpc and asyncio are chatty at DEBUG).
    """
    if log_format not in ("text", "json"):
        raise ValueError(f"unknown log format {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(static) if log_format == "json" else TextFormatter(text_format)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    ours = logging.getLevelName(level.upper())
    if not isinstance(ours, int):
        raise ValueError(f"unknown log level {level!r}")
    root.setLevel(max(ours, logging.INFO))
    logging.getLogger("certbroker").setLevel(ours)
