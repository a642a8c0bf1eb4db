"""Verification of the broker's decision token (defence in depth on every ``Fetch``).

The broker attaches ``x-certbroker-decision: <JWS>`` to each call it makes after an allow
decision (docs/design.md, "Issue 3 contract"). An adapter configured with the broker's Ed25519
public key checks that the token

* is signed by that key with ``EdDSA`` (no other algorithm is ever accepted),
* was issued by ``certbroker`` for this department (``aud``), is current (5 s leeway) and lives
  no longer than 30 s,
* covers this very request: ``sub`` = subject, ``rt`` = record type, ``did`` = decision id, and
  the requested fields are among the token's ``fields``.

So a caller that reaches the adapter's port without going through the broker's policy decision
-- or replays a decision for another citizen, record type or more fields -- gets nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.utils import base64url_encode

from certbroker.adapters.sdk.core import AdapterError
from certbroker.v1 import adapter_pb2

#: gRPC metadata key carrying the decision token.
METADATA_KEY = "x-certbroker-decision"
#: ``iss`` of every decision token.
ISSUER = "certbroker"
#: Clock skew tolerated between broker and adapter, in seconds.
LEEWAY_S = 5.0
#: Longest lifetime (``exp - iat``) the broker may give a token, in seconds.
MAX_LIFETIME_S = 30

_REQUIRED_CLAIMS = ("iss", "aud", "sub", "rt", "fields", "did", "iat", "exp")


class DecisionTokenMissing(AdapterError):
    """No decision token on the call (UNAUTHENTICATED ``DECISION_TOKEN_MISSING``)."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str = "no decision token on the call") -> None:
        super().__init__("DECISION_TOKEN_MISSING", message)


class DecisionTokenInvalid(AdapterError):
    """Bad signature, algorithm, issuer, audience, times or claim types (UNAUTHENTICATED
    ``DECISION_TOKEN_INVALID``)."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str) -> None:
        super().__init__("DECISION_TOKEN_INVALID", message)


class DecisionTokenMismatch(AdapterError):
    """A valid token that does not cover this request (PERMISSION_DENIED
    ``DECISION_TOKEN_MISMATCH``)."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str) -> None:
        super().__init__("DECISION_TOKEN_MISMATCH", message)


@dataclass(frozen=True)
class Decision:
    """The verified claims of a decision token."""

    decision_id: str
    department: str
    record_type: str
    subject_id: str
    fields: tuple[str, ...]
    expires_at: float


def load_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    """The broker's Ed25519 public key from a PEM file; ``ValueError`` names the file."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot load a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key (decision tokens are EdDSA only)")
    return key


def thumbprint(key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 key: the ``kid`` the broker puts in the header."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    # RFC 7638 §3.2 / RFC 8037 §2: required members of an OKP key, sorted, no whitespace.
    members = {"crv": "Ed25519", "kty": "OKP", "x": base64url_encode(raw).decode()}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64url_encode(hashlib.sha256(canonical).digest()).decode()


def token_from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The decision token of a call's metadata, or None when there is none.

    Two tokens on one call are ambiguous and rejected as invalid rather than picking one.
    """
    values = [v for k, v in metadata or () if k.lower() == METADATA_KEY]
    if not values:
        return None
    if len(values) > 1:
        raise DecisionTokenInvalid("more than one decision token on the call")
    value = values[0]
    return value.decode("ascii", errors="replace") if isinstance(value, bytes) else value


class DecisionTokenVerifier:
    """Checks decision tokens against the broker's public key (times against the system clock,
    as PyJWT compares them)."""

    def __init__(
        self,
        public_key: ed25519.Ed25519PublicKey,
        *,
        leeway_s: float = LEEWAY_S,
        max_lifetime_s: int = MAX_LIFETIME_S,
    ) -> None:
        self._key = public_key
        self.kid = thumbprint(public_key)
        self._leeway = leeway_s
        self._max_lifetime = max_lifetime_s

    @classmethod
    def from_pem_file(cls, path: Path) -> DecisionTokenVerifier:
        """A verifier for the public key in ``path`` (``--broker-public-key``)."""
        return cls(load_public_key(path))

    def verify(
        self, token: str | None, request: adapter_pb2.FetchRequest, audiences: Collection[str]
    ) -> Decision:
        """The decision behind ``request``; raises a ``DecisionToken*`` error unless ``token``
        is valid, addressed to one of ``audiences`` (the departments served) and covers the
        request. Messages name the failed check, never a claim's value."""
        if not token:
            raise DecisionTokenMissing()
        claims = self._decode(token)
        department = claims["aud"]
        if not isinstance(department, str) or department not in audiences:
            raise DecisionTokenInvalid("decision token is for another department")
        fields = claims["fields"]
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise DecisionTokenInvalid("decision token claim 'fields' is not a list of strings")
        exp = claims["exp"]
        assert _is_number(exp)  # _decode checked
        decision = Decision(
            decision_id=_text(claims, "did"),
            department=department,
            record_type=_text(claims, "rt"),
            subject_id=_text(claims, "sub"),
            fields=tuple(fields),
            expires_at=float(exp),
        )
        _check_covers(decision, request)
        return decision

    def _decode(self, token: str) -> dict[str, object]:
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if kid is not None and kid != self.kid:
                # Not fatal on its own (the signature decides) but a far clearer message.
                raise DecisionTokenInvalid("decision token is signed by another key")
            claims: dict[str, object] = jwt.decode(
                token,
                self._key,
                algorithms=["EdDSA"],
                issuer=ISSUER,
                leeway=self._leeway,
                # aud is compared below, against every department served here.
                options={"require": list(_REQUIRED_CLAIMS), "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise DecisionTokenInvalid("decision token has expired") from None
        except jwt.ImmatureSignatureError:
            raise DecisionTokenInvalid("decision token is not valid yet") from None
        except jwt.InvalidIssuerError:
            raise DecisionTokenInvalid("decision token has the wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise DecisionTokenInvalid(f"decision token lacks claim {exc.claim!r}") from None
        except jwt.InvalidAlgorithmError:
            raise DecisionTokenInvalid("decision token is not signed with EdDSA") from None
        except jwt.InvalidSignatureError:
            raise DecisionTokenInvalid("decision token signature does not verify") from None
        except jwt.InvalidTokenError:
            raise DecisionTokenInvalid("decision token is malformed") from None
        iat, exp = claims["iat"], claims["exp"]
        # PyJWT accepts anything int() takes ("123"); the contract says NumericDate.
        if not (_is_number(iat) and _is_number(exp)):
            raise DecisionTokenInvalid("decision token times are not numbers")
        if exp - iat > self._max_lifetime:
            raise DecisionTokenInvalid("decision token lives longer than the contract allows")
        return claims


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text(claims: dict[str, object], name: str) -> str:
    value = claims[name]
    if not isinstance(value, str) or not value:
        raise DecisionTokenInvalid(f"decision token claim {name!r} is not a non-empty string")
    return value


def _check_covers(decision: Decision, request: adapter_pb2.FetchRequest) -> None:
    """Raise :class:`DecisionTokenMismatch` unless the decision covers the request."""
    if decision.subject_id != request.subject_id:
        raise DecisionTokenMismatch("decision token is for another subject")
    if decision.record_type != request.record_type:
        raise DecisionTokenMismatch("decision token is for another record type")
    if decision.decision_id != request.decision_id:
        raise DecisionTokenMismatch("decision token is for another decision")
    if not set(request.fields) <= set(decision.fields):
        raise DecisionTokenMismatch("request asks for fields the decision does not allow")
