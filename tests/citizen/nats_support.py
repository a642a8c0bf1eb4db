"""A real NATS server with JetStream for the notice tests: our own ``nats-server`` process on a
free loopback port with a temporary store, so a test can stop and restart it.

Missing server or client: the test is skipped -- or fails under ``CI=true``, where `.ci/run`
installs both.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
_LISTENING = re.compile(r"Listening for client connections on [\d.]+:(\d+)")


def _unavailable(message: str) -> Any:
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class NatsServer:
    """One nats-server process; :meth:`restart` brings it back on the same port and store."""

    store: Path
    port: int = -1  # -1: nats-server picks a free port, read from its log
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.store.parent / "nats-server.log"
        log.unlink(missing_ok=True)
        args = [SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)]
        self.process = subprocess.Popen(
            [*args, "-l", str(log)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        # The log says where it listens once JetStream is up (it starts JetStream first).
        end = time.monotonic() + 30
        while time.monotonic() < end and self.process.poll() is None:
            match = _LISTENING.search(log.read_text() if log.exists() else "")
            if match:
                self.port = int(match.group(1))
                return
            time.sleep(0.05)
        self.stop()
        pytest.fail("nats-server did not start:\n" + (log.read_text() if log.exists() else ""))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def nats_server(tmp: Path) -> Iterator[NatsServer]:
    """A started server with JetStream, stopped on exit."""
    if not Path(SERVER).exists():
        _unavailable(f"{SERVER} not installed")
    try:
        import nats  # noqa: F401
    except ImportError as exc:
        _unavailable(f"nats-py not installed: {exc}")
    server = NatsServer(tmp / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stream_messages(
    url: str, stream: str = "CERTBROKER_NOTICES"
) -> list[tuple[str, dict[str, Any]]]:
    """Every message in ``stream``: (its Nats-Msg-Id header, its JSON payload), in order."""

    async def read() -> list[tuple[str, dict[str, Any]]]:
        import nats

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            total = (await js.stream_info(stream)).state.messages
            out: list[tuple[str, dict[str, Any]]] = []
            for seq in range(1, total + 1):
                msg = await js.get_msg(stream, seq)
                headers = msg.headers or {}
                out.append((headers.get("Nats-Msg-Id", ""), json.loads(msg.data or b"{}")))
            return out
        finally:
            await nc.close()

    return asyncio.run(read())
