"""Decision tokens: the broker's signed statement of one allow decision, sent with each Fetch.

Defence in depth for departments: an adapter configured with the broker's public key serves a
``Fetch`` only when it carries gRPC metadata ``x-certbroker-decision: <JWS>`` that states this
very request. Format (docs/design.md, "Issue 3 contract")::

    header  {"alg": "EdDSA", "typ": "JWT", "kid": <RFC 7638 thumbprint of the broker key>}
    claims  iss     "certbroker"
            aud     the department id, e.g. "civil_affairs"
            sub     the subject's resident ID
            rt      the record type
            fields  the field paths the decision allows (list of strings)
            did     the decision id
            iat     issue time (integer seconds)
            exp     iat + ttl (30 s at most)

The key pair lives in ``<state_dir>/broker-key/`` (``signing-key.pem`` 0600, ``public-key.pem``
for the departments), created on first use by :func:`certbroker.auth.keyfiles.ed25519_key_files`.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from certbroker.auth.issuers import jwk_thumbprint
from certbroker.auth.keyfiles import ed25519_key_files

ISSUER = "certbroker"
ALG = "EdDSA"
#: gRPC metadata key (lowercase, as gRPC requires) carrying the token on every Fetch.
METADATA_KEY = "x-certbroker-decision"
#: Longest lifetime the contract allows: a token is for one call, sent within milliseconds.
MAX_TTL_S = 30
#: Directory under the state dir holding the broker's key pair.
KEY_DIR = "broker-key"


def mint(
    key: ed25519.Ed25519PrivateKey,
    *,
    department: str,
    subject_id: str,
    record_type: str,
    fields: Sequence[str],
    decision_id: str,
    now: float,
    ttl_s: int = MAX_TTL_S,
    kid: str | None = None,
) -> str:
    """Sign the decision token for one Fetch (compact JWS). ``kid`` defaults to the key's
    RFC 7638 thumbprint; ``ttl_s`` must be within 1..30."""
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s must be within 1..{MAX_TTL_S}, got {ttl_s}")
    if isinstance(fields, str):
        raise TypeError("fields must be a sequence of field paths, not a str")
    iat = int(now)
    claims: dict[str, object] = {
        "iss": ISSUER,
        "aud": department,
        "sub": subject_id,
        "rt": record_type,
        "fields": list(fields),
        "did": decision_id,
        "iat": iat,
        "exp": iat + ttl_s,
    }
    # The compact JWS (RFC 7515 §7.1) written out here rather than through PyJWT's encode: one
    # per department call, and the header segment is the same for every token of a key.
    # Ed25519 signing itself stays (the fixed cost, about two thirds of the total).
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signing_input = _header(kid or jwk_thumbprint(key.public_key())) + b"." + payload
    return (signing_input + b"." + _b64(key.sign(signing_input))).decode("ascii")


@functools.lru_cache(maxsize=16)
def _header(kid: str) -> bytes:
    """The base64url header segment for ``kid``: keys sorted, no whitespace (as PyJWT)."""
    header = {"alg": ALG, "kid": kid, "typ": "JWT"}
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8"))


def _b64(data: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class DecisionSigner:
    """The broker's decision-token key, loaded (or created) from ``<state_dir>/broker-key``.

    ``clock`` (epoch seconds) sets ``iat``; tests fix it.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        ttl_s: int = MAX_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < ttl_s <= MAX_TTL_S:
            raise ValueError(f"ttl_s must be within 1..{MAX_TTL_S}, got {ttl_s}")
        files = ed25519_key_files(state_dir / KEY_DIR)
        self.signing_key_path = files.signing_key_path
        #: The PEM file a department gives its adapter (``--broker-public-key``).
        self.public_key_path = files.public_key_path
        self.public_key = files.public_key
        self.kid = jwk_thumbprint(files.public_key)
        self._key = files.private_key
        self._ttl_s = ttl_s
        self._clock = clock

    def mint(
        self,
        *,
        department: str,
        subject_id: str,
        record_type: str,
        fields: Sequence[str],
        decision_id: str,
    ) -> str:
        """The token for one Fetch of ``record_type`` about ``subject_id`` from ``department``."""
        return mint(
            self._key,
            department=department,
            subject_id=subject_id,
            record_type=record_type,
            fields=fields,
            decision_id=decision_id,
            now=self._clock(),
            ttl_s=self._ttl_s,
            kid=self.kid,
        )
