"""Idle PostgreSQL reader sessions kept for the next read, instead of a new connection each.

Opening a connection (TCP, authentication, the session settings) costs 10–20 ms, more than a
citizen report's whole query; the Audit service reads once per call. A reader handed back
(:meth:`~certbroker.audit.store.postgres.PgConnection.close`) ends its transaction (so the
next read takes a fresh snapshot) and waits here, idle: no transaction, no locks (a schema
can still be dropped, a partition detached). At most :data:`MAX_IDLE` wait per process, over
all logs; the oldest is closed beyond that, and all of them when the process exits.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections import deque
from typing import Any, Final

#: Idle reader sessions kept per process (over every log it reads).
MAX_IDLE: Final = 4

_lock = threading.Lock()
_idle: deque[tuple[str, Any]] = deque()  # (key, psycopg connection), oldest first


def take(key: str) -> Any | None:
    """An idle session for ``key`` (the newest), or None."""
    with _lock:
        for index in range(len(_idle) - 1, -1, -1):
            if _idle[index][0] == key:
                raw = _idle[index][1]
                del _idle[index]
                return raw
    return None


def give_back(key: str, raw: Any) -> None:
    """Keep ``raw`` (idle, its transaction ended) for the next reader of ``key``."""
    with _lock:
        _idle.append((key, raw))
        evicted = [_idle.popleft()[1] for _ in range(len(_idle) - MAX_IDLE)]
    for old in evicted:
        old.close()


def close_all() -> None:
    """Close every idle session (at exit; tests)."""
    with _lock:
        idle = [raw for _, raw in _idle]
        _idle.clear()
    for raw in idle:
        raw.close()


def _forget_in_child() -> None:
    # A forked child shares its parent's sockets: using or closing an inherited session would
    # break the parent's. The child never touches them (kept referenced, never finalized).
    _inherited.extend(raw for _, raw in _idle)
    _idle.clear()


_inherited: list[Any] = []
atexit.register(close_all)
os.register_at_fork(after_in_child=_forget_in_child)
