"""The broker's process log (certbroker.logs): ``--log-format json`` on a real ``certbroker
serve`` writes one JSON object per line, with the call's ids and never a token or a record's
contents; the text format stays the default; the settings' file and environment forms."""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import grpc
import pytest

from certbroker import config, errors, logs
from certbroker.adapters.demo import synthetic
from certbroker.auth.authenticator import DevIdentityProvider
from certbroker.cli import client
from certbroker.v1 import broker_pb2_grpc
from tests.server.serving import serve

OFFICE = "gz-haizhu-24h-01"
CASE = "GZ20261121-000777"
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def lookups(target: str, state_dir: Path, dataset_dir: Path) -> tuple[object, str, str, str]:
    """An allowed lookup and a denied one: (the answer, the denial's audit entry id, the
    token, the subject)."""
    token = DevIdentityProvider(state_dir).issue("clerk-log", ["window_clerk"], OFFICE)
    subject, _ = synthetic.sample_couple(dataset_dir)
    with grpc.insecure_channel(target) as channel:
        stub = broker_pb2_grpc.CertificateBrokerStub(channel)
        answer = stub.Lookup(
            client.lookup_request("marriage", subject, "BDC-ZY-001", CASE),
            metadata=client.bearer(token),
            timeout=30,
        )
        with pytest.raises(grpc.RpcError) as denied:  # a transfer needs no social security
            stub.Lookup(
                client.lookup_request("social_security", subject, "BDC-ZY-001", CASE),
                metadata=client.bearer(token),
                timeout=30,
            )
    error = client.call_error(denied.value)
    assert error.reason == "POLICY_DENIED"
    return answer, error.metadata["audit_entry_id"], token, subject


def test_json_log_lines_carry_the_calls_ids(tmp_path: Path, dataset_dir: Path) -> None:
    s = serve(
        tmp_path,
        dataset_dir,
        *("--port", "0", "--metrics-port", "0", "--log-format", "json", "--log-level", "debug"),
    )
    try:
        answer, denied_entry, token, subject = lookups(s.target, s.state_dir, dataset_dir)
    finally:
        assert s.stop() == 0
    records = s.json_log()  # every line of stderr is one JSON object
    assert len(records) > 3
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert TIME.fullmatch(str(record["time"])), record
    assert any(r["message"].startswith("certbroker serving on") for r in records)  # type: ignore[union-attr]

    calls = [r for r in records if r["logger"] == "certbroker.server.calls"]
    ok = next(r for r in calls if r["status"] == "OK")
    assert ok["level"] == "DEBUG"
    assert ok["rpc"] == "Lookup"
    assert ok["decision_id"] == answer.decision_id  # type: ignore[attr-defined]
    assert ok["audit_entry_id"] == answer.receipt.entry_id  # type: ignore[attr-defined]
    assert isinstance(ok["latency_ms"], float)
    refused = next(r for r in calls if r["status"] == "PERMISSION_DENIED")
    assert refused["level"] == "INFO"
    assert refused["reason"] == "POLICY_DENIED"
    assert refused["audit_entry_id"] == denied_entry
    assert "decision_id" not in refused  # a denial has no decision id
    # Records logged inside a call name it too (the authenticator's, here).
    assert any(r["logger"] == "certbroker.auth.authenticator" and r.get("rpc") for r in records)

    text = s.stderr
    assert token not in text
    assert token.split(".")[2] not in text  # not even the signature
    assert subject not in text
    released = [value for _, value in answer.record.marriage.ListFields()]  # type: ignore[attr-defined]
    assert released
    for content in released:
        assert str(content) not in text


def test_text_is_the_default_and_names_the_call(tmp_path: Path, dataset_dir: Path) -> None:
    s = serve(tmp_path, dataset_dir, "--port", "0", "--metrics-port", "0")
    try:
        _, denied_entry, _, _ = lookups(s.target, s.state_dir, dataset_dir)
    finally:
        assert s.stop() == 0
    lines = s.stderr.splitlines()
    assert not any(line.startswith("{") for line in lines)
    (refused,) = [line for line in lines if "certbroker.server.calls" in line]
    assert " INFO certbroker.server.calls: Lookup PERMISSION_DENIED POLICY_DENIED in " in refused
    assert f"audit_entry_id={denied_entry}" in refused
    assert "OK in" not in s.stderr  # successful calls are logged at DEBUG only


def test_the_log_settings(tmp_path: Path) -> None:
    file = tmp_path / "b.toml"
    file.write_text('[server]\nlog_format = "json"\nlog_level = "debug"\nshutdown_grace_s = 3\n')
    loaded = config.load(file, env={})
    assert (loaded.log_format, loaded.log_level, loaded.shutdown_grace_s) == ("json", "debug", 3)
    env = {"CERTBROKER_LOG_FORMAT": "json", "CERTBROKER_SHUTDOWN_GRACE_S": "2.5"}
    assert config.load(None, env=env).log_format == "json"
    assert config.load(None, env=env).shutdown_grace_s == 2.5
    defaults = config.load(None, env={})
    assert (defaults.log_format, defaults.log_level, defaults.shutdown_grace_s) == (
        "text",
        "info",
        10.0,
    )
    for bad, message in [
        ({"log_format": "xml"}, "log_format"),
        ({"log_level": "loud"}, "log_level"),
        ({"shutdown_grace_s": -1.0}, "shutdown_grace_s"),
    ]:
        with pytest.raises(config.ConfigError, match=message):
            config.load(None, env={}, **bad)


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.getLogger("certbroker.test").makeRecord(
        "certbroker.test", logging.WARNING, __file__, 1, message, (), None, extra=extra
    )
    return record


def test_the_json_formatter_writes_one_line_and_only_its_fields() -> None:
    formatter = logs.JsonFormatter({"worker": 3})
    try:
        raise errors.Unavailable("X", "first line\nsecond line")
    except errors.Unavailable:
        record = _record("two\nlines", token="secret-token", audit_entry_id="e1")
        record.exc_info = sys.exc_info()
    line = formatter.format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "two\nlines"
    assert out["audit_entry_id"] == "e1"
    assert out["worker"] == 3
    assert "second line" in out["exception"]
    assert "secret-token" not in line  # only the documented fields are copied out

    call = logs.CallLog("Lookup")
    token = logs.enter_call(call)
    try:
        logs.annotate(decision_id="d1")
        inside = json.loads(formatter.format(_record("inside")))
    finally:
        logs.leave_call(token)
    assert (inside["rpc"], inside["decision_id"]) == ("Lookup", "d1")
    assert "rpc" not in json.loads(formatter.format(_record("outside")))
