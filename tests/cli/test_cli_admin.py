"""`certbroker admin ...` against a real broker, as a security officer runs it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.cli import main as cli
from tests.helpers import Env

CASE = "GZ20260302-000001"


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CERTBROKER_TOKEN", raising=False)


def run(argv: Sequence[str]) -> int:
    args = cli.parser().parse_args(list(argv))
    return int(args.func(args))


def remote(env: Env) -> list[str]:
    token = env.token(roles=("security_officer",), sub="sec-1", office="security-office")
    return ["--target", env.broker.target, "--token", token]


WHY = ["--reason", "misuse reported by the hall manager", "--ticket", "SEC-7"]


def lookup_reason(env: Env, subject: str, token: str = "") -> str:
    request = client.lookup_request("marriage", subject, "BDC-ZY-001", CASE)
    try:
        env.stub.Lookup(request, metadata=env.md(token or env.token()), timeout=30)
    except grpc.RpcError as exc:
        return client.call_error(exc).reason
    return "OK"


def test_admin_commands_change_what_a_clerk_can_do(
    env: Env, dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    subject, _ = synthetic.sample_couple(dataset_dir)
    assert run(["admin", "freeze", subject, *WHY, *remote(env)]) == 0
    assert lookup_reason(env, subject) == "SUBJECT_FROZEN"
    assert run(["admin", "disable-clerk", "clerk-001", *WHY, *remote(env)]) == 0
    assert lookup_reason(env, subject) == "CLERK_DISABLED"
    capsys.readouterr()
    assert run(["admin", "list", "--json", *remote(env)]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert sorted(c["kind"] for c in listing["controls"]) == ["clerk", "subject"]
    assert run(["admin", "enable-clerk", "clerk-001", *WHY, *remote(env)]) == 0
    assert run(["admin", "unfreeze", subject, *WHY, *remote(env)]) == 0
    assert lookup_reason(env, subject) == "OK"
    earlier = env.token(now=time.time() - 10)
    assert run(["admin", "revoke", "clerk-001", *WHY, *remote(env)]) == 0  # --before: now
    assert lookup_reason(env, subject, earlier) == "TOKEN_REVOKED"
    assert run(["admin", "disable-office", "gz-haizhu-24h-01", *WHY, *remote(env)]) == 0
    assert run(["admin", "list", *remote(env)]) == 0
    assert "office gz-haizhu-24h-01" in capsys.readouterr().out


def test_admin_refusals_exit_1_and_missing_token_2(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["admin", "disable-clerk", "clerk-001", *remote(env)]) == 1
    assert "MISSING_ARGUMENT" in capsys.readouterr().err
    assert run(["admin", "list", "--target", env.broker.target]) == 2
