"""The citizen service and notice tests run on the entry format the broker ships (2,
compact): they read the log only through the broker's services and the CLI, never by SQL on
its tables."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _compact_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBROKER_AUDIT_ENTRY_FORMAT", "2")
