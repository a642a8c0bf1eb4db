"""Shared pieces of the citizen tests: a policy set with a covert matter and the citizen
section, citizens' tokens and stubs, and the lookups that make accesses."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.cli import client
from certbroker.config import DEFAULT_POLICY_DIR
from certbroker.v1 import citizen_pb2, citizen_pb2_grpc
from tests.helpers import Env

TRANSFER = "BDC-ZY-001"
HOME_PACKAGE = "YJS-ESF-001"
COVERT = "GA-ZC-001"
CASE = "GZ20260302-000123"

#: Added to the shipped policies: a covert matter (30 days' delay) and what citizens see.
EXTRA_POLICY = """
matters:
  - code: GA-ZC-001
    name: 刑事案件侦查
    covert: true
    disclosure_delay_days: 30
    needs:
      household: [name, registered_address]
roles:
  - {id: police_investigator, name: 刑侦民警}
rules:
  - id: police-investigation
    roles: [police_investigator]
    matters: [GA-ZC-001]
citizen:
  show_clerk: number
  freeze_on_dispute: true
"""


def policy_dir(tmp: Path) -> Path:
    """The shipped policies plus :data:`EXTRA_POLICY`."""
    target = tmp / "policies"
    shutil.copytree(DEFAULT_POLICY_DIR, target, ignore=shutil.ignore_patterns("tests"))
    (target / "zz-citizen.yaml").write_text(EXTRA_POLICY, encoding="utf-8")
    return target


def citizen_stub(env: Env) -> citizen_pb2_grpc.CitizenStub:
    return citizen_pb2_grpc.CitizenStub(env.channel)


def citizen_md(env: Env, subject: str, /, **extra: Any) -> tuple[tuple[str, str]]:
    return env.md(env.idp.issue_citizen(subject, extra_claims=extra))


def accesses(env: Env, resident_id: str, **request: Any) -> citizen_pb2.MyAccessesResponse:
    return citizen_stub(env).MyAccesses(
        citizen_pb2.MyAccessesRequest(**request), metadata=citizen_md(env, resident_id), timeout=30
    )


def lookup(env: Env, record_type: str, subject: str, matter: str = TRANSFER, **kw: Any) -> str:
    """One Lookup; the entry id of its audit entry (allowed or refused)."""
    token = kw.pop("token", None) or env.token()
    request = client.lookup_request(record_type, subject, matter, kw.pop("case", CASE), **kw)
    try:
        response = env.stub.Lookup(request, metadata=env.md(token), timeout=30)
    except grpc.RpcError as exc:
        return client.call_error(exc).metadata["audit_entry_id"]
    return str(response.receipt.entry_id)


def refused(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = client.call_error(info.value)
    return info.value.code(), err.reason, dict(err.metadata)
