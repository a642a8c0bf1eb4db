"""Decision tokens minted in the tests with pyjwt + cryptography, straight from the contract in
docs/design.md (so the SDK is checked against the spec, not against the broker's code)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from jwt.algorithms import OKPAlgorithm


@dataclass
class BrokerKey:
    """A stand-in for the broker's Ed25519 decision key."""

    private: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    @property
    def public(self) -> ed25519.Ed25519PublicKey:
        return self.private.public_key()

    @property
    def kid(self) -> str:
        """RFC 7638 thumbprint, computed here independently of the SDK."""
        jwk = OKPAlgorithm.to_jwk(self.public, as_dict=True)
        members = {k: jwk[k] for k in ("crv", "kty", "x")}
        digest = hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode())
        return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()

    def write_public(self, path: Path) -> Path:
        path.write_bytes(
            self.public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    def mint(
        self,
        *,
        department: str,
        subject_id: str,
        record_type: str,
        fields: Sequence[str],
        decision_id: str,
        iat: float | None = None,
        ttl_s: int = 30,
        headers: dict[str, Any] | None = None,
        replace: dict[str, Any] | None = None,
    ) -> str:
        """A token as the broker would mint it; ``replace`` replaces raw claims (a None value
        drops the claim)."""
        issued = int(time.time() if iat is None else iat)
        claims: dict[str, Any] = {
            "iss": "certbroker",
            "aud": department,
            "sub": subject_id,
            "rt": record_type,
            "fields": list(fields),
            "did": decision_id,
            "iat": issued,
            "exp": issued + ttl_s,
        }
        for name, value in (replace or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return jwt.encode(
            claims, self.private, algorithm="EdDSA", headers={"kid": self.kid, **(headers or {})}
        )
