"""The ~30-line example adapter (certbroker/adapters/examples/hukou_minimal.py) is complete and
works."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

import grpc
import pytest

from certbroker.adapters import sdk
from certbroker.adapters.demo import synthetic
from certbroker.adapters.examples import hukou_minimal
from certbroker.v1 import adapter_pb2, adapter_pb2_grpc
from tests.adapters.fake_registry import FakeRegistry
from tests.adapters.tokens import BrokerKey
from tests.helpers import start_process

SOURCE = Path(hukou_minimal.__file__)


def code_lines(path: Path) -> int:
    """Lines holding code: no blank lines, comments or the module docstring."""
    text = path.read_text(encoding="utf-8")
    docstring = ast.get_docstring(ast.parse(text), clean=False) or ""
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER}:
            continue
        if tok.type == tokenize.STRING and tok.string.strip("\"'") == docstring:
            continue
        lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines)


def test_the_example_is_about_thirty_lines() -> None:
    assert code_lines(SOURCE) <= 32


def test_the_example_fetches_in_process(dataset_dir: Path, unknown_id: str) -> None:
    adapter = hukou_minimal.Hukou(synthetic.dataset_path(dataset_dir, "household"))
    try:
        husband, _ = synthetic.sample_couple(dataset_dir)
        record = sdk.fetch_record(adapter, husband, ["name", "gender", "registered_address"])
        assert record.household.gender == "男"
        assert record.household.name
        # Asked but not served by this small adapter: present and empty, never invented.
        assert record.household.HasField("registered_address")
        assert record.household.registered_address == ""
        with pytest.raises(sdk.RecordNotFound):
            sdk.fetch_record(adapter, unknown_id, ["name"])
    finally:
        adapter.db.close()


def test_the_example_runs_as_a_full_adapter_process(dataset_dir: Path, tmp_path: Path) -> None:
    key = BrokerKey()
    key_file = key.write_public(tmp_path / "broker.pem")
    credential = tmp_path / "dept.jwt"
    credential.write_text("dept.credential.jwt")
    registry = FakeRegistry()
    db = synthetic.dataset_path(dataset_dir, "household")
    args = ["-m", "certbroker.adapters.examples.hukou_minimal", "--db", str(db), "--port", "0"]
    args += ["--broker-public-key", str(key_file)]
    args += ["--register", registry.target, "--credential-file", str(credential)]
    started = start_process(
        args,
        tmp_path / "example.log",
        "household",
    )
    try:
        subject = synthetic.sample_citizens(dataset_dir, 1)[0]
        token = key.mint(
            department="public_security",
            subject_id=subject,
            record_type="household",
            fields=["name"],
            decision_id="dec-example",
        )
        request = adapter_pb2.FetchRequest(
            record_type="household", subject_id=subject, fields=["name"], decision_id="dec-example"
        )
        with grpc.insecure_channel(started.target) as channel:
            stub = adapter_pb2_grpc.DepartmentAdapterStub(channel)
            reply = stub.Fetch(request, metadata=((sdk.METADATA_KEY, token),), timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Fetch(request, timeout=10)  # no token
        assert reply.department == "public_security"
        assert [f.name for f, _ in reply.record.household.ListFields()] == ["name"]
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert registry.calls[0].request.endpoint == f"127.0.0.1:{started.port}"
    finally:
        assert started.stop() == 0
        registry.stop()
    assert registry.methods()[-1] == "Deregister"
