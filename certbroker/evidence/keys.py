"""The evidence key ring: Ed25519 keys with key ids, rotated, every public key kept published.

Layout of ``<state_dir>/evidence-keys/`` (created on first use, mode 0700)::

    <kid>.pem     a private key, PKCS#8 PEM, mode 0600, never overwritten
                  (:func:`certbroker.auth.keyfiles.write_private_key`)
    current       the kid new evidence is signed with (one line)
    jwks.json     every public key ever current, as an RFC 7517 JWK Set, oldest first: only
                  ever added to, so evidence of any age verifies after any number of rotations

A key id (``kid``) is the key's RFC 7638 JWK thumbprint: base64url(SHA-256(UTF-8(
'{"crv":"Ed25519","kty":"OKP","x":"<base64url of the 32-byte public key>"}'))). It names the
key itself, so a verifier can recompute it from the JWK. :func:`rotate` (``certbroker keys
rotate --evidence``) makes a new current key; a running broker signs with it after SIGHUP or a
restart. A private key may be removed after rotation (the JWKS keeps its public half); the
public keys are also served by the Audit service (``GetEvidenceKeys``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from certbroker.auth import keyfiles
from certbroker.evidence.jws import b64url, b64url_decode, canonical_json

DIRECTORY: Final = "evidence-keys"
JWKS_FILE: Final = "jwks.json"
_CURRENT: Final = "current"


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK (RFC 8037 OKP), with its kid, alg and use."""
    x = b64url(_raw(public_key))
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": x,
        "kid": thumbprint(x),
        "alg": "EdDSA",
        "use": "sig",
    }


def thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of the Ed25519 JWK with public key ``x`` (base64url)."""
    return b64url(hashlib.sha256(canonical_json({"crv": "Ed25519", "kty": "OKP", "x": x})).digest())


def public_keys(jwks: str | bytes) -> dict[str, Ed25519PublicKey]:
    """kid → public key of a JWK Set's Ed25519 keys; ValueError if it is not a JWK Set.

    A key whose ``kid`` is not its own thumbprint is refused: the kid names the key."""
    try:
        data = json.loads(jwks)
        keys = data["keys"]
        if not isinstance(keys, list):
            raise TypeError("keys is not a list")
        out: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            if key.get("kty") != "OKP" or key.get("crv") != "Ed25519":
                continue  # another kind of key: not ours to use
            x = str(key["x"])
            if key.get("kid") != thumbprint(x):
                raise ValueError(f"kid {key.get('kid')!r} is not the key's RFC 7638 thumbprint")
            out[thumbprint(x)] = Ed25519PublicKey.from_public_bytes(b64url_decode(x))
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ValueError(f"not an Ed25519 JWK Set: {exc}") from None
    return out


@dataclass(frozen=True)
class EvidenceKey:
    """The current signing key and its kid."""

    private_key: Ed25519PrivateKey
    kid: str


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise key creation and rotation between processes (worker processes start at once)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_text(path: Path, text: str) -> None:
    """Write-then-rename: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def _read_jwks(directory: Path) -> list[dict[str, Any]]:
    path = directory / JWKS_FILE
    if not path.exists():
        return []
    keys = json.loads(path.read_text(encoding="utf-8"))["keys"]
    assert isinstance(keys, list)
    return keys


def _new_key(directory: Path) -> EvidenceKey:
    """Create a key, publish it in the JWKS, then make it current (caller holds the lock)."""
    key = Ed25519PrivateKey.generate()
    entry = jwk(key.public_key())
    keyfiles.write_private_key(directory / f"{entry['kid']}.pem", key)
    keys = _read_jwks(directory)
    keys.append(entry)  # published before it signs anything
    _write_text(directory / JWKS_FILE, json.dumps({"keys": keys}, indent=2) + "\n")
    _write_text(directory / _CURRENT, entry["kid"] + "\n")
    return EvidenceKey(key, entry["kid"])


def _current(directory: Path) -> EvidenceKey | None:
    path = directory / _CURRENT
    if not path.exists():
        return None
    kid = path.read_text(encoding="ascii").strip()
    key = keyfiles.load_private_key(directory / f"{kid}.pem")
    if jwk(key.public_key())["kid"] != kid:
        raise ValueError(f"{directory}/{kid}.pem does not hold the key {kid}")
    return EvidenceKey(key, kid)


def load(state_dir: Path) -> EvidenceKey:
    """The current evidence key of ``state_dir``, created on first use.

    ``ValueError``/``OSError`` when the files exist but cannot be read as a key ring."""
    directory = state_dir / DIRECTORY
    found = _current(directory) if (directory / _CURRENT).exists() else None
    if found is not None:
        return found
    with _locked(directory):
        return _current(directory) or _new_key(directory)


def rotate(state_dir: Path) -> EvidenceKey:
    """A new current evidence key; the old ones stay in the JWKS (and their files stay)."""
    directory = state_dir / DIRECTORY
    with _locked(directory):
        return _new_key(directory)


def jwks_path(state_dir: Path) -> Path:
    """Where the JWKS of ``state_dir`` is published."""
    return state_dir / DIRECTORY / JWKS_FILE


def jwks_text(state_dir: Path) -> str:
    """The published JWKS of ``state_dir`` as JSON text (``{"keys": []}`` before any key)."""
    return json.dumps({"keys": _read_jwks(state_dir / DIRECTORY)}, indent=2) + "\n"
