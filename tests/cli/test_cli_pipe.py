"""A reader that stops early (`certbroker audit query | head -1`) gets no traceback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from certbroker import audit
from tests.audit.test_audit_writer import _event
from tests.helpers import ROOT


def test_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"

    async def fill() -> None:
        async with audit.open_audit_log(db) as log:
            await log.append_many([_event(i) for i in range(2000)])

    asyncio.run(fill())
    with subprocess.Popen(
        [sys.executable, "-m", "certbroker", "audit", "query", "--db", str(db), "--limit", "2000"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()  # like `head -1`: the reader is gone
        stderr = proc.stderr.read().decode()
        assert proc.wait(60) == 0, stderr
    assert first  # it did print before the pipe closed
    assert "Traceback" not in stderr
