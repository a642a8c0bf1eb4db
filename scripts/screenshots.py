"""Regenerate the screenshots of docs/console.md (``make screenshots``).

A broker (embedded default, in this process, on a free port) whose audit clock is moved back so
the lookups below spread over the last twelve hours; a ``certbroker console`` process; Debian's
Chromium driven by Playwright, signed in as each demo user, on each main page. Writes
``<out>/*.png`` (1280x800, the page's top).
"""

from __future__ import annotations

import contextlib
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certbroker.adapters.demo import synthetic  # noqa: E402
from certbroker.cli import client  # noqa: E402
from certbroker.v1 import audit_pb2, audit_pb2_grpc  # noqa: E402
from tests.helpers import FakeClock, make_config, running_env  # noqa: E402

HOURS = 12
CLERKS = (
    ("clerk-0417", "李敏", ("window_clerk",), "gz-haizhu-24h-01"),
    ("clerk-0502", "黄丽", ("window_clerk",), "gz-haizhu-24h-01"),
    ("clerk-1103", "吴强", ("property_clerk",), "gz-tianhe-hall-01"),
    ("clerk-1120", "郑洁", ("social_security_clerk",), "gz-yuexiu-hall-02"),
)
PAGES = (
    ("auditor", "/overview", "overview"),
    ("auditor", "/log?decision=deny", "access-log"),
    ("auditor", "/entry/3", "entry"),
    ("auditor", "/report?subject_id={subject}", "citizen-report"),
    ("auditor", "/anomalies", "anomalies"),
    ("auditor", "/verify", "verify"),
    ("supervisor", "/overview", "overview-supervisor"),
    ("security", "/controls", "controls"),
    ("clerk", "", "clerk-refused"),
)


def seed(env: Any, clock: FakeClock, people: list[str]) -> None:
    """A day at four counters: lookups each hour, some refused, one without a case number."""
    rng = random.Random(20261203)  # noqa: S311 - a repeatable day, not a secret
    start = clock.now
    for hour in range(HOURS, -1, -1):
        for _ in range(rng.randint(3, 9)):
            clock.now = start - hour * 3600 + rng.uniform(0, 3000)
            sub, name, roles, office = rng.choice(CLERKS)
            md = env.md(env.token(sub=sub, roles=roles, office=office, name=name))
            record = rng.choice(("household", "marriage", "property", "social_security"))
            matter = "SB-YL-001" if record == "social_security" else "BDC-ZY-001"
            case = f"GZ20261203-{rng.randint(1, 999):06d}" if rng.random() > 0.05 else ""
            request = client.lookup_request(record, rng.choice(people), matter, case)
            with contextlib.suppress(grpc.RpcError):  # refusals are part of the day
                env.stub.Lookup(request, metadata=md)
    clock.now = start


def main(out: Path) -> int:

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        datasets = tmp / "datasets"
        synthetic.generate(datasets)
        people = list(synthetic.sample_couple(datasets))
        clock = FakeClock(time.time())
        with running_env(make_config(tmp, datasets), datasets, audit_clock=clock) as env:
            seed(env, clock, people)
            audit = audit_pb2_grpc.AuditStub(env.channel)
            md = env.md(env.token(roles=("auditor",), sub="aud-01", office="audit-office"))
            audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(fresh=True), metadata=md)
            console = subprocess.Popen(
                [
                    *(sys.executable, "-m", "certbroker", "console", "--port", "0"),
                    *("--state-dir", str(env.state_dir), "--broker", env.broker.target),
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert console.stdout is not None
                url = next(
                    line.split("=", 1)[1].strip().rstrip("/")
                    for line in console.stdout
                    if line.startswith("READY url=")
                )
                shoot(url, out, people[0])
            finally:
                console.terminate()
                console.wait(30)
    return 0


def shoot(url: str, out: Path, subject: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for user, path, name in PAGES:
            context = browser.new_context(
                base_url=url, locale="zh-CN", viewport={"width": 1280, "height": 800}
            )
            page = context.new_page()
            page.goto("/signin")
            page.click(f"button[data-user={user}]")
            page.wait_for_load_state("networkidle")
            if path:
                page.goto(path.format(subject=subject))
                page.wait_for_load_state("networkidle")
            if name == "anomalies" and page.locator("a.drill").count():
                page.locator("a.drill").first.click()
                page.wait_for_selector("td[id^=detail-] #finding")
            page.screenshot(path=str(out / f"{name}.png"))
            print(f"{out / name}.png")
            context.close()
        browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not re.fullmatch(r"[\w./-]+", sys.argv[1]):
        raise SystemExit("usage: screenshots.py OUTPUT_DIR")
    raise SystemExit(main(Path(sys.argv[1])))
