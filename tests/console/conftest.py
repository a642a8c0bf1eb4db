"""The console's browser tests: one real broker (demo adapters, one department down), one real
``certbroker console`` process, one Chromium (Debian's, driven by Playwright) per module.

Under ``CI=true`` a missing Chromium fails the tests instead of skipping them.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from certbroker.adapters.demo import synthetic
from certbroker.cli import client
from certbroker.config import AdapterRoute, IssuerConfig
from certbroker.v1 import audit_pb2, audit_pb2_grpc
from tests.console.oidc_provider import MiniOidcProvider
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


#: The user the test OIDC provider signs in.
OIDC_USER = {"sub": "oidc-aud-7", "name": "周审计", "roles": ["auditor"], "office": "audit-office"}


@pytest.fixture(scope="module")
def oidc_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MiniOidcProvider]:
    """A real OIDC provider over HTTP, whose access tokens the module's broker trusts."""
    provider = MiniOidcProvider("console-test", OIDC_USER)
    provider.start()
    yield provider
    provider.stop()


@pytest.fixture(scope="module")
def hall(
    tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path, oidc_idp: MiniOidcProvider
) -> Iterator[Hall]:
    tmp = tmp_path_factory.mktemp("console-broker")
    down = AdapterRoute("grpc", "127.0.0.1:9")  # nothing listens on the discard port
    routes = {rt: AdapterRoute() for rt in ("household", "property", "marriage")}
    key = oidc_idp.write_public_key(tmp / "oidc-idp.pem")
    cfg = make_config(
        tmp,
        dataset_dir,
        adapters={**routes, "social_security": down},
        issuers=(IssuerConfig(oidc_idp.issuer, "certbroker", (key,)),),
    )
    subject, other = synthetic.sample_couple(dataset_dir)
    with running_env(cfg, dataset_dir) as env:
        seed(env, subject, other)
        yield Hall(env, subject, other)


@dataclass
class ConsoleProcess:
    process: subprocess.Popen[str]
    url: str
    reader: threading.Thread


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
    stdout = process.stdout
    assert stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:  # a thread: select() on the pipe misses lines Python has buffered
        for line in stdout:
            lines.put(line)
        lines.put("")  # EOF: the process is gone

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    console = ConsoleProcess(process, "", reader)
    with contextlib.suppress(queue.Empty):
        while line := lines.get(timeout=4 * START_TIMEOUT):  # generous: a loaded machine
            match = re.fullmatch(r"READY url=(\S+)/\n", line)
            if match:
                console.url = match.group(1)
                return console
    stop_console(console, expect=None)
    pytest.fail(f"console did not start\n{log.read_text()}")


def stop_console(console: ConsoleProcess, expect: int | None = 0) -> None:
    """SIGTERM; the console exits ``expect`` (0: a clean stop)."""
    console.process.terminate()
    try:
        code = console.process.wait(15)
    finally:
        if console.process.poll() is None:
            console.process.kill()
            console.process.wait()
        console.reader.join(15)
        assert console.process.stdout is not None
        console.process.stdout.close()
    if expect is not None:
        assert code == expect


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
def oidc_console(
    hall: Hall, oidc_idp: MiniOidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second console, signing users in with the OIDC provider (a configuration file)."""
    tmp = tmp_path_factory.mktemp("oidc-console")
    config = tmp / "console.toml"
    config.write_text(
        f"""[server]
state_dir = "{hall.env.broker.config.state_dir}"

[auth]
dev_idp = false

[console]
broker = "{hall.env.broker.target}"
oidc_issuer = "{oidc_idp.issuer}"
oidc_authorize_url = "{oidc_idp.issuer}/authorize"
oidc_token_url = "{oidc_idp.issuer}/token"
oidc_client_id = "{oidc_idp.client_id}"
"""
    )
    proc = start_console(["--config", str(config)], tmp / "console.log")
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
