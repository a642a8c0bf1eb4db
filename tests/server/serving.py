"""``certbroker serve`` as a real process for the server tests: started, read, signalled."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from certbroker import config

CLI = [sys.executable, "-m", "certbroker"]
ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 90.0  # generous: several engineers share two cores; never an assertion about speed


@dataclass
class Serve:
    """A ``certbroker serve`` process and what it printed."""

    proc: subprocess.Popen[str]
    state_dir: Path
    log: Path
    lines: queue.Queue[str]
    pump: threading.Thread
    port: int = 0
    metrics_port: int = 0
    stdout: list[str] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self) -> bool:
        """Wait for the READY line (True) or the process's exit (False)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and not self.pump.is_alive():
                    return False
                continue
            self.stdout.append(line)
            if m := re.match(r"READY port=(\d+) metrics_port=(\d+)", line):
                self.port, self.metrics_port = int(m[1]), int(m[2])
                return True
        pytest.fail(f"serve neither became ready nor exited:\n{self.log.read_text()}")

    def signal(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self) -> int:
        """The exit status, once the process (and every worker sharing its stdout) is gone."""
        code = self.proc.wait(WAIT_S)
        self.pump.join(WAIT_S)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while not self.lines.empty():
            self.stdout.append(self.lines.get_nowait())
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.wait()

    @property
    def stderr(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def json_log(self) -> list[dict[str, object]]:
        """Every stderr line, parsed: fails the test on a line that is not one JSON object."""
        records = []
        for line in self.stderr.splitlines():
            record = json.loads(line)
            assert isinstance(record, dict), line
            records.append(record)
        return records


def _pump(stream: Iterator[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def spawn(
    tmp_path: Path,
    dataset_dir: Path,
    *args: str,
    name: str = "serve",
    state_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> Serve:
    """Start ``certbroker serve ARGS`` (state in ``tmp_path/<name>`` unless given; stderr in
    ``tmp_path/<name>.log``) without waiting for it."""
    state = state_dir or tmp_path / name
    log = tmp_path / f"{name}.log"
    full_env = {**os.environ, "CERTBROKER_DATASET_DIR": str(dataset_dir), **(env or {})}
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [*CLI, "serve", "--state-dir", str(state), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=full_env,
        )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    return Serve(proc, state, log, lines, pump)


def serve(tmp_path: Path, dataset_dir: Path, *args: str, **kw: object) -> Serve:
    """:func:`spawn`, then wait until it serves (fails the test if it exits instead)."""
    s = spawn(tmp_path, dataset_dir, *args, **kw)  # type: ignore[arg-type]
    if not s.wait_ready():
        code = s.wait()
        pytest.fail(f"serve exited {code} before READY:\n{s.stderr}")
    return s


def run_serve(
    tmp_path: Path, dataset_dir: Path, *args: str, name: str
) -> tuple[int, Sequence[str], str]:
    """A ``serve`` expected to fail: (exit status, stdout lines, stderr)."""
    s = spawn(tmp_path, dataset_dir, *args, name=name)
    if s.wait_ready():
        s.stop()
        pytest.fail(f"{name} started:\n{''.join(s.stdout)}")
    return s.wait(), s.stdout, s.stderr


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A /metrics endpoint's samples by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def wait_until(what: str, condition: object, timeout: float = WAIT_S) -> None:
    """Poll ``condition()`` (observable effects of another process) until true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def private_policies(tmp_path: Path) -> Path:
    """A copy of the shipped policies, for a test that edits them."""
    path = tmp_path / "policies"
    subprocess.run(["cp", "-r", str(config.DEFAULT_POLICY_DIR), str(path)], check=True)
    return path
