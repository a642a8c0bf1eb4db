"""Policy reloads are audit entries: accepted and rejected attempts, and no change unaudited."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from certbroker import audit, config, policy
from certbroker.metrics import Metrics
from certbroker.server.policy_holder import PolicyHolder
from tests.helpers import BrokerThread, make_config


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(config.DEFAULT_POLICY_DIR, target)
    return target


@pytest.fixture
def broker(tmp_path: Path, dataset_dir: Path, policy_dir: Path) -> Iterator[BrokerThread]:
    thread = BrokerThread(make_config(tmp_path, dataset_dir, policy_dir=policy_dir))
    try:
        yield thread
    finally:
        thread.stop()


def reload_entries(db: Path) -> list[audit.AuditEntry]:
    entries = audit.query(db, audit.QueryFilter(limit=100_000))
    return [e for e in entries if e.event.kind == "policy_reload"]


def test_accepted_and_rejected_reloads_are_entries(broker: BrokerThread, policy_dir: Path) -> None:
    assert broker.broker is not None
    holder = broker.broker.policies
    db = broker.config.audit_file
    first = holder.current.version
    rules = policy_dir / "rules.yaml"
    original = rules.read_text()

    rules.write_text(original + "\n# reviewed by the data protection officer\n")
    assert broker.call(holder.reload()) is True
    second = holder.current.version
    assert second != first

    rules.write_text(original + "\n  - id: broken\n    roles: [nobody]\n")
    assert broker.call(holder.reload()) is False
    assert holder.current.version == second  # the invalid set never took effect

    accepted, rejected = reload_entries(db)
    assert accepted.event.rule_id == rejected.event.rule_id == "policy.reload"
    assert (accepted.event.decision, accepted.event.outcome, accepted.event.status) == (
        "allow",
        "OK",
        "OK",
    )
    assert accepted.event.policy_version == second
    assert accepted.event.decision_id == f"old={first};new={second}"
    assert accepted.event.subject_id == str(policy_dir)
    assert (rejected.event.decision, rejected.event.outcome, rejected.event.status) == (
        "deny",
        "POLICY_INVALID",
        "INVALID_ARGUMENT",
    )
    assert rejected.event.policy_version == second
    head, errors = rejected.event.decision_id.split(";errors=", 1)
    assert head == f"old={second};new="
    assert "rules.yaml:" in errors
    assert rejected.sequence > accepted.sequence
    assert audit.verify_chain(db).ok


def test_a_reload_that_cannot_be_audited_changes_nothing(tmp_path: Path, policy_dir: Path) -> None:
    async def main() -> None:
        closed = audit.SQLiteAuditLog(tmp_path / "closed.sqlite")
        await closed.aclose()
        holder = PolicyHolder(policy_dir, Metrics(), closed)
        before = holder.current
        (policy_dir / "rules.yaml").write_text(
            (policy_dir / "rules.yaml").read_text() + "\n# changed\n"
        )
        assert await holder.reload() is False
        assert holder.current is before
        unattached = PolicyHolder(policy_dir, Metrics())
        assert await unattached.reload() is False

    asyncio.run(main())
    assert reload_entries(tmp_path / "closed.sqlite") == []


def test_a_reload_that_crashes_is_audited_and_changes_nothing(
    tmp_path: Path, policy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "audit.sqlite"

    def crash(directory: Path) -> None:
        raise RuntimeError("the disk fell off")

    async def main() -> None:
        async with audit.SQLiteAuditLog(db) as log:
            holder = PolicyHolder(policy_dir, Metrics(), log)
            before = holder.current
            monkeypatch.setattr(policy, "load", crash)
            assert await holder.reload() is False
            assert holder.current is before

    asyncio.run(main())
    (entry,) = reload_entries(db)
    assert (entry.event.decision, entry.event.outcome, entry.event.status) == (
        "deny",
        "INTERNAL",
        "INTERNAL",
    )
    assert "disk" not in entry.event.decision_id  # its text goes to the broker's log only
