"""What a verified token may say: claim contents (sub, office, name, roles) and lifetime.

A token signed by a trusted issuer can still carry values that would forge lines in logs,
reorder text on an auditor's terminal or live for a century; those are refused before any
principal is built from them.
"""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from certbroker.auth.authenticator import (
    DEFAULT_MAX_LIFETIME_S,
    MAX_CLAIM_CHARS,
    Authenticator,
    DevIdentityProvider,
    TrustedIssuer,
)
from certbroker.errors import Unauthenticated, UnknownCaller

NOW = 1_760_000_000.0
HOUR = 3600


@pytest.fixture
def idp(tmp_path: Path) -> DevIdentityProvider:
    return DevIdentityProvider(tmp_path)


def auth_for(idp: DevIdentityProvider, **kw: float) -> Authenticator:
    return Authenticator([idp.trusted_issuer(**kw)], clock=lambda: NOW, token_max_age_s=0)


def refused(auth: Authenticator, token: str) -> tuple[str, dict[str, str]]:
    with pytest.raises(Unauthenticated) as info:
        auth.verify(token)
    assert isinstance(info.value, UnknownCaller)  # no principal is known: summarized, not audited
    return info.value.reason, info.value.metadata


HOSTILE = {
    "ESC": "clerk\x1b[31m",
    "newline": "clerk\nFORGED line",
    "carriage return": "clerk\r",
    "RLO (U+202E)": "clerk\u202e10-kreloc",
    "zero-width space": "cle\u200brk",
    "zero-width joiner": "cle\u200drk",
    "BOM": "\ufeffclerk",
    "C1 CSI": "clerk\x9b2J",
    "NUL": "clerk\x00",
    "line separator": "clerk\u2028x",
    "full-width digits": "clerk-\uff10\uff14\uff12",
    "space": "clerk 042",
    "semicolon": "clerk;office=x",
    "too long": "c" * (MAX_CLAIM_CHARS + 1),
    "empty": "",
}


@pytest.mark.parametrize("claim", ["sub", "office"])
@pytest.mark.parametrize("value", list(HOSTILE.values()), ids=list(HOSTILE))
def test_identifier_claims_must_be_short_and_plain(
    idp: DevIdentityProvider, claim: str, value: str
) -> None:
    token = idp.issue("clerk-1", ["window_clerk"], "hall-1", now=NOW, extra_claims={claim: value})
    assert refused(auth_for(idp), token) == ("TOKEN_BAD_CLAIM", {"claim": claim})


@pytest.mark.parametrize(
    "value",
    [v for k, v in HOSTILE.items() if k not in ("space", "semicolon", "empty", "full-width digits")]
    + ["n" * (MAX_CLAIM_CHARS + 1), "\u00a0Li", "Li\u3000Wei", "\ue000"],
    ids=lambda v: repr(v)[:20],
)
def test_name_must_be_short_and_printable(idp: DevIdentityProvider, value: str) -> None:
    token = idp.issue("clerk-1", ["window_clerk"], "hall-1", now=NOW, extra_claims={"name": value})
    assert refused(auth_for(idp), token) == ("TOKEN_BAD_CLAIM", {"claim": "name"})


@pytest.mark.parametrize(
    "roles",
    [["window_clerk", "x\x1b"], ["window\u202eclerk"], [f"r{i}" for i in range(33)], ["a" * 65]],
    ids=["ESC", "RLO", "too many", "too long"],
)
def test_roles_must_be_short_and_plain(idp: DevIdentityProvider, roles: list[str]) -> None:
    token = idp.issue("clerk-1", roles, "hall-1", now=NOW)
    assert refused(auth_for(idp), token) == ("TOKEN_BAD_CLAIM", {"claim": "roles"})


@pytest.mark.parametrize(
    ("sub", "office", "name"),
    [
        ("clerk-0417", "gz-haizhu-24h-01", "李敏"),
        ("li.wei@gz.gov.cn", "hall_3", "Li Wei"),
        ("auth0|5f1c:ab/cd+ef", "HALL.3", "Zoë O'Brien-Åström"),
        ("s" * MAX_CLAIM_CHARS, "o" * MAX_CLAIM_CHARS, "名" * MAX_CLAIM_CHARS),
    ],
)
def test_ordinary_claims_are_accepted(
    idp: DevIdentityProvider, sub: str, office: str, name: str
) -> None:
    token = idp.issue(sub, ["window_clerk"], office, name=name, now=NOW)
    clerk = auth_for(idp).verify(token)
    assert (clerk.sub, clerk.office, clerk.name) == (sub, office, name)


def test_department_principal_sub_is_checked(idp: DevIdentityProvider) -> None:
    token = idp.issue_department("civil_affairs", sub="adapter\x1b]0;pwned\x07", now=NOW)
    with pytest.raises(UnknownCaller) as info:
        auth_for(idp).verify_department([("authorization", f"Bearer {token}")])
    assert (info.value.reason, info.value.metadata) == ("TOKEN_BAD_CLAIM", {"claim": "sub"})


# --- lifetime ---------------------------------------------------------------------------------


def test_a_hundred_year_token_is_refused(idp: DevIdentityProvider) -> None:
    token = idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=100 * 365 * 24 * HOUR, now=NOW)
    assert refused(auth_for(idp), token) == ("TOKEN_LIFETIME_TOO_LONG", {})


def test_default_cap_is_twelve_hours(idp: DevIdentityProvider) -> None:
    assert DEFAULT_MAX_LIFETIME_S == 12 * HOUR
    auth = auth_for(idp)
    at_cap = idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=12 * HOUR, now=NOW)
    assert auth.verify(at_cap).sub == "clerk-1"
    over = idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=12 * HOUR + 1, now=NOW)
    assert refused(auth, over) == ("TOKEN_LIFETIME_TOO_LONG", {})


def test_the_cap_is_per_issuer(idp: DevIdentityProvider) -> None:
    two_hours = idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=2 * HOUR, now=NOW)
    assert refused(auth_for(idp, max_lifetime_s=HOUR), two_hours)[0] == "TOKEN_LIFETIME_TOO_LONG"
    assert auth_for(idp, max_lifetime_s=3 * HOUR).verify(two_hours).sub == "clerk-1"


def test_department_credentials_are_capped_too(idp: DevIdentityProvider) -> None:
    day = idp.issue_department("civil_affairs", ttl_s=24 * HOUR, now=NOW)
    with pytest.raises(UnknownCaller) as info:
        auth_for(idp).verify_department([("authorization", f"Bearer {day}")])
    assert info.value.reason == "TOKEN_LIFETIME_TOO_LONG"
    # The dev IdP's default fits the default cap.
    default = idp.issue_department("civil_affairs", now=NOW)
    assert auth_for(idp).verify_department([("authorization", f"Bearer {default}")])


def test_a_token_without_iat_is_refused(idp: DevIdentityProvider) -> None:
    # Without iat the lifetime is unknown: refused as a missing required claim.
    token = idp.issue("clerk-1", ["window_clerk"], "hall-1", now=NOW)
    claims = jwt.decode(token, options={"verify_signature": False})
    del claims["iat"]
    stripped = idp._sign(claims)
    assert refused(auth_for(idp), stripped) == ("TOKEN_MISSING_CLAIM", {"claim": "iat"})


def test_exp_before_iat_is_a_bad_claim(idp: DevIdentityProvider) -> None:
    token = idp.issue(
        "clerk-1",
        ["window_clerk"],
        "hall-1",
        now=NOW,
        extra_claims={"exp": int(NOW) + 5, "iat": int(NOW) + 10},
    )
    assert refused(auth_for(idp), token) == ("TOKEN_BAD_CLAIM", {"claim": "exp"})


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_issuer_cap_must_be_positive_and_finite(idp: DevIdentityProvider, bad: float) -> None:
    good = idp.trusted_issuer()
    with pytest.raises(ValueError, match="max_lifetime_s"):
        TrustedIssuer(good.issuer, good.audience, good.keys, bad)


def test_configured_caps_reach_the_authenticator(tmp_path: Path) -> None:
    from certbroker import config
    from certbroker.server.app import authenticator

    cfg = config.load(None, env={}, state_dir=tmp_path, dev_idp_max_token_lifetime_s=HOUR)
    idp = DevIdentityProvider(tmp_path)
    auth = authenticator(cfg)
    two_hours = idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=2 * HOUR)
    with pytest.raises(UnknownCaller) as info:
        auth.verify(two_hours)
    assert info.value.reason == "TOKEN_LIFETIME_TOO_LONG"
    assert auth.verify(idp.issue("clerk-1", ["window_clerk"], "hall-1", ttl_s=HOUR)).sub
