"""The evidence envelope: JWS compact serialization (RFC 7515 §7.1), EdDSA with Ed25519
(RFC 8037), and the canonical JSON the payload and every digest are encoded with.

Exactly what is signed (docs/evidence.md has a worked example)::

    header  = canonical_json({"alg": "EdDSA", "kid": <kid>, "typ": "certbroker-evidence+jws"})
    payload = canonical_json(<the evidence object>)
    signing input = ASCII(b64url(header) + "." + b64url(payload))
    signature     = Ed25519(private key, signing input)            (64 bytes)
    evidence      = b64url(header) + "." + b64url(payload) + "." + b64url(signature)

``b64url`` is base64url without padding (RFC 7515 §2). ``canonical_json`` is JSON with object
keys sorted by code point, no whitespace, non-ASCII characters written raw, as UTF-8: what
Python's ``json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` and
JavaScript's ``JSON.stringify`` over key-sorted objects both produce for the values evidence
holds (strings, integers, booleans, null, arrays, objects; never a non-integral number except
a record's decimal area, written as the shortest round-trip decimal). Any JWS library verifies
the envelope; the canonical form matters only for recomputing digests.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALG: Final = "EdDSA"
TYP: Final = "certbroker-evidence+jws"
MAX_BYTES: Final = 1 << 20
"""Evidence larger than this is refused unread: a bundle of 8 subjects is a few tens of KB."""
_COMPACT: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class MalformedError(ValueError):
    """Not a well-formed evidence envelope (truncated, re-encoded, not JSON...)."""


def canonical_json(value: object) -> bytes:
    """``value`` as canonical JSON bytes (sorted keys, no whitespace, raw UTF-8)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def b64url(data: bytes) -> str:
    """base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: only the canonical encoding of some bytes is accepted."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise MalformedError("not base64url") from None
    if b64url(raw) != text:  # non-zero padding bits, or padding characters: a re-encoding
        raise MalformedError("not canonical base64url")
    return raw


def sign(payload: object, private_key: Ed25519PrivateKey, kid: str) -> str:
    """The compact JWS of ``payload`` (canonical JSON) signed by ``private_key`` as ``kid``."""
    header = canonical_json({"alg": ALG, "kid": kid, "typ": TYP})
    signing_input = f"{b64url(header)}.{b64url(canonical_json(payload))}"
    return f"{signing_input}.{b64url(private_key.sign(signing_input.encode('ascii')))}"


@dataclass(frozen=True)
class Envelope:
    """A parsed compact JWS; nothing verified yet but its shape."""

    header: dict[str, Any]
    payload: dict[str, Any]
    signing_input: bytes
    signature: bytes

    @property
    def kid(self) -> str:
        """The key id the header names."""
        return str(self.header["kid"])

    def verifies(self, public_key: Ed25519PublicKey) -> bool:
        """Whether the signature is ``public_key``'s over the signing input."""
        try:
            public_key.verify(self.signature, self.signing_input)
        except InvalidSignature:
            return False
        return True


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedError(f"the {what} is not UTF-8 JSON") from None
    if not isinstance(value, dict):
        raise MalformedError(f"the {what} is not a JSON object")
    return value


def parse(text: str) -> Envelope:
    """Parse a compact JWS; :class:`MalformedError` unless it is one of ours in shape."""
    text = text.strip()
    if len(text) > MAX_BYTES:
        raise MalformedError(f"larger than {MAX_BYTES} bytes")
    if not _COMPACT.fullmatch(text):
        raise MalformedError("not a JWS compact serialization (three base64url parts)")
    head_b64, payload_b64, sig_b64 = text.split(".")
    header = _json_object(b64url_decode(head_b64), "header")
    if header.get("alg") != ALG or header.get("typ") != TYP:
        raise MalformedError(f"header is not alg {ALG}, typ {TYP}")
    if not isinstance(header.get("kid"), str) or not header["kid"]:
        raise MalformedError("header has no kid")
    payload = _json_object(b64url_decode(payload_b64), "payload")
    signature = b64url_decode(sig_b64)
    if len(signature) != 64:
        raise MalformedError("an Ed25519 signature is 64 bytes")
    return Envelope(header, payload, f"{head_b64}.{payload_b64}".encode("ascii"), signature)
