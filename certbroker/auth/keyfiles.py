"""Ed25519 signing keys kept as PEM files: the one place a private key file is written.

A private key is PKCS#8 PEM, created mode 0600 (never readable by others, even briefly) and
never overwritten; its public key is SubjectPublicKeyInfo PEM beside it (safe to hand out),
written whole or not at all. :func:`ed25519_key_files` keeps a pair in a state directory --
the development IdP (``<state_dir>/idp``), the decision-token signer (``<state_dir>/broker-key``)
and the audit checkpoint signer (``<state_dir>/checkpoint-key``): ``signing-key.pem`` (created on
first use and reused afterwards) and ``public-key.pem``. :func:`create_key_files` makes a new
pair at given paths (a configured checkpoint key).
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


def write_private_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """Write ``key`` to a NEW file ``path``: PKCS#8 PEM, mode 0600, fsynced.

    ``FileExistsError`` if ``path`` exists: a key is never overwritten (another process may
    have created it a moment ago, and losing a key that signed something makes the signatures
    unverifiable for anyone not holding the public key already). A file left half-written by
    a failure is removed.
    """
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # O_EXCL: never clobber; mode 0600 at creation, so the key is never readable by others
    # (open() applies the umask, which can only take permissions away).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def write_public_key(path: Path, key: ed25519.Ed25519PublicKey) -> None:
    """Write ``key`` to ``path`` as SubjectPublicKeyInfo PEM, replacing what is there.

    Write-then-rename: a reader (an adapter or an auditor's tool) never sees half a key.
    """
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(pem)
    partial.replace(path)


def load_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key; ValueError if it is anything else."""
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def create_key_files(private_path: Path, public_path: Path) -> ed25519.Ed25519PrivateKey:
    """A new key pair: the private key at ``private_path`` (:func:`write_private_key`, so
    ``FileExistsError`` if there is one), its public key at ``public_path``."""
    key = ed25519.Ed25519PrivateKey.generate()
    write_private_key(private_path, key)
    write_public_key(public_path, key.public_key())
    return key


def ed25519_key_files(directory: Path) -> KeyFiles:
    """Load ``directory/signing-key.pem``, creating directory (0700) and key on first use.

    ``public-key.pem`` is derived data: rewritten whenever it does not match the signing key.
    Raises ``ValueError`` if the signing key file holds anything but an Ed25519 private key.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    signing = directory / "signing-key.pem"
    public = directory / "public-key.pem"
    if not signing.exists():
        # Another process creating it at the same moment wins; both then load its key below.
        with contextlib.suppress(FileExistsError):
            write_private_key(signing, ed25519.Ed25519PrivateKey.generate())
    key = load_private_key(signing)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.exists() or public.read_bytes() != public_pem:
        write_public_key(public, key.public_key())
    return KeyFiles(key, signing, public)
