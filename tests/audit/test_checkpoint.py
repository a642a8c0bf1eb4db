"""Tests for certbroker.audit.integrity.checkpoint: signed-note checkpoints, Ed25519 keys, and
every failure reason."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import string
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certbroker.audit.integrity.checkpoint import (
    BAD_FORMAT,
    BAD_SIGNATURE,
    MAX_NOTE_BYTES,
    WRONG_KEY,
    WRONG_ORIGIN,
    Checkpoint,
    CheckpointError,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    open_note,
    sign,
    sign_note,
    verifier_key,
    verify_note,
)
from certbroker.audit.integrity.merkle import EMPTY_ROOT, leaf_hash
from certbroker.auth.keyfiles import ed25519_key_files

# golang.org/x/mod/sumdb/note's documented example (note.go, note_test.go): Ed25519 is
# deterministic, so producing this exact note proves wire compatibility with Go's note package.
GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n"
    "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqd"
    "ngotpRZb6KE6RyyBwJnAM=\n"
)

KEY = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(b"\x08" * 32)
NAME = "certbroker.test/audit"
WHEN = datetime(2025, 3, 1, 8, 30, 0, 123000, tzinfo=UTC)
CP = Checkpoint(NAME, 1234, leaf_hash(b"entry"), WHEN)


def go_key() -> Ed25519PrivateKey:
    material = base64.b64decode(GO_SKEY.split("+", 4)[4])
    assert material[0] == 1  # Ed25519
    return Ed25519PrivateKey.from_private_bytes(material[1:])


def reason_of(note: str, *, key: Ed25519PrivateKey = KEY, name: str = NAME) -> str:
    with pytest.raises(CheckpointError) as info:
        open_note(note, key.public_key(), name)
    return info.value.reason


# -- interoperability ------------------------------------------------------------------------


def test_note_signature_matches_go_sumdb_note_reference() -> None:
    key = go_key()
    assert sign_note(GO_TEXT, key, "PeterNeumann") == GO_NOTE
    assert verify_note(GO_NOTE, key.public_key(), "PeterNeumann") == GO_TEXT
    assert verifier_key(key.public_key(), "PeterNeumann") == GO_VKEY
    assert key_id(key.public_key(), "PeterNeumann").hex() == "c74f20a3"


def test_key_id_is_signed_note_recommendation() -> None:
    raw = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    expected = hashlib.sha256(NAME.encode() + b"\n\x01" + raw).digest()[:4]
    assert key_id(KEY.public_key(), NAME) == expected


def test_checkpoint_note_layout() -> None:
    note = sign(CP, KEY, NAME)
    body, sig_line = note.split("\n\n")
    root_b64 = base64.b64encode(CP.root_hash).decode()
    assert body == f"{NAME}\n1234\n{root_b64}\ntime 2025-03-01T08:30:00.123Z"
    assert sig_line.startswith(f"\u2014 {NAME} ")
    assert sig_line.endswith("\n")
    blob = base64.b64decode(sig_line.split(" ")[2])
    assert blob[:4] == key_id(KEY.public_key(), NAME)
    assert len(blob) == 4 + 64
    KEY.public_key().verify(blob[4:], (body + "\n").encode())  # over the text incl. final \n


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "checkpoint",
    [
        CP,
        Checkpoint(NAME, 0, EMPTY_ROOT, WHEN),
        Checkpoint(NAME, 2**64 - 1, b"\xff" * 32, WHEN),
        Checkpoint("服务大厅/审计 log", 7, b"\x00" * 32, WHEN, ("ext one", "time is not special")),
    ],
)
def test_round_trip(checkpoint: Checkpoint) -> None:
    note = sign(checkpoint, KEY, NAME)
    assert open_note(note, KEY.public_key(), NAME) == checkpoint
    assert open_note(note, KEY.public_key(), NAME, origin=checkpoint.origin) == checkpoint
    assert Checkpoint.parse_body(checkpoint.body()) == checkpoint


def test_time_is_normalised_to_utc_milliseconds() -> None:
    beijing = timezone(timedelta(hours=8))
    local = datetime(2025, 3, 1, 16, 30, 0, 123456, tzinfo=beijing)
    cp = Checkpoint(NAME, 1, EMPTY_ROOT, local)
    assert cp.time == WHEN
    assert cp.time.tzinfo is UTC
    assert open_note(sign(cp, KEY, NAME), KEY.public_key(), NAME) == cp


def test_other_signatures_are_ignored() -> None:
    # A witness cosigning (another key, listed before or after ours) does not disturb us.
    note = sign(CP, KEY, NAME)
    witness = sign_note(CP.body(), OTHER_KEY, "witness.example").split("\n\n")[1]
    assert open_note(note + witness, KEY.public_key(), NAME) == CP
    body, ours = note.split("\n\n")
    assert open_note(f"{body}\n\n{witness}{ours}", KEY.public_key(), NAME) == CP


# -- failure reasons -------------------------------------------------------------------------


def test_wrong_key_is_distinguished_from_corruption() -> None:
    note = sign(CP, OTHER_KEY, NAME)
    with pytest.raises(CheckpointError) as info:
        open_note(note, KEY.public_key(), NAME)
    assert info.value.reason == WRONG_KEY
    assert key_id(OTHER_KEY.public_key(), NAME).hex() in info.value.message
    # Right key, but published under another name: also not the key we trust.
    assert reason_of(sign(CP, KEY, "someone.else/log")) == WRONG_KEY


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("\n1234\n", "\n1235\n"),  # size
        ("\n1234\n", "\n12340\n"),
        ("certbroker.test/audit\n", "certbroker.test/audis\n"),  # origin
        ("08:30:00.123Z", "08:30:00.124Z"),  # time
    ],
)
def test_tampered_body_is_bad_signature(old: str, new: str) -> None:
    note = sign(CP, KEY, NAME)
    assert old in note
    assert reason_of(note.replace(old, new, 1)) == BAD_SIGNATURE


def test_tampered_root_and_extension_are_bad_signature() -> None:
    note = sign(CP, KEY, NAME)
    other_root = base64.b64encode(leaf_hash(b"other")).decode()
    root_b64 = base64.b64encode(CP.root_hash).decode()
    assert reason_of(note.replace(root_b64, other_root)) == BAD_SIGNATURE
    body, sig = note.split("\n\n")
    assert reason_of(f"{body}\nextra line\n\n{sig}") == BAD_SIGNATURE
    assert reason_of(f"{body.rsplit(chr(10), 1)[0]}\n\n{sig}") == BAD_SIGNATURE  # line dropped


def test_tampered_signature_bytes_are_bad_signature() -> None:
    note = sign(CP, KEY, NAME)
    body, sig_line = note.split("\n\n")
    prefix, b64 = sig_line.rstrip("\n").rsplit(" ", 1)
    blob = base64.b64decode(b64)
    for pos in (4, 20, 4 + 63):
        bad = blob[:pos] + bytes([blob[pos] ^ 1]) + blob[pos + 1 :]
        note2 = f"{body}\n\n{prefix} {base64.b64encode(bad).decode()}\n"
        assert reason_of(note2) == BAD_SIGNATURE
    short = base64.b64encode(blob[:40]).decode()  # right key ID, truncated signature
    assert reason_of(f"{body}\n\n{prefix} {short}\n") == BAD_SIGNATURE


def test_signed_note_that_is_not_a_checkpoint_is_bad_format() -> None:
    root_b64 = base64.b64encode(EMPTY_ROOT).decode()
    time_line = "time 2025-03-01T08:30:00.123Z"
    bodies = [
        GO_TEXT,
        f"{NAME}\n01\n{root_b64}\n{time_line}\n",  # leading zero
        f"{NAME}\n+1\n{root_b64}\n{time_line}\n",
        f"{NAME}\n\u0661\n{root_b64}\n{time_line}\n",  # Arabic-Indic digit one
        f"{NAME}\n18446744073709551616\n{root_b64}\n{time_line}\n",  # 2**64
        f"{NAME}\n1\n{base64.b64encode(b'x' * 31).decode()}\n{time_line}\n",
        f"{NAME}\n1\n{root_b64.rstrip('=')}\n{time_line}\n",  # unpadded
        f"{NAME}\n1\n{root_b64}\n",  # no time line
        f"{NAME}\n1\n{root_b64}\ntime 2025-13-01T08:30:00.123Z\n",
        f"{NAME}\n1\n{root_b64}\ntime 2025-03-01T08:30:00Z\n",
        f"{NAME}\n1\n{root_b64}\n{time_line}\n\n",  # empty extension line
        f"\n1\n{root_b64}\n{time_line}\n",  # empty origin
    ]
    for body in bodies:
        assert reason_of(sign_note(body, KEY, NAME)) == BAD_FORMAT, body


def test_origin_mismatch() -> None:
    with pytest.raises(CheckpointError) as info:
        open_note(sign(CP, KEY, NAME), KEY.public_key(), NAME, origin="other.log")
    assert info.value.reason == WRONG_ORIGIN


def test_garbage_notes_are_bad_format() -> None:
    note = sign(CP, KEY, NAME)
    body, sig_line = note.split("\n\n")
    b64 = sig_line.rstrip("\n").rsplit(" ", 1)[1]
    garbage = [
        "",
        "hello",
        "\n\n",
        body + "\n",  # signature block cut off
        body + "\n\n",
        note.rstrip("\n"),  # last signature line not terminated
        note.replace("\u2014", "-"),  # ASCII hyphen instead of em dash
        note.replace("\u2014 ", "\u2014"),
        note.replace(f"{NAME} ", f"{NAME}  "),  # empty key name... or empty signature
        f"{body}\n\n\u2014 {NAME}\n",  # no signature
        f"{body}\n\n\u2014 {NAME} !!!!\n",  # not base64
        f"{body}\n\n\u2014 {NAME} {b64.rstrip('=')}\n",  # unpadded base64
        f"{body}\n\n\u2014 bad+name {b64}\n",
        f"{body}\n\n\u2014 {base64.b64encode(b'abcd').decode()} AAAAAA==\n",  # too short
        note.replace("\n1234\n", "\n12\t34\n"),  # control character
        note.replace("\n1234\n", "\n1234\r\n"),
        note + "\ud800",  # lone surrogate: not encodable as UTF-8
        note + "\u2014 x " + "A" * MAX_NOTE_BYTES + "\n",
        f"{body}\n\n" + f"\u2014 w {b64}\n" * 101,  # too many signatures
    ]
    for text in garbage:
        assert reason_of(text) == BAD_FORMAT, repr(text[:80])
    # Two notes glued together parse (the text ends at the last blank line), but the text
    # is then not what was signed.
    assert reason_of(note * 2) == BAD_SIGNATURE


def test_non_canonical_signature_base64_is_bad_format() -> None:
    note = sign(CP, KEY, NAME)
    b64 = note.rstrip("\n").rsplit(" ", 1)[1]
    assert b64.endswith("=")
    assert not b64.endswith("==")
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    # Flip the lowest bit of the last character: only padding bits change.
    malleable = b64[:-2] + alphabet[alphabet.index(b64[-2]) ^ 1] + "="
    assert base64.b64decode(malleable) == base64.b64decode(b64)  # same bytes, other text
    assert reason_of(note.replace(b64, malleable)) == BAD_FORMAT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "two\nlines"},
        {"size": -1},
        {"size": 2**64},
        {"size": True},
        {"root_hash": b"x" * 31},
        {"time": datetime(2025, 3, 1, 8, 30)},  # naive
        {"extensions": ("",)},
        {"extensions": ("a\nb",)},
    ],
)
def test_checkpoint_rejects_invalid_fields(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(CP, **kwargs)


@pytest.mark.parametrize("name", ["", "has space", "plus+sign", "tab\there", "nbsp\u00a0x"])
def test_invalid_key_names_are_refused_for_signing(name: str) -> None:
    with pytest.raises(ValueError):
        sign(CP, KEY, name)


def test_sign_note_refuses_bad_text() -> None:
    for text in ["no newline", "bell\a\n"]:
        with pytest.raises(ValueError):
            sign_note(text, KEY, NAME)


# -- keys on disk ------------------------------------------------------------------------------


def test_generate_key_writes_0600_private_and_loadable_public(tmp_path: Path) -> None:
    private_path = tmp_path / "checkpoint-key.pem"
    key = generate_key(private_path)
    public_path = tmp_path / "checkpoint-key.pub.pem"
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600
    loaded = load_private_key(private_path)
    public = load_public_key(public_path)
    note = sign(CP, loaded, NAME)
    assert open_note(note, public, NAME) == CP
    assert open_note(sign(CP, key, NAME), public, NAME) == CP
    explicit = generate_key(tmp_path / "k2.pem", tmp_path / "elsewhere.pem")
    assert verifier_key(load_public_key(tmp_path / "elsewhere.pem"), NAME) == verifier_key(
        explicit.public_key(), NAME
    )


def test_generate_key_never_overwrites(tmp_path: Path) -> None:
    private_path = tmp_path / "checkpoint-key.pem"
    generate_key(private_path)
    before = private_path.read_bytes()
    with pytest.raises(FileExistsError):
        generate_key(private_path)
    assert private_path.read_bytes() == before


def test_generate_key_is_0600_even_with_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_key(tmp_path / "k.pem")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_state_directory_keys_are_written_by_the_same_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint key and the state directory's keys (IdP, decision tokens) are written by
    # one function: 0600 from creation, never half a key left behind after a failed write.
    files = ed25519_key_files(tmp_path / "state-key")
    assert stat.S_IMODE(files.signing_key_path.stat().st_mode) == 0o600
    assert load_public_key(files.public_key_path) == files.public_key

    def no_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_disk)
    for create in (
        lambda: ed25519_key_files(tmp_path / "full"),
        lambda: generate_key(tmp_path / "full.pem"),
    ):
        with pytest.raises(OSError, match="No space"):
            create()
    assert not (tmp_path / "full" / "signing-key.pem").exists()
    assert not (tmp_path / "full.pem").exists()
    monkeypatch.undo()
    assert ed25519_key_files(tmp_path / "full").private_key is not None  # a clean retry


def test_loading_non_ed25519_keys_fails(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ec.pub.pem").write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(ValueError):
        load_private_key(tmp_path / "ec.pem")
    with pytest.raises(ValueError):
        load_public_key(tmp_path / "ec.pub.pem")
