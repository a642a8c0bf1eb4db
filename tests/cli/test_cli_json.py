"""Every ``--json`` the CLI prints is harmless to a terminal: no raw C0/C1 control, bidi control,
zero-width or line-separator character, yet the same values when parsed."""

from __future__ import annotations

import asyncio
import json
import unicodedata
from pathlib import Path

import pytest

from certbroker.audit import AuditEvent, SQLiteAuditLog
from certbroker.cli import jsonout
from certbroker.cli import main as cli
from certbroker.v1 import audit_pb2

HOSTILE = (
    "clerk\x1b[2J\x07"  # ESC (clear screen), BEL
    "\x7f\x9b31m"  # DEL, C1 CSI
    "\u202eevil\u202c"  # right-to-left override ... pop
    "\u2066\u2069\u200e\u061c"  # isolates, LRM, Arabic letter mark
    "\u200b\u200d\ufeff"  # zero-width space and joiner, BOM
    "\u2028\u2029"  # line and paragraph separators
    "\U000e0041"  # a tag character (format, beyond the BMP)
)
READABLE = "李敏 Zoë 🙂 ａ"


def assert_terminal_safe(text: str) -> None:
    raw = [c for c in text if unicodedata.category(c) in jsonout.ESCAPED_CATEGORIES]
    assert set(raw) <= {"\n"}, f"raw characters reach the terminal: {raw!r}"


@pytest.mark.parametrize("indent", [None, 2])
def test_dumps_escapes_what_a_terminal_would_act_on(indent: int | None) -> None:
    value = {"clerk": HOSTILE, "name": READABLE, "list": [HOSTILE, "ok"], "lone": "\ud800"}
    text = jsonout.dumps(value, indent=indent, sort_keys=True)
    assert_terminal_safe(text)
    assert json.loads(text) == value  # the same values, only spelled as escapes
    assert READABLE in text  # readable text stays readable
    assert "\\u202e" in text
    assert "\\udb40\\udc41" in text  # beyond the BMP: a surrogate pair, as JSON spells it


def test_message_json_is_terminal_safe() -> None:
    reply = audit_pb2.CitizenReportResponse(subject_id="110101199003077774")
    reply.accesses.add(clerk=HOSTILE, office=READABLE, matter_name="不动产转移登记")
    text = jsonout.message(reply, indent=2, sort_keys=True)
    assert_terminal_safe(text)
    assert json.loads(text)["accesses"][0]["clerk"] == HOSTILE
    assert "不动产转移登记" in text


def test_audit_query_json_escapes_hostile_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "audit.sqlite"
    event = AuditEvent(
        kind="lookup",
        clerk=HOSTILE,
        office="gz-haizhu-hall-01",
        roles=("window_clerk", HOSTILE),
        subject_id="110101199003077774",
        matter_code="BDC-ZY-001",
        case_number=HOSTILE,
        consent_method="id_card_read",
        record_type="household",
        decision="allow",
        rule_id="r",
        withheld_fields=(),
        outcome="OK",
        status="OK",
        policy_version="a" * 64,
        department="public_security",
        latency_ms=1.0,
        decision_id=READABLE,
    )

    async def write() -> None:
        async with SQLiteAuditLog(db) as log:
            await log.append(event)

    asyncio.run(write())
    assert cli.main(["audit", "query", "--db", str(db), "--json"]) == 0
    out = capsys.readouterr().out
    assert_terminal_safe(out)
    (line,) = out.splitlines()
    entry = json.loads(line)
    assert entry["event"]["clerk"] == HOSTILE
    assert entry["event"]["roles"] == ["window_clerk", HOSTILE]
    assert entry["event"]["decision_id"] == READABLE
