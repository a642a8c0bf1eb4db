"""`certbroker citizen accesses|dispute` against a real broker, `certbroker token issue
--citizen`, and `certbroker notify tail` against a real NATS JetStream server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from certbroker.adapters.demo import synthetic
from certbroker.citizen.relay import NatsPublisher
from certbroker.cli.main import main
from tests.citizen.nats_support import NatsServer, nats_server
from tests.citizen.support import lookup
from tests.helpers import Env, make_config, running_env


@pytest.fixture
def broker(tmp_path: Path, dataset_dir: Path) -> Iterator[Env]:
    with running_env(make_config(tmp_path, dataset_dir), dataset_dir) as env:
        yield env


def test_accesses_and_dispute_from_the_terminal(
    broker: Env, dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = synthetic.sample_citizens(dataset_dir, 1)[0]
    allowed = lookup(broker, "marriage", me)
    denied = lookup(broker, "social_security", me)
    assert main(["token", "issue", "--state-dir", str(broker.state_dir), "--citizen", me]) == 0
    token = capsys.readouterr().out.strip()
    target = ["--target", broker.broker.target, "--token", token]
    assert main(["citizen", "accesses", *target]) == 0
    out = capsys.readouterr().out
    assert f"entry={allowed}" in out
    assert f"entry={denied}" in out
    assert "婚姻登记信息" in out
    assert "2 access(es) to your records" in out
    assert main(["citizen", "accesses", "--json", *target]) == 0
    assert {a["entry_id"] for a in json.loads(capsys.readouterr().out)} == {allowed, denied}
    assert main(["citizen", "dispute", allowed, "--text", "不是我", *target]) == 0
    assert f"disputed {allowed}" in capsys.readouterr().out
    assert main(["citizen", "dispute", "f" * 32, *target]) == 1
    assert "ENTRY_NOT_FOUND" in capsys.readouterr().err
    assert main(["citizen", "accesses", "--target", broker.broker.target, "--token", ""]) == 2


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path) as server:
        yield server


def test_notify_tail_prints_each_notice_once_in_chinese(
    nats: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    notices = [
        {
            "entry_id": f"{i:032x}",
            "subject_id": "110101199003070011",
            "time": "2026-03-02T06:05:00.000Z",
            "office": "gz-haizhu-24h-01",
            "clerk": "clerk-0417" if i == 1 else "",
            "matter_code": "BDC-ZY-001",
            "matter_name": "不动产转移登记",
            "record_type": "marriage",
            "record_label": "婚姻登记信息",
            "decision": "allow" if i == 1 else "deny",
        }
        for i in (1, 2)
    ]

    async def publish() -> None:
        publisher = NatsPublisher(nats.url, "CERTBROKER_NOTICES", "certbroker.notices")
        for notice in [*notices, notices[0]]:
            payload = json.dumps(notice, ensure_ascii=False).encode()
            await publisher.publish(notice["entry_id"], "marriage", payload)
        # The same notice again under another key (as after the dedup window): still once.
        await publisher.publish("redelivered", "marriage", json.dumps(notices[0]).encode())
        await publisher.aclose()

    asyncio.run(publish())
    assert main(["notify", "tail", "--nats-url", nats.url, "--all", "--idle-timeout", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "您的婚姻登记信息于 2026年03月02日 14:05 被 gz-haizhu-24h-01 窗口（工号 clerk-0417）"
        "为办理 不动产转移登记 调取",
        "您的婚姻登记信息于 2026年03月02日 14:05 被 gz-haizhu-24h-01 窗口为办理 不动产转移登记 "
        "申请调取，未获准许",
    ]
