"""Signed checkpoints of the audit log's Merkle tree, as transparency-dev / C2SP signed notes.

A checkpoint commits the broker to the log's state: "the tree of my first *size* entries has
root *R*" (RFC 9162 §2.1, :mod:`certbroker.audit.integrity.merkle`). Auditors keep checkpoints and
later demand
inclusion and consistency proofs against them, so a checkpoint must be verifiable offline with
nothing but the broker's checkpoint public key.

Format (C2SP ``tlog-checkpoint`` body inside a C2SP ``signed-note``, the format Go's
``golang.org/x/mod/sumdb/note`` and transparency-dev tools read)::

    certbroker.example/audit                      origin: which log (non-empty, one line)
    1234                                          tree size, ASCII decimal, no leading zeros
    CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=  root hash, standard base64 (RFC 4648 §4)
    time 2025-03-01T08:30:00.123Z                 extension line: when it was signed (UTC, ms)
    ...                                           further extension lines, optional, non-empty
                                                  blank line
    — <key name> <base64(key ID || Ed25519 signature)>

The signature is over the note text: every line above the blank line, each ending in "\\n".
Key ID = SHA-256(key name || "\\n" || 0x01 || 32-byte Ed25519 public key)[:4] (signed-note,
"Ed25519 signatures"). The ``time`` line is this project's extension: the checkpoint format
itself carries no time, and auditors need one.

Verification outcomes (:class:`CheckpointError` ``reason``), so ``audit verify`` can say which:

- ``BAD_FORMAT``: not a signed note / not a checkpoint (garbage, truncated, bad base64).
- ``WRONG_KEY``: well-formed, but no signature by the expected key name and key ID; e.g. a
  checkpoint signed by another key. (Per signed-note, signatures from unknown keys are ignored,
  so extra witness cosignatures are fine.)
- ``BAD_SIGNATURE``: a signature claims to be by the expected key and does not verify; the body
  or the signature was altered after signing.
- ``WRONG_ORIGIN``: validly signed, but for another log than the one asked for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from certbroker.audit.integrity.merkle import HASH_SIZE, MAX_TREE_SIZE
from certbroker.auth import keyfiles

BAD_FORMAT: Final = "BAD_FORMAT"
WRONG_KEY: Final = "WRONG_KEY"
BAD_SIGNATURE: Final = "BAD_SIGNATURE"
WRONG_ORIGIN: Final = "WRONG_ORIGIN"

MAX_NOTE_BYTES: Final = 64 * 1024
"""Larger notes are rejected unread: a checkpoint is a few hundred bytes."""
MAX_SIGNATURES: Final = 100
"""signed-note: verifiers SHOULD cap signatures (and MUST accept 16); Go's note uses 100."""

_ALG_ED25519: Final = b"\x01"
_SIG_PREFIX: Final = "\u2014 "  # em dash, space
_SIZE_RE: Final = re.compile(r"0|[1-9][0-9]*")  # [0-9], not \d: no other scripts' digits
_TIME_RE: Final = re.compile(
    r"time ([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z"
)


class CheckpointError(Exception):
    """A note that is not a valid checkpoint from the expected key; ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _has_control(text: str) -> bool:
    return any(ch < " " for ch in text)


def _format_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Checkpoint:
    """A log's tree head: ``size`` leaves with Merkle root ``root_hash``, signed at ``time``.

    ``time`` must be timezone-aware; it is stored in UTC, truncated to milliseconds (what the
    note carries), so a checkpoint equals itself after a sign/open round trip. ``extensions``
    are further extension lines (tlog-checkpoint: opaque, non-empty).
    """

    origin: str
    size: int
    root_hash: bytes
    time: datetime
    extensions: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.origin or _has_control(self.origin):
            raise ValueError("origin must be one non-empty line")
        if type(self.size) is not int or not 0 <= self.size <= MAX_TREE_SIZE:
            raise ValueError(f"tree size {self.size!r} is not a uint64")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise ValueError("root hash must be 32 bytes")
        if self.time.tzinfo is None:
            raise ValueError("checkpoint time must be timezone-aware")
        if any(not line or _has_control(line) for line in self.extensions):
            raise ValueError("extension lines must be non-empty single lines")
        t = self.time.astimezone(UTC)
        object.__setattr__(self, "time", t.replace(microsecond=t.microsecond // 1000 * 1000))
        object.__setattr__(self, "extensions", tuple(self.extensions))

    def body(self) -> str:
        """The note text that gets signed (tlog-checkpoint "Note text"), ending in a newline."""
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root_hash).decode("ascii"),
            f"time {_format_time(self.time)}",
            *self.extensions,
        ]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse_body(cls, text: str) -> Checkpoint:
        """Parse a note text made by :meth:`body`; CheckpointError ``BAD_FORMAT`` otherwise.

        This does not check any signature: use :func:`open_note` on anything received.
        """
        if not text.endswith("\n"):
            raise CheckpointError(BAD_FORMAT, "checkpoint text must end with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 4:
            raise CheckpointError(BAD_FORMAT, "need origin, size, root hash and time lines")
        origin, size_s, root_s, time_s, *extensions = lines
        if not _SIZE_RE.fullmatch(size_s) or int(size_s) > MAX_TREE_SIZE:
            raise CheckpointError(BAD_FORMAT, "tree size is not a canonical uint64 decimal")
        root_hash = _b64decode(root_s)
        if root_hash is None or len(root_hash) != HASH_SIZE:
            raise CheckpointError(BAD_FORMAT, "root hash is not base64 of 32 bytes")
        m = _TIME_RE.fullmatch(time_s)
        try:
            if m is None:
                raise ValueError("no time line")
            y, mo, d, h, mi, sec, ms = (int(g) for g in m.groups())
            when = datetime(y, mo, d, h, mi, sec, ms * 1000, tzinfo=UTC)
            return cls(origin, int(size_s), root_hash, when, tuple(extensions))
        except ValueError as e:
            raise CheckpointError(BAD_FORMAT, f"malformed checkpoint: {e}") from None


def _b64decode(s: str) -> bytes | None:
    """Strict standard base64: only the canonical encoding of some bytes is accepted."""
    try:
        raw = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        return None
    # b64decode ignores non-zero padding bits; re-encoding catches that malleability.
    return raw if base64.b64encode(raw).decode("ascii") == s else None


def _valid_key_name(name: str) -> bool:
    """signed-note: non-empty, no Unicode spaces, no plus signs."""
    return bool(name) and "+" not in name and not any(ch.isspace() for ch in name)


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey, key_name: str) -> bytes:
    """The 4-byte signed-note key ID: SHA-256(name || 0x0A || 0x01 || public key)[:4]."""
    material = key_name.encode("utf-8") + b"\n" + _ALG_ED25519 + _raw_public(public_key)
    return hashlib.sha256(material).digest()[:4]


def verifier_key(public_key: Ed25519PublicKey, key_name: str) -> str:
    """The Go ``note`` verifier key string ``name+hexkeyid+base64(0x01 || key)``.

    Lets an auditor check the broker's checkpoints with Go/transparency-dev tooling too.
    """
    if not _valid_key_name(key_name):
        raise ValueError(f"invalid key name {key_name!r}")
    material = base64.b64encode(_ALG_ED25519 + _raw_public(public_key)).decode("ascii")
    return f"{key_name}+{key_id(public_key, key_name).hex()}+{material}"


def sign_note(text: str, private_key: Ed25519PrivateKey, key_name: str) -> str:
    """C2SP signed-note: ``text`` + blank line + one Ed25519 signature line."""
    if not _valid_key_name(key_name):
        raise ValueError(f"invalid key name {key_name!r}")
    if not text.endswith("\n") or _has_control(text.replace("\n", "")):
        raise ValueError("note text must end with a newline and contain no control characters")
    signature = private_key.sign(text.encode("utf-8"))
    blob = key_id(private_key.public_key(), key_name) + signature
    return f"{text}\n{_SIG_PREFIX}{key_name} {base64.b64encode(blob).decode('ascii')}\n"


def verify_note(note: str, public_key: Ed25519PublicKey, key_name: str) -> str:
    """Open a C2SP signed note: return its text if ``key_name``/``public_key`` signed it.

    Follows Go's ``note.Open``: the text ends at the last blank line; signatures by other keys
    are ignored; a signature by the expected key (name and key ID) that fails to verify rejects
    the note. Raises :class:`CheckpointError` with ``BAD_FORMAT``, ``WRONG_KEY`` or
    ``BAD_SIGNATURE``.
    """
    try:
        raw = note.encode("utf-8")  # a str with lone surrogates is not valid UTF-8
    except (UnicodeEncodeError, AttributeError):
        raise CheckpointError(BAD_FORMAT, "note is not valid UTF-8 text") from None
    if len(raw) > MAX_NOTE_BYTES:
        raise CheckpointError(BAD_FORMAT, f"note is larger than {MAX_NOTE_BYTES} bytes")
    if _has_control(note.replace("\n", "")):
        raise CheckpointError(BAD_FORMAT, "note contains control characters")
    split = note.rfind("\n\n")
    if split < 0:
        raise CheckpointError(BAD_FORMAT, "no blank line before signatures")
    text, sig_block = note[: split + 1], note[split + 2 :]
    if not sig_block.endswith("\n"):
        raise CheckpointError(BAD_FORMAT, "no signature lines, or last one not terminated")
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise CheckpointError(BAD_FORMAT, f"more than {MAX_SIGNATURES} signatures")

    want_id = key_id(public_key, key_name)
    seen: list[str] = []
    verified = False
    for line in lines:
        name, _, b64 = line.removeprefix(_SIG_PREFIX).partition(" ")
        blob = _b64decode(b64)
        if not line.startswith(_SIG_PREFIX) or not _valid_key_name(name) or not blob:
            raise CheckpointError(BAD_FORMAT, "malformed signature line")
        if len(blob) < 5:
            raise CheckpointError(BAD_FORMAT, "signature shorter than key ID + 1 byte")
        seen.append(f"{name}+{blob[:4].hex()}")
        if name != key_name or blob[:4] != want_id:
            continue  # someone else's (e.g. a witness's) signature: not ours to judge
        try:
            public_key.verify(blob[4:], text.encode("utf-8"))
        except InvalidSignature:
            raise CheckpointError(
                BAD_SIGNATURE, f"signature by {key_name}+{want_id.hex()} does not verify"
            ) from None
        verified = True
    if not verified:
        raise CheckpointError(
            WRONG_KEY,
            f"no signature by {key_name}+{want_id.hex()}; signed by {', '.join(seen)}",
        )
    return text


def sign(checkpoint: Checkpoint, private_key: Ed25519PrivateKey, key_name: str) -> str:
    """Sign ``checkpoint``; returns the note text to publish (see the module docstring)."""
    return sign_note(checkpoint.body(), private_key, key_name)


def open_note(
    text: str, public_key: Ed25519PublicKey, key_name: str, *, origin: str | None = None
) -> Checkpoint:
    """Verify a signed checkpoint note and parse it.

    Signature first (so an altered body reports ``BAD_SIGNATURE``, not a parse error), then the
    checkpoint body (``BAD_FORMAT``), then, if given, that it is for log ``origin``
    (``WRONG_ORIGIN``). Raises :class:`CheckpointError`.
    """
    checkpoint = Checkpoint.parse_body(verify_note(text, public_key, key_name))
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(
            WRONG_ORIGIN, f"checkpoint is for log {checkpoint.origin!r}, not {origin!r}"
        )
    return checkpoint


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted PKCS#8 PEM Ed25519 private key; ValueError if it is anything else."""
    return keyfiles.load_private_key(path)


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read a SubjectPublicKeyInfo PEM Ed25519 public key; ValueError if it is anything else."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def generate_key(private_path: Path, public_path: Path | None = None) -> Ed25519PrivateKey:
    """Create a new checkpoint signing key: private PEM mode 0600, public PEM beside it
    (:func:`certbroker.auth.keyfiles.create_key_files`).

    Never overwrites a private key (FileExistsError): losing the key that signed earlier
    checkpoints would make them unverifiable for anyone not holding the public key already.
    ``public_path`` defaults to ``private_path`` with suffix ``.pub.pem``.
    """
    if public_path is None:
        public_path = private_path.with_suffix(".pub.pem")
    return keyfiles.create_key_files(private_path, public_path)
