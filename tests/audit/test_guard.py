"""No audit, no answer (certbroker.audit.guard), on a real SQLite audit log.

Each test runs a call body inside ``AuditedCall`` and checks what reached the log and what
left the block: the answer only after its entry, one entry per call whatever the ending, and
UNAVAILABLE instead of anything unaudited.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from certbroker import audit, errors
from certbroker.audit.events import AuditEvent
from certbroker.audit.guard import AuditedCall, Batch, Result, invocation_metadata, outcome

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def event(result: Result, **overrides: Any) -> AuditEvent:
    """The entry a test call describes: its outcome and status as the guard reports them."""
    fields: dict[str, Any] = {
        "kind": "guard_test",
        "clerk": "clerk-1",
        "office": "office-1",
        "roles": ("window_clerk",),
        "subject_id": "",
        "matter_code": "",
        "case_number": "",
        "consent_method": "",
        "record_type": "",
        "decision": "allow" if result.failure is None else "",
        "rule_id": "guard.test",
        "withheld_fields": (),
        "outcome": result.outcome,
        "status": result.status,
        "policy_version": "v1",
        "department": "",
        "latency_ms": result.latency_ms,
        "decision_id": "",
    }
    fields.update(overrides)
    return AuditEvent(**fields)


def stored(path: Path) -> list[audit.AuditEntry]:
    return audit.query(path, audit.QueryFilter(limit=1000))


def refuse_writes(path: Path, when: str = "1") -> None:
    """Make inserts into the log (those matching ``when``) fail, as a full disk would."""
    with sqlite3.connect(path) as db:
        db.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON audit_log WHEN {when} "
            "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
        )


class Recording:
    """The real log, noting in ``order`` when each append has returned (is durable)."""

    def __init__(self, log: audit.BatchingAuditLog, order: list[str]) -> None:
        self._log = log
        self._order = order

    async def append(self, ev: AuditEvent) -> audit.Receipt:
        receipt = await self._log.append(ev)
        self._order.append("written")
        return receipt

    async def append_many(
        self,
        events: Sequence[AuditEvent],
        *,
        link: Callable[[list[str]], AuditEvent] | None = None,
    ) -> list[audit.Receipt]:
        receipts = await self._log.append_many(events, link=link)
        self._order.append("written")
        return receipts

    async def aclose(self) -> None:
        await self._log.aclose()


def test_the_entry_is_written_before_the_answer(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    order: list[str] = []
    finished: list[str] = []
    appended: list[float] = []

    async def main() -> str:
        async with audit.SQLiteAuditLog(path) as log:
            async with AuditedCall(
                Recording(log, order),
                event,
                on_append=appended.append,
                on_finish=lambda status, _s: finished.append(status),
            ) as call:
                order.append("work")
                answer = "the record"
            order.append("answer")  # the first line that could send the answer
            (entry,) = stored(path)  # and by then the entry is durable, on disk
            assert entry.entry_id == call.receipt.entry_id
            assert entry.sequence == call.receipt.sequence
            return answer

    assert run(main()) == "the record"
    assert order == ["work", "written", "answer"]
    (entry,) = stored(path)
    assert (entry.event.outcome, entry.event.status, entry.event.decision) == ("OK", "OK", "allow")
    assert entry.event.latency_ms >= 0
    assert finished == ["OK"]
    assert len(appended) == 1
    assert audit.verify_chain(path).ok


def test_a_broker_error_is_raised_after_its_one_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    denial = errors.PermissionDenied("POLICY_DENIED", "no rule allows this", rule="r1")
    finished: list[str] = []

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            with pytest.raises(errors.PermissionDenied) as info:
                async with AuditedCall(
                    log, event, on_finish=lambda status, _s: finished.append(status)
                ):
                    raise denial
            assert info.value is denial  # the caller gets the error itself, reason and all
            (entry,) = stored(path)
            assert denial.metadata == {"rule": "r1", "audit_entry_id": entry.entry_id}

    run(main())
    (entry,) = stored(path)
    assert (entry.event.outcome, entry.event.status) == ("POLICY_DENIED", "PERMISSION_DENIED")
    assert finished == ["PERMISSION_DENIED"]


def test_an_unwritable_entry_means_unavailable_and_no_answer(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    answered: list[str] = []
    undone: list[str] = []
    finished: list[str] = []
    appended: list[float] = []
    calls: list[AuditedCall] = []

    async def undo() -> None:
        undone.append("registration")

    async def lookup(log: audit.BatchingAuditLog) -> AuditedCall:
        call = AuditedCall(
            log,
            event,
            on_append=appended.append,
            on_finish=lambda status, _s: finished.append(status),
        )
        calls.append(call)
        async with call:
            call.undo_unless_audited(undo)
            answer = "the record"
        answered.append(answer)  # never reached
        return call

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            refuse_writes(path)
            with pytest.raises(errors.Unavailable) as info:
                await lookup(log)
            assert info.value.reason == "AUDIT_UNAVAILABLE"
            (call,) = calls
            assert not call.written
            with pytest.raises(RuntimeError):
                call.receipt  # noqa: B018 - there is none to read

    run(main())
    assert answered == []
    assert undone == ["registration"]  # a change must not stay without its entry
    assert finished == ["UNAVAILABLE"]
    assert appended == []
    assert stored(path) == []


def test_an_unwritable_entry_hides_the_error_too(tmp_path: Path) -> None:
    """Not even a denial's reason leaves unaudited: the caller learns only UNAVAILABLE."""
    path = tmp_path / "audit.sqlite"

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            refuse_writes(path)
            with pytest.raises(errors.Unavailable) as info:
                async with AuditedCall(log, event):
                    raise errors.PermissionDenied("POLICY_DENIED", "rule r1 says no")
            assert info.value.reason == "AUDIT_UNAVAILABLE"
            assert "r1" not in info.value.message

    run(main())
    assert stored(path) == []


def test_an_unexpected_exception_is_a_generic_internal_error_with_an_entry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.sqlite"

    async def main() -> errors.BrokerError:
        async with audit.SQLiteAuditLog(path) as log:
            with pytest.raises(errors.Internal) as info:
                async with AuditedCall(log, event):
                    raise RuntimeError("adapter exploded with secret 42")
            return info.value

    with caplog.at_level(logging.ERROR):
        err = run(main())
    assert (err.reason, err.message) == ("INTERNAL", "internal error")
    code, message, _ = errors.to_status(err)
    assert (code, message) == (grpc.StatusCode.INTERNAL, "internal error")
    assert "secret" not in message
    (entry,) = stored(path)
    assert err.metadata == {"audit_entry_id": entry.entry_id}
    assert (entry.event.outcome, entry.event.status) == ("INTERNAL", "INTERNAL")
    # The traceback goes to the log only.
    assert any("secret 42" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_a_batch_is_written_as_one_unit(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"

    def describe(result: Result) -> Batch:
        items = [event(result, subject_id=s) for s in ("a", "b")]
        return Batch(items, link=lambda ids: event(result, decision_id=",".join(ids)))

    async def main() -> list[audit.Receipt]:
        async with audit.SQLiteAuditLog(path) as log:
            async with AuditedCall(log, describe) as call:
                pass
            return call.receipts

    receipts = run(main())
    first, second, bundle = stored(path)
    assert [r.entry_id for r in receipts] == [first.entry_id, second.entry_id, bundle.entry_id]
    assert bundle.event.decision_id == f"{first.entry_id},{second.entry_id}"

    refused = tmp_path / "refused.sqlite"

    async def refused_batch() -> None:
        async with audit.SQLiteAuditLog(refused) as log:
            refuse_writes(refused, when="NEW.decision_id != ''")  # only the bundle entry
            with pytest.raises(errors.Unavailable):
                async with AuditedCall(log, describe):
                    pass

    run(refused_batch())
    assert stored(refused) == []  # the items were not kept without their bundle entry


def test_outcomes_left_out_of_the_log_pass_through_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    undone: list[str] = []

    async def undo() -> None:
        undone.append("heartbeat")

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            async with AuditedCall(log, lambda _result: None) as call:
                call.undo_unless_audited(undo)
            assert not call.written
            assert undone == []  # left out on purpose is not a failure to audit
            invalid = errors.InvalidArgument("BAD_ENDPOINT", "endpoint is not host:port")
            with pytest.raises(errors.InvalidArgument) as info:
                async with AuditedCall(log, lambda _result: None):
                    raise invalid
            assert info.value is invalid
            assert "audit_entry_id" not in invalid.metadata

    run(main())
    assert stored(path) == []


def test_no_log_or_a_malformed_entry_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    answered: list[str] = []

    async def main() -> None:
        with pytest.raises(errors.Unavailable) as info:
            async with AuditedCall(None, event):  # no audit log attached yet
                answered.append("no log")
        assert info.value.reason == "AUDIT_UNAVAILABLE"
        async with audit.SQLiteAuditLog(path) as log:
            with pytest.raises(errors.Unavailable) as info:
                async with AuditedCall(log, lambda r: event(r, decision="maybe")):
                    answered.append("malformed")
            assert info.value.reason == "AUDIT_UNAVAILABLE"

            def broken(result: Result) -> AuditEvent:
                raise KeyError("describe has a bug")

            with pytest.raises(errors.Unavailable):
                async with AuditedCall(log, broken):
                    answered.append("broken")

    run(main())
    assert answered == ["no log", "malformed", "broken"]  # the work ran; nothing left
    assert stored(path) == []


def test_a_cancelled_call_writes_nothing_and_keeps_no_change(tmp_path: Path) -> None:
    path = tmp_path / "audit.sqlite"
    undone: list[str] = []

    async def undo() -> None:
        undone.append("registration")

    async def main() -> None:
        async with audit.SQLiteAuditLog(path) as log:
            started = asyncio.Event()

            async def call() -> None:
                async with AuditedCall(log, event) as guard:
                    guard.undo_unless_audited(undo)
                    started.set()
                    await asyncio.sleep(60)

            task = asyncio.create_task(call())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())
    assert stored(path) == []
    assert undone == ["registration"]


def test_outcome_and_invocation_metadata() -> None:
    assert outcome(None) == ("OK", "OK")
    assert outcome(errors.NotFound("NO_CHECKPOINT", "none yet")) == ("NO_CHECKPOINT", "NOT_FOUND")
    assert outcome(ValueError("x")) == ("INTERNAL", "INTERNAL")

    class Context:
        def __init__(self, metadata: Any) -> None:
            self._metadata = metadata

        def invocation_metadata(self) -> Any:
            return self._metadata

    pairs = (("authorization", "Bearer t"),)
    assert invocation_metadata(Context(pairs)) == pairs  # type: ignore[arg-type]
    assert invocation_metadata(Context(None)) == ()  # type: ignore[arg-type]
