"""The certbroker CLI as an operator and a clerk use it: real processes, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from certbroker import config
from certbroker.adapters.demo import synthetic
from certbroker.cli import audit_log as cli_audit_log
from certbroker.cli import main as cli
from tests.helpers import edit_entry

CLI = [sys.executable, "-m", "certbroker"]
CASE = "GZ20261121-000777"


def run(*args: str, check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(  # type: ignore[call-overload]
        [*CLI, *args], check=False, capture_output=True, text=True, timeout=60, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc  # type: ignore[no-any-return]


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    state_dir: Path
    policy_dir: Path


@pytest.fixture
def served(tmp_path: Path, dataset_dir: Path) -> Iterator[Served]:
    """`certbroker serve` as its own process, with a private copy of the shipped policies."""
    policy_dir = tmp_path / "policies"
    subprocess.run(["cp", "-r", str(config.DEFAULT_POLICY_DIR), str(policy_dir)], check=True)
    state = tmp_path / "state"
    env = {
        **os.environ,
        "CERTBROKER_POLICY_DIR": str(policy_dir),
        "CERTBROKER_DATASET_DIR": str(dataset_dir),
    }
    proc = subprocess.Popen(
        [*CLI, "serve", "--port", "0", "--metrics-port", "0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        if line.startswith("READY "):
            port = int(line.split()[1].split("=")[1])
            break
    assert port, proc.stderr.read() if proc.stderr else "no READY line"
    try:
        yield Served(proc, port, state, policy_dir)
    finally:
        proc.terminate()
        proc.wait(20)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def token(state: Path, roles: str = "window_clerk", office: str = "gz-haizhu-24h-01") -> str:
    out = run(
        "token",
        "issue",
        "--state-dir",
        str(state),
        "--sub",
        "clerk-cli",
        "--roles",
        roles,
        "--office",
        office,
    ).stdout.strip()
    assert out.count(".") == 2
    return out


def lookup(s: Served, tok: str, subject: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        "lookup",
        "--target",
        f"127.0.0.1:{s.port}",
        "--token",
        tok,
        "--record-type",
        "marriage",
        "--subject",
        subject,
        "--matter",
        "BDC-ZY-001",
        "--case",
        CASE,
        *extra,
        check=False,
    )


def test_serve_token_lookup_audit_session(served: Served, dataset_dir: Path) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    tok = token(served.state_dir)
    out = lookup(served, tok, subject)
    assert out.returncode == 0, out.stderr
    assert "marital_status: 已婚" in out.stdout
    assert "audit receipt: #1" in out.stdout
    assert tok not in out.stdout + out.stderr

    denied = lookup(served, token(served.state_dir, roles="auditor"), subject)
    assert denied.returncode == 1
    assert "PERMISSION_DENIED POLICY_DENIED" in denied.stderr

    as_json = lookup(served, tok, subject, "--json", "--fields", "marital_status")
    assert '"marital_status": "已婚"' in as_json.stdout

    db = served.state_dir / "audit.sqlite"
    verify = run("audit", "verify", "--state-dir", str(served.state_dir))
    assert "ok: 3 entries" in verify.stdout
    table = run("audit", "query", "--db", str(db), "--decision", "deny").stdout
    assert "POLICY_DENIED" in table
    assert "(1 entries)" in table
    lines = run("audit", "query", "--db", str(db), "--clerk", "clerk-cli", "--json").stdout
    assert len(lines.splitlines()) == 3

    with sqlite3.connect(db) as conn:  # a dishonest edit of the second entry
        edit_entry(conn, 2)
    tampered = run("audit", "verify", "--db", str(db), check=False)
    assert tampered.returncode == 10  # EDITED (certbroker.audit.verify.report exit codes)
    assert "first bad entry at index 2" in tampered.stdout


def test_lookup_without_token_and_with_bad_input(served: Served) -> None:
    no_token = run(
        "lookup",
        "--target",
        f"127.0.0.1:{served.port}",
        "--record-type",
        "marriage",
        "--subject",
        "11010519491231002X",
        "--matter",
        "BDC-ZY-001",
        check=False,
        env={k: v for k, v in os.environ.items() if k != "CERTBROKER_TOKEN"},
    )
    assert no_token.returncode == 2
    bad = lookup(served, token(served.state_dir), "110105194912310021")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT BAD_SUBJECT_ID" in bad.stderr


def test_policy_reload_via_cli_and_sighup(served: Served, dataset_dir: Path) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    tok = token(served.state_dir)
    assert lookup(served, tok, subject).returncode == 0
    rules = served.policy_dir / "rules.yaml"
    original = rules.read_text()

    # An invalid set is rejected and the old one stays in force.
    rules.write_text(original + "\n  - id: broken\n    roles: [nobody]\n")
    assert run("policy", "reload", "--state-dir", str(served.state_dir)).returncode == 0
    assert lookup(served, tok, subject).returncode == 0

    # A valid set without the 24-hour rule takes effect on the next call.
    start = original.index("  - id: window-clerk-24h")
    end = original.index("  - id: property-clerk-hall")
    rules.write_text(original[:start] + original[end:])
    os.kill(served.proc.pid, signal.SIGHUP)
    for _ in range(200):  # the reload runs on the broker's loop; poll the observable effect
        out = lookup(served, tok, subject)
        if out.returncode != 0:
            break
    assert "PERMISSION_DENIED" in out.stderr
    served.proc.terminate()
    _, err = served.proc.communicate(timeout=20)
    assert "policy reload rejected" in err
    assert "policy reloaded" in err


def test_policy_check_and_test_commands(tmp_path: Path) -> None:
    ok = run("policy", "check")
    assert ok.stdout.startswith("ok:")
    broken = tmp_path / "rules.yaml"
    broken.write_text("rules:\n  - id: x\n    roles: [window_clerk]\n    matterz: []\n")
    bad = run("policy", "check", str(broken), check=False)
    assert bad.returncode == 1
    assert f"{broken}:4:" in bad.stdout
    tests = run("policy", "test")
    assert " passed, 0 failed" in tests.stdout


def test_policy_reload_without_broker(tmp_path: Path) -> None:
    out = run("policy", "reload", "--state-dir", str(tmp_path), check=False)
    assert out.returncode == 1
    assert "no running broker" in out.stderr


def test_audit_commands_on_missing_log(tmp_path: Path) -> None:
    assert run("audit", "verify", "--state-dir", str(tmp_path), check=False).returncode == 2


def test_demo_runs_a_whole_counter_session(tmp_path: Path, dataset_dir: Path) -> None:
    env = {**os.environ, "CERTBROKER_DATASET_DIR": str(dataset_dir)}
    out = run("demo", "--state-dir", str(tmp_path / "demo"), env=env)
    assert "Demo complete" in out.stdout
    assert "certbroker audit verify: ok" in out.stdout
    assert "TAMPERED" in out.stdout  # the tampered copy is caught
    assert "UNEXPECTED" not in out.stdout
    # The forged-token call has no entry of its own: it is counted in the summary.
    assert "counted in this address's summary" in out.stdout
    assert "unauthenticated.summary" in out.stdout
    # The second-hand home package: one call, grouped by matter, each shared record fetched
    # once and audited once per matter that needs it.
    assert "YJS-ESF-001 二手房交易一件事 (一件事, a package)" in out.stdout
    for heading in ("[BDC-ZY-001 不动产转移登记]", "[SDQ-GH-001 ", "[HJ-QY-001 "):
        assert heading in out.stdout
    assert "Fetched once, audited per matter" in out.stdout
    assert re.search(r"buyer\s+household\s+1 department call -> #\d+ BDC-ZY-001", out.stdout)
    assert "[package of 14]" in out.stdout


def _audit_target(*argv: str) -> cli_audit_log.Target:
    return cli_audit_log.target(cli.parser().parse_args(["audit", *argv]))


def test_audit_state_dir_flag_beats_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CERTBROKER_STATE_DIR", raising=False)
    configured, flagged = tmp_path / "configured", tmp_path / "flagged"
    toml = tmp_path / "broker.toml"
    toml.write_text(f"[server]\nstate_dir = {json.dumps(str(configured))}\n", encoding="utf-8")
    from_file = _audit_target("verify", "--config", str(toml))
    assert from_file.state_dir == configured
    assert from_file.location == configured / "audit.sqlite"
    for command in ("verify", "export", "checkpoint", "archive", "query"):
        extra = ["--out", str(tmp_path / "x.jsonl")] if command == "export" else []
        given = _audit_target(command, "--config", str(toml), "--state-dir", str(flagged), *extra)
        assert given.state_dir == flagged, command
        assert given.location == flagged / "audit.sqlite", command


def test_audit_state_dir_from_the_environment_when_no_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTBROKER_STATE_DIR", str(tmp_path / "env"))
    assert _audit_target("verify").state_dir == tmp_path / "env"
    assert _audit_target("verify", "--state-dir", str(tmp_path)).state_dir == tmp_path
    monkeypatch.delenv("CERTBROKER_STATE_DIR")
    assert _audit_target("verify").state_dir == cli.DEFAULT_STATE
