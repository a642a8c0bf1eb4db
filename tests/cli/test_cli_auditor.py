"""`certbroker audit report|anomalies|prove` against a real broker, as an auditor runs them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from certbroker import audit
from certbroker.adapters.demo import synthetic
from certbroker.audit.integrity import checkpoint
from certbroker.cli import client
from certbroker.cli import main as cli
from certbroker.cli.table import display_width, render_table
from tests.helpers import Env

CASE = "GZ20260302-000001"


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBROKER_TOKEN", raising=False)


def run(argv: Sequence[str]) -> int:
    """One CLI command in-process (without main()'s logging setup)."""
    args = cli.parser().parse_args(list(argv))
    return int(args.func(args))


def auditor_token(env: Env) -> str:
    return env.token(roles=("auditor",), sub="aud-1", office="audit-office")


def remote(env: Env, token: str) -> list[str]:
    return ["--target", env.broker.target, "--token", token]


def lookups(env: Env, dataset_dir: Path) -> tuple[str, list[str]]:
    """Two allowed lookups and one denied for the same citizen; their entry ids."""
    subject, _ = synthetic.sample_couple(dataset_dir)
    md = env.md(env.token())
    ids = []
    for record_type in ("marriage", "household"):
        reply = env.stub.Lookup(
            client.lookup_request(record_type, subject, "BDC-ZY-001", CASE), metadata=md
        )
        ids.append(reply.receipt.entry_id)
    ids.append(denied_lookup(env, subject, CASE, "social_security"))
    return subject, ids


def denied_lookup(env: Env, subject: str, case: str, record_type: str = "marriage") -> str:
    request = client.lookup_request(record_type, subject, "BDC-ZY-001", case)
    with pytest.raises(grpc.RpcError) as info:
        env.stub.Lookup(request, metadata=env.md(env.token()))
    return client.call_error(info.value).metadata["audit_entry_id"]


def column(line: str, text: str) -> int:
    """The terminal column where ``text`` starts in ``line``."""
    return display_width(line[: line.index(text)])


def test_report_table_lines_up_cjk_and_json_has_everything(
    env: Env, dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subject, _ = lookups(env, dataset_dir)
    token = auditor_token(env)
    assert run(["audit", "report", subject, *remote(env, token)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"accesses to the records of {subject}:"
    header, rule, *rows, count = out[1:]
    assert count == "(3 accesses)"
    assert set(rule) <= {"-", " "}
    assert [r for r in rows if "不动产转移登记" in r] == rows
    start = column(header, "RECORD TYPE")
    cells = ("marriage", "household", "social_security")
    assert [column(row, cell) for row, cell in zip(rows, cells, strict=True)] == [start] * 3
    decision = column(header, "DECISION")
    assert [column(row, " allow ") + 1 for row in rows[:2]] == [decision] * 2
    assert "marital_status,spouse_name" in rows[0]

    assert run(["audit", "report", subject, "--json", *remote(env, token)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["subject_id"] == subject
    assert [a["record_type"] for a in data["accesses"]] == list(cells)
    assert data["accesses"][2]["decision"] == "deny"
    assert data["accesses"][0]["matter_name"] == "不动产转移登记"

    # The auditor's own calls are entries in the same log.
    entries = audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=2))
    assert [(e.event.rule_id, e.event.clerk, e.event.subject_id) for e in entries] == [
        ("audit.citizen_report", "aud-1", subject)
    ] * 2


def test_anomalies_table_json_and_time_window(
    env: Env, dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    for _ in range(2):  # refused (the policy wants a case number), still entries
        denied_lookup(env, subject, case="")
    token = auditor_token(env)
    assert run(["audit", "anomalies", *remote(env, token)]) == 0
    header, _, *rows, count = capsys.readouterr().out.splitlines()
    assert header.split() == ["RULE", "CLERK", "ENTRIES", "DESCRIPTION"]
    assert [row.split()[:2] for row in rows] == [["NO_CASE_NUMBER", "clerk-001"]]
    assert count == "(1 findings)"

    assert run(["audit", "anomalies", "--json", *remote(env, token)]) == 0
    (finding,) = json.loads(capsys.readouterr().out)["findings"]
    assert (finding["rule"], finding["clerk"]) == ("NO_CASE_NUMBER", "clerk-001")
    assert len(finding["sequences"]) == 2

    window = ["--since", "2001-01-01", "--until", "2001-01-02T00:00:00+08:00"]
    assert run(["audit", "anomalies", *window, *remote(env, token)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(0 findings)"


def test_refusals_and_usage_errors(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    clerk = env.token()
    subject = "110101199003077774"
    assert run(["audit", "report", subject, *remote(env, clerk)]) == 1
    assert "PERMISSION_DENIED ROLE_NOT_ALLOWED" in capsys.readouterr().err
    (entry,) = audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=1))
    assert (entry.event.rule_id, entry.event.clerk, entry.event.decision) == (
        "audit.citizen_report",
        "clerk-001",
        "deny",
    )
    assert run(["audit", "anomalies", "--target", env.broker.target]) == 2
    assert "CERTBROKER_TOKEN" in capsys.readouterr().err
    assert run(["audit", "anomalies", "--since", "yesterday", *remote(env, clerk)]) == 2
    assert "--since" in capsys.readouterr().err
    bad = run(["audit", "report", "110101199003077778", *remote(env, auditor_token(env))])
    assert bad == 1
    assert "INVALID_ARGUMENT BAD_SUBJECT_ID" in capsys.readouterr().err


def test_prove_a_lookup_receipt(
    env: Env, dataset_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, (entry_id, _, _) = lookups(env, dataset_dir)
    (entry,) = [
        e
        for e in audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=100))
        if e.entry_id == entry_id
    ]
    token = auditor_token(env)
    state = ["--state-dir", str(env.state_dir)]
    receipt = f"sha256:{entry.entry_hash[:16]}…"
    argv = ["audit", "prove", "--entry-id", entry_id, "--entry-hash", receipt, "--fresh"]
    assert run([*argv, *state, *remote(env, token)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: entry #{entry.sequence} (sha256:{entry.entry_hash})")

    by_sequence = ["audit", "prove", "--sequence", str(entry.sequence), *state]
    assert run([*by_sequence, *remote(env, token)]) == 0
    capsys.readouterr()
    other = ["--entry-hash", "0" * 16 if entry.entry_hash[0] != "0" else "1" * 16]
    assert run([*by_sequence, *other, *remote(env, token)]) == 15
    assert capsys.readouterr().out.startswith("NOT PROVEN")

    stranger = tmp_path / "stranger.pem"
    checkpoint.generate_key(tmp_path / "stranger-key.pem", stranger)
    wrong_key = ["audit", "prove", "--sequence", "1", "--public-key", str(stranger)]
    assert run([*wrong_key, *remote(env, token)]) == 16
    assert "NOT PROVEN" in capsys.readouterr().out
    assert run([*by_sequence, "--entry-hash", "xyz", *remote(env, token)]) == 2


def test_table_escapes_control_characters_and_pads_by_display_width() -> None:
    text = render_table(("NAME", "OFFICE"), [("李敏", "hall\x1b[31m"), ("", "x")])
    header, rule, first, second = text.splitlines()
    assert "\x1b" not in text
    assert "\\x1b[31m" in first
    assert column(first, "hall") == column(header, "OFFICE") == column(second, "x")
    assert second.startswith("-")
    assert rule.startswith("----  ")
