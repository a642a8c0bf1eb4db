"""What every scenario needs: child processes, timing statistics, tables, the results file."""

from __future__ import annotations

import datetime as dt
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

#: Repository root: children run from here so ``python -m certbroker ...`` and
# ``python -m bench.*`` resolve.
ROOT = Path(__file__).resolve().parents[1]
#: Seconds a child process gets to print its READY line.
START_TIMEOUT_S = 60.0


class BenchError(RuntimeError):
    """The benchmark could not run as designed (a child did not start, a call failed)."""


@dataclass(frozen=True)
class Options:
    """How a scenario should run: ``smoke`` = a few calls only; ``rounds`` overrides the count;
    ``figures``: the folder a scenario writes its charts to (set by ``--write``; None: none)."""

    smoke: bool = False
    rounds: int | None = None
    figures: Path | None = None

    def count(self, full: int, smoke: int) -> int:
        """The number of rounds to run: ``rounds`` if given, else ``smoke`` or ``full``."""
        if self.rounds is not None:
            return self.rounds
        return smoke if self.smoke else full


@dataclass(frozen=True)
class Result:
    """A scenario's outcome: a table, a one-line verdict, and how it was measured."""

    section: str  # heading of its section in docs/benchmarks.md
    setup: str  # what ran, in a sentence or two
    header: tuple[str, ...]
    rows: Sequence[tuple[str, ...]]
    verdict: str = ""
    notes: list[str] = field(default_factory=list)


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0 < q ≤ 100) by the nearest-rank method."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table, padded so it also reads well in a terminal; numbers right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    # A column of numbers stays one when some rows have none ("-": the row could not run).
    numeric = [
        all(_is_number(r[i]) or r[i] == "-" for r in rows) and any(_is_number(r[i]) for r in rows)
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if num else c.ljust(w)
            for c, w, num in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        ("-" * (w - 1) + ":") if num else "-" * w for w, num in zip(widths, numeric, strict=True)
    ]
    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def render(result: Result) -> str:
    """The result as printed and as written to the results file."""
    parts = [result.setup, "", table(result.header, result.rows)]
    if result.verdict:
        parts += ["", result.verdict]
    if result.notes:
        parts += ["", *(f"- {note}" for note in result.notes)]
    return "\n".join(parts)


def environment() -> str:
    """Where and when the numbers were taken (they mean little without it)."""
    load = os.getloadavg()[0]  # a busy machine stretches every number, and the tails most
    return (
        f"Measured {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} CPU(s)"
        f"{_machine()}, {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}; load average {load:.1f} when it finished."
    )


def _machine() -> str:
    """`` (CPU model, N GiB RAM)`` from /proc on Linux; "" where that cannot be read."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        meminfo = Path("/proc/meminfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if "model name" in line),
        "unknown CPU",
    )
    kib = next((int(line.split()[1]) for line in meminfo.splitlines() if "MemTotal" in line), 0)
    return f" ({model}, {kib / 2**20:.0f} GiB RAM)"


def write_section(path: Path, result: Result) -> None:
    """Replace (or append) the ``## <result.section>`` section of the Markdown file ``path``."""
    text = path.read_text(encoding="utf-8") if path.exists() else _PREAMBLE
    lines = text.splitlines()
    heading = f"## {result.section}"
    body = [heading, "", render(result), "", environment(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = body
    else:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *body]
    path.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")


_PREAMBLE = """# Benchmarks

Written by `make bench` (`python -m bench --write`); each section is rewritten by its scenario
(`bench/<scenario>.py`). Numbers are percentiles of repeated calls through a real broker and
real adapter processes on one machine, so compare them with each other, not with production.
"""


@dataclass
class Child:
    """A started child process and the port it announced on its READY line."""

    name: str
    process: subprocess.Popen[str]
    port: int = 0


def child_environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its ``CERTBROKER_*`` variables, plus ``env``.

    A broker's settings from those variables win over its configuration file
    (``CERTBROKER_WORKERS``, ``CERTBROKER_AUDIT_DSN``, ...): one left set in the shell would
    quietly change what a scenario measures. Scenarios say what they want in ``env`` or in
    the configuration file they write.
    """
    kept = {k: v for k, v in os.environ.items() if not k.startswith("CERTBROKER_")}
    return {**kept, **env}


class Processes:
    """Starts child processes that announce ``READY port=N`` on stdout; stops them all on exit.

    Their stderr goes to ``<log_dir>/<name>.log``; their environment is
    :func:`child_environment`.
    """

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self, specs: Mapping[str, Sequence[str]], env: Mapping[str, str] | None = None
    ) -> dict[str, Child]:
        """Start ``python ARGS`` for every name → ARGS at once, then wait until each is READY."""
        started = []
        for name, args in specs.items():
            with (self._log_dir / f"{name}.log").open("w") as log:
                process = subprocess.Popen(
                    [sys.executable, *args],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=child_environment(env or {}),
                )
            child = Child(name, process)
            self._children.append(child)
            started.append(child)
        for child in started:
            child.port = self._wait_ready(child)
        return {child.name: child for child in started}

    def _wait_ready(self, child: Child) -> int:
        # A thread reads the lines: select() on a buffered text pipe misses lines that were
        # already read into the buffer together with an earlier one.
        found: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def read() -> None:
            assert child.process.stdout is not None
            for line in child.process.stdout:
                if line.startswith("READY "):
                    fields = dict(part.split("=", 1) for part in line.split()[1:])
                    found.put(int(fields["port"]))
                    return
            found.put(None)  # exited without READY

        threading.Thread(target=read, name=f"ready-{child.name}", daemon=True).start()
        try:
            port = found.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            port = None
        if port is None:
            log = (self._log_dir / f"{child.name}.log").read_text(errors="replace")
            raise BenchError(f"{child.name} did not start:\n{log[-2000:]}")
        return port

    def stop_all(self) -> None:
        """SIGTERM every child, then SIGKILL whatever is still running after 10 s."""
        for child in self._children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        for child in self._children:
            try:
                child.process.wait(10)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            if child.process.stdout is not None:
                child.process.stdout.close()
        self._children.clear()
