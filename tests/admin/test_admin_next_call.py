"""Every control refuses the NEXT call on a single broker, however warm its caches: the token is
in the token cache, the record in the record cache, and a policy reload came in between (the
controls and the quota counts outlive it). Plus the bad input of the Admin service not covered
by test_admin_service.py: unknown clerks and offices are accepted, an invalid resident ID is not.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest

from certbroker import audit, config
from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import Env, make_config, running_env

MATTER = "BDC-ZY-001"
CASE = "GZ20260302-000001"
WHY = admin_pb2.Justification(reason="token seen on a shared PC", ticket="SEC-2026-0099")
#: Quotas loose enough for the warm-up, before the reload (the counts still start here).
LOOSE = "quotas:\n  - {id: rate, roles: [window_clerk], lookups: 100, per: 1m}\n"
#: After the reload: the warm-up's two lookups use this quota up.
TIGHT = "quotas:\n  - {id: rate, roles: [window_clerk], lookups: 2, per: 1m}\n"


@pytest.fixture
def env(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    policies = tmp_path / "policies"
    shutil.copytree(config.DEFAULT_POLICY_DIR, policies)
    (policies / "quotas.yaml").write_text(LOOSE, "utf-8")
    with running_env(make_config(tmp_path, dataset_dir, policy_dir=policies), dataset_dir) as env:
        yield env


def officer(env: Env) -> Any:
    return env.md(env.token(roles=("security_officer",), sub="sec-1", office="security-office"))


def admin(env: Env) -> admin_pb2_grpc.AdminStub:
    return admin_pb2_grpc.AdminStub(env.channel)


def lookup(env: Env, token: str, subject: str) -> Any:
    # Household: the shipped catalogue caches it (cache_ttl_s 600).
    request = client.lookup_request("household", subject, MATTER, CASE)
    return env.stub.Lookup(request, metadata=env.md(token), timeout=30)


def token_cache_hits(env: Env) -> float:
    assert env.broker.broker is not None
    metrics = env.broker.broker.metrics
    return metrics.registry.get_sample_value("certbroker_token_cache_hits_total") or 0.0


def revoke_token(env: Env, token: str, _subject: str) -> None:
    jti = jwt.decode(token, options={"verify_signature": False})["jti"]
    admin(env).RevokeToken(admin_pb2.RevokeTokenRequest(jti=jti, why=WHY), metadata=officer(env))


def disable_clerk(env: Env, _token: str, _subject: str) -> None:
    request = admin_pb2.DisableClerkRequest(sub="clerk-001", why=WHY)
    admin(env).DisableClerk(request, metadata=officer(env))


def freeze_subject(env: Env, _token: str, subject: str) -> None:
    request = admin_pb2.FreezeSubjectRequest(subject_id=subject, why=WHY)
    admin(env).FreezeSubject(request, metadata=officer(env))


def reach_quota(env: Env, _token: str, _subject: str) -> None:
    """Nothing to do: the reload lowered the quota to the warm-up's count."""


@pytest.mark.parametrize(
    ("control", "code", "reason", "tight"),
    [
        (revoke_token, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED", False),
        (disable_clerk, grpc.StatusCode.PERMISSION_DENIED, "CLERK_DISABLED", False),
        (freeze_subject, grpc.StatusCode.PERMISSION_DENIED, "SUBJECT_FROZEN", False),
        (reach_quota, grpc.StatusCode.PERMISSION_DENIED, "QUOTA_EXCEEDED", True),
    ],
    ids=["revoke", "disable-clerk", "freeze", "quota"],
)
def test_refused_on_the_next_call_with_caches_warm_and_a_reload_between(
    env: Env,
    dataset_dir: Path,
    control: Callable[[Env, str, str], None],
    code: grpc.StatusCode,
    reason: str,
    tight: bool,
) -> None:
    subject = synthetic.sample_couple(dataset_dir)[0]
    token = env.token()
    lookup(env, token, subject)  # warms both caches
    # A policy reload in between (the quota case lowers the quota; the others change a comment).
    policies = env.broker.config.policy_dir
    (policies / "quotas.yaml").write_text(TIGHT if tight else LOOSE + "# reloaded\n", "utf-8")
    assert env.broker.broker is not None
    env.broker.call(env.broker.broker.policies.reload())
    events = audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=1000))
    assert [e.event.decision for e in events if e.event.kind == "policy_reload"] == ["allow"]
    hits = token_cache_hits(env)
    assert lookup(env, token, subject).from_cache  # record cache warm after the reload
    assert token_cache_hits(env) == hits + 1  # and the token cache
    control(env, token, subject)
    with pytest.raises(grpc.RpcError) as info:
        lookup(env, token, subject)
    assert (info.value.code(), client.call_error(info.value).reason) == (code, reason)


def test_unknown_clerk_and_office_are_accepted(env: Env) -> None:
    """A clerk or office the broker has never seen may log in later: the control waits."""
    admin(env).DisableClerk(
        admin_pb2.DisableClerkRequest(sub="never-seen-clerk", why=WHY), metadata=officer(env)
    )
    admin(env).DisableOffice(
        admin_pb2.DisableOfficeRequest(office="gz-nowhere-hall-99", why=WHY), metadata=officer(env)
    )
    listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
    assert {(c.kind, c.target) for c in listing.controls} == {
        ("clerk", "never-seen-clerk"),
        ("office", "gz-nowhere-hall-99"),
    }
    with pytest.raises(grpc.RpcError) as refused:  # ... and when it does log in, it is refused
        lookup(env, env.token(sub="never-seen-clerk"), "110101199003077774")
    assert client.call_error(refused.value).reason == "CLERK_DISABLED"


@pytest.mark.parametrize("subject_id", ["110101199003077775", "12345", "11010119900307777Y"])
def test_freezing_an_invalid_resident_id_is_bad_subject_id(env: Env, subject_id: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        admin(env).FreezeSubject(
            admin_pb2.FreezeSubjectRequest(subject_id=subject_id, why=WHY), metadata=officer(env)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client.call_error(info.value).reason == "BAD_SUBJECT_ID"
    last = audit.query(env.state_dir / "audit.sqlite", audit.QueryFilter(limit=1000))[-1].event
    assert (last.kind, last.clerk, last.outcome) == ("admin", "sec-1", "BAD_SUBJECT_ID")
    listing = admin(env).ListControls(admin_pb2.ListControlsRequest(), metadata=officer(env))
    assert list(listing.controls) == []
