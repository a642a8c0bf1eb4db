"""Ed25519 signing keys kept as PEM files in a state directory.

Used by the development IdP (``<state_dir>/idp``) and the decision-token signer
(``<state_dir>/broker-key``): ``signing-key.pem`` (PKCS#8, mode 0600, created on first use and
reused afterwards) and ``public-key.pem`` beside it (SubjectPublicKeyInfo, safe to hand out).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


@dataclass(frozen=True)
class KeyFiles:
    """A loaded key pair and where it lives."""

    private_key: ed25519.Ed25519PrivateKey
    signing_key_path: Path
    public_key_path: Path

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.private_key.public_key()


def ed25519_key_files(directory: Path) -> KeyFiles:
    """Load ``directory/signing-key.pem``, creating directory (0700) and key on first use.

    ``public-key.pem`` is derived data: rewritten whenever it does not match the signing key.
    Raises ``ValueError`` if the signing key file holds anything but an Ed25519 private key.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    signing = directory / "signing-key.pem"
    public = directory / "public-key.pem"
    if not signing.exists():
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Created 0600 (never readable by others, even briefly); O_EXCL never clobbers a key
        # another process created a moment earlier -- both then load the same one below.
        with contextlib.suppress(FileExistsError):
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            with os.fdopen(os.open(signing, flags, 0o600), "wb") as f:
                f.write(pem)
    key = serialization.load_pem_private_key(signing.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{signing}: not an Ed25519 private key")
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.exists() or public.read_bytes() != public_pem:
        # Write-then-rename: a reader (an adapter given this file) never sees half a key.
        partial = public.with_name(f".{public.name}.{os.getpid()}")
        partial.write_bytes(public_pem)
        partial.replace(public)
    return KeyFiles(key, signing, public)
