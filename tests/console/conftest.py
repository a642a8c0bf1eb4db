"""The console's browser tests: one real broker (demo adapters, one department down), one real
``certbroker console`` process, one Chromium (Debian's, driven by Playwright) per module.

Under ``CI=true`` a missing Chromium fails the tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.config import AdapterRoute
from certbroker.v1 import audit_pb2, audit_pb2_grpc
from tests.helpers import ROOT, START_TIMEOUT, Env, make_config, running_env

CHROMIUM = Path("/usr/bin/chromium")
OFFICE = "gz-haizhu-24h-01"
OTHER_OFFICE = "gz-tianhe-hall-01"
CASE = "GZ20261203-000001"
HOSTILE_CASE = "<script>window.pwned=1</script>"
#: Lookups seeded by the window clerk at OFFICE (allowed + denied) beyond the fixed ones.
EXTRA_LOOKUPS = 6


def chromium() -> Path:
    """Debian's Chromium, or skip (fail under CI=true: .ci/run installs it)."""
    if CHROMIUM.exists():
        return CHROMIUM
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Hall:
    """The broker, what was seeded into it, and an auditor's view of its Audit service."""

    env: Env
    subject: str
    other_subject: str

    @property
    def audit(self) -> audit_pb2_grpc.AuditStub:
        return audit_pb2_grpc.AuditStub(self.env.channel)

    def auditor_md(self) -> Any:
        return self.env.md(self.env.token(roles=("auditor",), sub="aud-check", office="audit"))

    def entries(self, **filters: Any) -> list[audit_pb2.AuditEntry]:
        """Every entry matching ``filters`` (paged through), as an auditor sees them."""
        found: list[audit_pb2.AuditEntry] = []
        token = ""
        while True:
            request = audit_pb2.QueryRequest(page_size=1000, page_token=token, **filters)
            page = list(self.audit.Query(request, metadata=self.auditor_md(), timeout=30))
            found += page
            token = page[-1].next_page_token if page else ""
            if not token:
                return found


def _lookup(
    env: Env, md: Any, record_type: str, subject: str, case: str, matter: str = "BDC-ZY-001"
) -> None:
    # Denied and failed lookups are entries too: that is what is seeded.
    with contextlib.suppress(grpc.RpcError):
        env.stub.Lookup(client.lookup_request(record_type, subject, matter, case), metadata=md)


def seed(env: Env, subject: str, other: str) -> None:
    """Lookups of every outcome: answered, denied (a case number that is HTML, none at all),
    failed (social security's department is down), at two offices."""
    clerk = env.md(env.token(sub="clerk-0417", office=OFFICE, name="李敏"))
    _lookup(env, clerk, "household", subject, CASE)
    _lookup(env, clerk, "marriage", subject, CASE)
    _lookup(env, clerk, "property", other, HOSTILE_CASE)  # denied: not a case number
    _lookup(env, clerk, "household", other, "")  # denied, and NO_CASE_NUMBER
    _lookup(env, clerk, "social_security", subject, CASE, "SB-YL-001")  # failed: dept. down
    for i in range(EXTRA_LOOKUPS):
        _lookup(env, clerk, "household", other, f"GZ20261203-00010{i}")
    elsewhere = env.md(
        env.token(sub="clerk-9", roles=("social_security_clerk",), office=OTHER_OFFICE)
    )
    _lookup(env, elsewhere, "marriage", subject, "GZ20261203-000002")  # denied: no rule


@pytest.fixture(scope="module")
def hall(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Iterator[Hall]:
    tmp = tmp_path_factory.mktemp("console-broker")
    down = AdapterRoute("grpc", "127.0.0.1:9")  # nothing listens on the discard port
    routes = {rt: AdapterRoute() for rt in ("household", "property", "marriage")}
    cfg = make_config(tmp, dataset_dir, adapters={**routes, "social_security": down})
    subject, other = synthetic.sample_couple(dataset_dir)
    with running_env(cfg, dataset_dir) as env:
        seed(env, subject, other)
        yield Hall(env, subject, other)


@dataclass
class ConsoleProcess:
    process: subprocess.Popen[str]
    url: str


def start_console(args: list[str], log: Path) -> ConsoleProcess:
    """``python -m certbroker console ARGS --port 0``, once it prints ``READY url=...``."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "certbroker", "console", "--port", "0", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    assert process.stdout is not None
    for _ in range(5):
        ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT)
        line = process.stdout.readline() if ready else ""
        match = re.fullmatch(r"READY url=(\S+)/\n", line)
        if match:
            return ConsoleProcess(process, match.group(1))
        if not line:
            break
    process.kill()
    process.wait()
    process.stdout.close()
    pytest.fail(f"console did not start\n{log.read_text()}")


def stop_console(console: ConsoleProcess) -> None:
    console.process.terminate()
    try:
        assert console.process.wait(15) == 0
    finally:
        if console.process.poll() is None:
            console.process.kill()
        assert console.process.stdout is not None
        console.process.stdout.close()


@pytest.fixture(scope="module")
def console(hall: Hall, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console's base URL (the embedded default: the dev IdP's demo users)."""
    log = tmp_path_factory.mktemp("console") / "console.log"
    cfg = hall.env.broker.config
    proc = start_console(
        ["--state-dir", str(cfg.state_dir), "--broker", hall.env.broker.target], log
    )
    yield proc.url
    stop_console(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    path = chromium()
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(path), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def sign_in(browser: Any, console: str) -> Iterator[Callable[[str], Any]]:
    """``sign_in(user)``: a fresh browser context signed in as a demo user; its page."""
    contexts: list[Any] = []

    def open_as(user: str) -> Any:
        context = browser.new_context(
            base_url=console, locale="zh-CN", viewport={"width": 1280, "height": 900}
        )
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on(
            "console",
            lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.errors = errors
        page.goto("/signin")
        page.click(f"button[data-user={user}]")
        page.wait_for_load_state("networkidle")
        return page

    yield open_as
    for context in contexts:
        context.close()
