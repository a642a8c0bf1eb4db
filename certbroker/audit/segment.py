"""Archive segments: an export, compressed with zstandard, signed, optionally encrypted.

A segment file is one line of JSON (the *envelope*, in clear) and then the *payload*::

    {"certbroker_audit_segment":1,"from":a,"to":b,"prev_hash":"..","last_entry_hash":"..",
     "compression":"zstd","encryption":null|{...},"payload_bytes":n,"payload_sha256":"..",
     "key_name":"..","signature":"<base64 Ed25519>"}\\n
    <payload: the export of entries a..b (certbroker.audit.export format), zstd-compressed,
     then, with encryption, encrypted>

What is signed
    The envelope: every key but ``signature``, as canonical JSON (sorted keys, no spaces),
    signed with the checkpoint key (Ed25519). It names the range, the chain hashes it joins
    (``prev_hash``, ``last_entry_hash``) and the payload's SHA-256. So anyone with the
    checkpoint *public* key can check, without decrypting, that a segment is the one the
    broker wrote and continues its neighbours (:func:`open_envelope`). Inside the payload,
    the export carries its own signed checkpoints: decompressed (and decrypted), it verifies
    entry by entry like any export (:func:`certbroker.audit.export.verify_export`).
What is encrypted
    With a recipient (an auditor's X25519 public key), the compressed payload: an ephemeral
    X25519 key agreement, HKDF-SHA256 to a ChaCha20-Poly1305 key, the payload in 1 MiB chunks
    (nonce = chunk number, the last chunk's associated data marks the end, so truncation is
    detected). The envelope stays in clear: it holds hashes and sequence numbers only, never
    an entry's contents. Only the auditor's private key reads the entries.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEGMENT_FORMAT: Final = 1
MAGIC: Final = b'{"certbroker_audit_segment":'
CIPHER: Final = "X25519-HKDF-SHA256-ChaCha20Poly1305-1MiB"
CHUNK: Final = 1 << 20
_TAG: Final = 16
ZSTD_LEVEL: Final = 12  # measured: level 12 is the knee of size vs archiving time


class SegmentError(ValueError):
    """A segment that is not what its envelope says (or cannot be opened)."""


def is_segment(path: Path) -> bool:
    """Whether ``path`` is a segment file (else a plain export)."""
    with path.open("rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _canonical(envelope: dict[str, Any]) -> bytes:
    return json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()


def _key(shared: bytes, ephemeral: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral, info=CIPHER.encode()).derive(
        shared
    )


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _encrypt(plain: BinaryIO, out: IO[bytes], recipient: X25519PublicKey) -> dict[str, str]:
    ephemeral = X25519PrivateKey.generate()
    public = _raw(ephemeral.public_key())
    aead = ChaCha20Poly1305(_key(ephemeral.exchange(recipient), public))
    number = 0
    chunk = plain.read(CHUNK)
    while True:
        following = plain.read(CHUNK)
        last = b"last" if not following else b"more"
        out.write(aead.encrypt(number.to_bytes(12, "big"), chunk, last))
        if not following:
            break
        chunk, number = following, number + 1
    return {
        "cipher": CIPHER,
        "ephemeral": public.hex(),
        "recipient": hashlib.sha256(_raw(recipient)).hexdigest()[:16],
    }


def _decrypt(
    data: BinaryIO, out: IO[bytes], encryption: dict[str, Any], key: X25519PrivateKey
) -> None:
    public = bytes.fromhex(str(encryption["ephemeral"]))
    aead = ChaCha20Poly1305(_key(key.exchange(X25519PublicKey.from_public_bytes(public)), public))
    number = 0
    while True:
        sealed = data.read(CHUNK + _TAG)
        following = data.peek(1) if hasattr(data, "peek") else b""
        last = b"last" if not following else b"more"
        try:
            out.write(aead.decrypt(number.to_bytes(12, "big"), sealed, last))
        except InvalidTag:
            raise SegmentError(
                f"payload chunk {number} does not decrypt (altered, cut or another key)"
            ) from None
        if not following:
            return
        number += 1


def write_segment(
    path: Path,
    write_export: Callable[[BinaryIO], object],
    facts: dict[str, Any],
    signing_key: Ed25519PrivateKey,
    key_name: str,
    *,
    recipient: X25519PublicKey | None = None,
) -> None:
    """Write a segment to ``path`` (mode 0600): ``write_export(stream)`` writes the export,
    which is compressed (and encrypted to ``recipient``); ``facts`` (``from``, ``to``,
    ``prev_hash``, ``last_entry_hash``) go into the signed envelope."""
    import zstandard

    with tempfile.TemporaryFile(dir=path.parent) as packed:
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with compressor.stream_writer(packed, closefd=False) as writer:
            write_export(writer)
        packed.seek(0)
        encryption: dict[str, str] | None = None
        if recipient is not None:
            sealed = tempfile.TemporaryFile(dir=path.parent)  # noqa: SIM115 - closed below
            encryption = _encrypt(packed, sealed, recipient)
            payload: IO[bytes] = sealed
        else:
            payload = packed
        payload.seek(0)
        digest, size = hashlib.sha256(), 0
        for block in iter(lambda: payload.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
        envelope: dict[str, Any] = {
            "certbroker_audit_segment": SEGMENT_FORMAT,
            **facts,
            "compression": "zstd",
            "encryption": encryption,
            "payload_bytes": size,
            "payload_sha256": digest.hexdigest(),
            "key_name": key_name,
        }
        signature = signing_key.sign(_canonical(envelope))
        envelope["signature"] = base64.b64encode(signature).decode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # entries name citizens
        with os.fdopen(fd, "wb") as out:
            out.write(_canonical(envelope) + b"\n")
            payload.seek(0)
            for block in iter(lambda: payload.read(CHUNK), b""):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if payload is not packed:
            payload.close()


def open_envelope(path: Path, public_key: Ed25519PublicKey | None) -> dict[str, Any]:
    """The envelope of the segment at ``path``, its signature checked (with ``public_key``)
    and the payload's size and SHA-256 compared; ``SegmentError`` otherwise. No key needed
    to decrypt: this is what anyone can check."""
    with path.open("rb") as f:
        try:
            envelope = json.loads(f.readline())
            signature = base64.b64decode(envelope.pop("signature"), validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise SegmentError(f"envelope is not readable: {exc}") from None
        if public_key is not None:
            try:
                public_key.verify(signature, _canonical(envelope))
            except InvalidSignature:
                raise SegmentError("envelope signature does not verify") from None
        digest, size = hashlib.sha256(), 0
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
            size += len(block)
    if (size, digest.hexdigest()) != (
        envelope.get("payload_bytes"),
        envelope.get("payload_sha256"),
    ):
        raise SegmentError("payload differs from the one the envelope signs (altered or cut)")
    return dict(envelope)


@contextmanager
def opened_export(path: Path, private_key: X25519PrivateKey | None = None) -> Iterator[Path]:
    """The export inside the segment at ``path``, as a temporary file (0600) for the block:
    decrypted with ``private_key`` when the segment is encrypted (``SegmentError`` without it)
    and decompressed."""
    import zstandard

    with path.open("rb") as f:
        envelope = json.loads(f.readline())
        encryption = envelope.get("encryption")
        with tempfile.TemporaryDirectory(prefix="certbroker-segment-") as tmp:
            plain = Path(tmp) / "export.jsonl"
            source: BinaryIO = f
            packed_file = None
            if encryption is not None:
                if private_key is None:
                    raise SegmentError(
                        "the segment is encrypted: the auditor's private key reads it"
                    )
                packed_file = Path(tmp) / "payload.zst"
                with packed_file.open("wb") as packed:
                    _decrypt(f, packed, encryption, private_key)
                source = packed_file.open("rb")
            try:
                with plain.open("wb") as out:
                    zstandard.ZstdDecompressor().copy_stream(source, out)
            except zstandard.ZstdError as exc:
                raise SegmentError(f"payload does not decompress: {exc}") from None
            finally:
                if source is not f:
                    source.close()
            yield plain
