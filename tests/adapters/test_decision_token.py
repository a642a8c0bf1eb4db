"""The SDK's check of the broker's decision token: the verifier, and the servicer using it."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from certbroker.adapters import sdk
from certbroker.contract import resident_id
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests.adapters.tokens import BrokerKey

SUBJECT = resident_id.make("440106", dt.date(1979, 4, 5), 31)
OTHER = resident_id.make("440106", dt.date(1981, 7, 8), 42)
DEPT = "civil_affairs"
ALLOWED = ("marital_status", "spouse_name")
MARRIAGE = {
    "marital_status": "已婚",
    "spouse_name": "陈静",
    "spouse_resident_id": OTHER,
    "certificate_number": "J440106-2005-000777",
}


@pytest.fixture(scope="module")
def key() -> BrokerKey:
    return BrokerKey()


@pytest.fixture(scope="module")
def verifier(key: BrokerKey) -> sdk.DecisionTokenVerifier:
    return sdk.DecisionTokenVerifier(key.public)


def request(
    fields: Sequence[str] = ALLOWED,
    subject: str = SUBJECT,
    record_type: str = "marriage",
    decision_id: str = "dec-7",
) -> adapter_pb2.FetchRequest:
    return adapter_pb2.FetchRequest(
        record_type=record_type, subject_id=subject, fields=list(fields), decision_id=decision_id
    )


def claim(key: BrokerKey, name: str, value: Any) -> str:
    """A valid token with one raw claim replaced (None: dropped)."""
    return token(key, replace={name: value})


def token(key: BrokerKey, **overrides: Any) -> str:
    claims: dict[str, Any] = {
        "department": DEPT,
        "subject_id": SUBJECT,
        "record_type": "marriage",
        "fields": ALLOWED,
        "decision_id": "dec-7",
    }
    claims.update(overrides)
    return key.mint(**claims)


# -- the verifier ------------------------------------------------------------------------------


def test_a_valid_token_yields_the_decision(
    key: BrokerKey, verifier: sdk.DecisionTokenVerifier
) -> None:
    decision = verifier.verify(token(key), request(), {DEPT})
    assert decision.decision_id == "dec-7"
    assert decision.department == DEPT
    assert decision.subject_id == SUBJECT
    assert decision.record_type == "marriage"
    assert decision.fields == ALLOWED
    assert decision.expires_at > time.time()


def test_a_request_for_fewer_fields_than_allowed_is_covered(
    key: BrokerKey, verifier: sdk.DecisionTokenVerifier
) -> None:
    verifier.verify(token(key), request(["spouse_name"]), {DEPT})
    verifier.verify(token(key), request([]), {DEPT})


@pytest.mark.parametrize("missing", [None, ""])
def test_a_missing_token_is_unauthenticated(
    verifier: sdk.DecisionTokenVerifier, missing: str | None
) -> None:
    with pytest.raises(sdk.DecisionTokenMissing) as caught:
        verifier.verify(missing, request(), {DEPT})
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "DECISION_TOKEN_MISSING"


def hs256_with_public_key(key: BrokerKey) -> str:
    # The classic confusion attack: an HMAC keyed with the (public) verification key.
    claims = jwt.decode(token(key), options={"verify_signature": False})
    return jwt.encode(claims, "not-the-key-but-pretending-to-be-" * 2, algorithm="HS256")


def unsigned(key: BrokerKey) -> str:
    _, payload, _ = token(key).split(".")
    none_header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    return f"{none_header}.{payload}."


def tampered(key: BrokerKey) -> str:
    # A valid token for one field, its payload swapped for one claiming more.
    header, _, signature = token(key, fields=["marital_status"]).split(".")
    _, payload, _ = token(key).split(".")
    return f"{header}.{payload}.{signature}"


INVALID: dict[str, Callable[[BrokerKey], str]] = {
    "forged with another key": lambda k: BrokerKey().mint(
        department=DEPT,
        subject_id=SUBJECT,
        record_type="marriage",
        fields=ALLOWED,
        decision_id="dec-7",
    ),
    "forged with another key under our kid": lambda k: BrokerKey().mint(
        department=DEPT,
        subject_id=SUBJECT,
        record_type="marriage",
        fields=ALLOWED,
        decision_id="dec-7",
        headers={"kid": k.kid},
    ),
    "tampered payload": tampered,
    "expired": lambda k: token(k, iat=time.time() - 60, ttl_s=30),
    "issued in the future": lambda k: token(k, iat=time.time() + 60),
    "wrong audience": lambda k: token(k, department="public_security"),
    "audience as a list": lambda k: claim(k, "aud", [DEPT, "public_security"]),
    "wrong issuer": lambda k: claim(k, "iss", "someone-else"),
    "lives too long": lambda k: token(k, ttl_s=3600),
    "HS256": hs256_with_public_key,
    "alg none": unsigned,
    "fields not a list": lambda k: claim(k, "fields", "marital_status"),
    "fields not strings": lambda k: claim(k, "fields", [1, 2]),
    "did not a string": lambda k: claim(k, "did", 7),
    "times not numbers": lambda k: claim(k, "exp", str(int(time.time()) + 20)),
    "garbage": lambda k: "not.a.jwt",
}
for _claim in ("iss", "aud", "sub", "rt", "fields", "did", "iat", "exp"):
    INVALID[f"no {_claim}"] = partial(claim, name=_claim, value=None)


@pytest.mark.parametrize("case", sorted(INVALID))
def test_bad_tokens_are_invalid(
    key: BrokerKey, verifier: sdk.DecisionTokenVerifier, case: str
) -> None:
    with pytest.raises(sdk.DecisionTokenInvalid) as caught:
        verifier.verify(INVALID[case](key), request(), {DEPT})
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == "DECISION_TOKEN_INVALID"
    assert SUBJECT not in caught.value.message


def test_clock_skew_within_the_leeway_is_tolerated(
    key: BrokerKey, verifier: sdk.DecisionTokenVerifier
) -> None:
    now = time.time()
    verifier.verify(token(key, iat=now - 33, ttl_s=30), request(), {DEPT})  # expired 3 s ago
    verifier.verify(token(key, iat=now + 3), request(), {DEPT})  # issued 3 s "from now"


MISMATCHES = {
    "another subject": request(subject=OTHER),
    "another record type": request(record_type="household", fields=["name"]),
    "another decision": request(decision_id="dec-8"),
    "more fields than allowed": request([*ALLOWED, "spouse_resident_id"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_token_for_another_request_is_a_mismatch(
    key: BrokerKey, verifier: sdk.DecisionTokenVerifier, case: str
) -> None:
    with pytest.raises(sdk.DecisionTokenMismatch) as caught:
        verifier.verify(token(key), MISMATCHES[case], {DEPT})
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == "DECISION_TOKEN_MISMATCH"
    assert SUBJECT not in caught.value.message
    assert OTHER not in caught.value.message


def test_public_key_loading(tmp_path: Path, key: BrokerKey) -> None:
    good = key.write_public(tmp_path / "broker.pem")
    assert sdk.DecisionTokenVerifier.from_pem_file(good).kid == key.kid
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(ec_pem)
    with pytest.raises(ValueError, match=r"ec\.pem: not an Ed25519 public key"):
        sdk.load_public_key(tmp_path / "ec.pem")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(ValueError, match=r"junk\.pem: cannot load"):
        sdk.load_public_key(tmp_path / "junk.pem")
    with pytest.raises(ValueError, match=r"absent\.pem: cannot load"):
        sdk.load_public_key(tmp_path / "absent.pem")


def test_the_sdk_accepts_what_the_broker_mints(tmp_path: Path) -> None:
    # Interoperability with the other side of the contract: the broker's own minting code.
    from certbroker.routing import decision_token

    signer = decision_token.DecisionSigner(tmp_path / "state")
    verifier = sdk.DecisionTokenVerifier.from_pem_file(signer.public_key_path)
    assert verifier.kid == signer.kid
    minted = signer.mint(
        department=DEPT,
        subject_id=SUBJECT,
        record_type="marriage",
        fields=list(ALLOWED),
        decision_id="dec-7",
    )
    assert verifier.verify(minted, request(), {DEPT}).fields == ALLOWED


# -- the servicer over gRPC --------------------------------------------------------------------


class Marriages:
    department = DEPT
    record_type = "marriage"

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        self.calls.append(tuple(fields))
        return MARRIAGE  # everything: the SDK must filter


async def call(
    adapter: Marriages,
    verifier: sdk.DecisionTokenVerifier,
    req: adapter_pb2.FetchRequest,
    metadata: Sequence[tuple[str, str]] = (),
) -> adapter_pb2.FetchResponse | grpc.aio.AioRpcError:
    server, port = await sdk.serve([adapter], verifier=verifier)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            try:
                reply: adapter_pb2.FetchResponse = await stub.Fetch(
                    req, metadata=tuple(metadata), timeout=10
                )
            except grpc.aio.AioRpcError as error:
                return error
            return reply
    finally:
        await server.stop(None)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info.reason


def test_service_serves_only_the_fields_the_token_allows(
    run: Callable,
    key: BrokerKey,
    verifier: sdk.DecisionTokenVerifier,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="certbroker.adapters.sdk")
    adapter = Marriages()
    md = [(sdk.METADATA_KEY, token(key))]
    reply = run(call(adapter, verifier, request(["spouse_name"]), md))
    assert isinstance(reply, adapter_pb2.FetchResponse)
    fields = {f.name for f, _ in reply.record.marriage.ListFields()}
    assert fields == {"spouse_name"}
    assert adapter.calls == [("spouse_name",)]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "decision_id='dec-7'" in logged
    assert SUBJECT not in logged
    assert "陈静" not in logged


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("missing", grpc.StatusCode.UNAUTHENTICATED, "DECISION_TOKEN_MISSING"),
        ("forged", grpc.StatusCode.UNAUTHENTICATED, "DECISION_TOKEN_INVALID"),
        ("expired", grpc.StatusCode.UNAUTHENTICATED, "DECISION_TOKEN_INVALID"),
        ("wrong audience", grpc.StatusCode.UNAUTHENTICATED, "DECISION_TOKEN_INVALID"),
        ("two tokens", grpc.StatusCode.UNAUTHENTICATED, "DECISION_TOKEN_INVALID"),
        ("fields superset", grpc.StatusCode.PERMISSION_DENIED, "DECISION_TOKEN_MISMATCH"),
        ("another subject", grpc.StatusCode.PERMISSION_DENIED, "DECISION_TOKEN_MISMATCH"),
    ],
)
def test_service_refuses_calls_the_token_does_not_cover(
    run: Callable,
    key: BrokerKey,
    verifier: sdk.DecisionTokenVerifier,
    caplog: pytest.LogCaptureFixture,
    case: str,
    code: grpc.StatusCode,
    reason: str,
) -> None:
    caplog.set_level(logging.INFO, logger="certbroker.adapters.sdk")
    req = request()
    metadata = {
        "missing": [],
        "forged": [(sdk.METADATA_KEY, INVALID["forged with another key"](key))],
        "expired": [(sdk.METADATA_KEY, INVALID["expired"](key))],
        "wrong audience": [(sdk.METADATA_KEY, INVALID["wrong audience"](key))],
        "two tokens": [(sdk.METADATA_KEY, token(key)), (sdk.METADATA_KEY, token(key))],
        "fields superset": [(sdk.METADATA_KEY, token(key, fields=["marital_status"]))],
        "another subject": [(sdk.METADATA_KEY, token(key, subject_id=OTHER))],
    }[case]
    adapter = Marriages()
    error = run(call(adapter, verifier, req, metadata))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == code
    assert reason_of(error) == reason
    assert adapter.calls == []  # refused before the department's data was touched
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"outcome={reason}" in logged
    assert SUBJECT not in logged


def test_authentication_comes_before_request_validation(
    run: Callable, verifier: sdk.DecisionTokenVerifier
) -> None:
    # Without a token a caller cannot even learn which record types are served here.
    error = run(call(Marriages(), verifier, request(["name"], record_type="household")))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert reason_of(error) == "DECISION_TOKEN_MISSING"


def test_a_token_for_an_unserved_record_type_is_still_an_unknown_type(
    run: Callable, key: BrokerKey, verifier: sdk.DecisionTokenVerifier
) -> None:
    md = [(sdk.METADATA_KEY, token(key, record_type="household", fields=["name"]))]
    error = run(call(Marriages(), verifier, request(["name"], record_type="household"), md))
    assert isinstance(error, grpc.aio.AioRpcError)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(error) == "UNKNOWN_RECORD_TYPE"
