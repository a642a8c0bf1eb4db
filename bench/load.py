"""The load generator: client processes driving one unary gRPC method with raw bytes.

Every row of the fast-path table is driven by the same :class:`LoadGenerator`: the same client
processes (``multiprocessing``, spawned once and reused), each with its own ``grpc.aio`` event
loop and ``channels`` separate connections, calling one method with a pre-serialized request
and not parsing the reply — so the client does the same work whatever server it drives.

* **Closed loop** (``Load.rate`` None): ``concurrency`` callers per process, each starting its
  next call when the previous one returns, for ``warmup_s`` (not counted) then ``duration_s``:
  the server's maximum throughput at that concurrency.
* **Open loop** (``Load.rate`` set): calls start on a fixed schedule whatever the server does,
  and latency is measured from the *scheduled* start, so a server that falls behind shows it
  in its tail instead of slowing the generator down (no coordinated omission).

Throughput counts the calls that succeed inside the measured window; latency, the calls that
finish in it (open loop: that were due in it, however late they finish). The server's CPU time
and peak RSS come from ``/proc`` (Linux), summed over its process tree so a broker with worker
processes is measured whole.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import Pool
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from bench.harness import BenchError, percentile

#: Default seconds between handing out a run and its start: the clients connect meanwhile.
START_DELAY_S = 1.0
#: Seconds a client may take to connect before the run fails.
CONNECT_TIMEOUT_S = 10.0
#: Per-call deadline; a call that needs this long has failed the benchmark anyway.
CALL_TIMEOUT_S = 10.0
#: Open loop: calls in flight per process beyond which scheduled calls are skipped (and counted
#: as ``late``) rather than piling up without bound.
MAX_OUTSTANDING = 2000
#: Distinct connections even to the same target: a broker with ``--workers`` (SO_REUSEPORT)
#: spreads connections, not calls, over its workers.
_CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


@dataclass(frozen=True)
class Call:
    """What every client sends: ``request`` (serialized) to ``method`` at ``target``."""

    target: str
    method: str
    request: bytes
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Load:
    """How hard and how long. ``rate`` (calls/s over all processes) makes it open loop."""

    processes: int = 2
    channels: int = 4  # connections per process
    concurrency: int = 32  # closed loop: calls in flight per process
    warmup_s: float = 1.0
    duration_s: float = 3.0
    rate: float | None = None
    start_delay_s: float = START_DELAY_S  # for the clients to connect before the start

    @classmethod
    def standard(cls, *, smoke: bool, processes: int = 2) -> Load:
        """The closed-loop load the scenarios share: 1 s warm-up, 3 s measured (smoke: long
        enough that a loaded machine still answers some calls in the window)."""
        return cls(
            processes=processes,
            warmup_s=0.2 if smoke else 1.0,
            duration_s=0.6 if smoke else 3.0,
            start_delay_s=0.2 if smoke else 1.0,
        )

    def __post_init__(self) -> None:
        if self.processes < 1 or self.channels < 1 or self.concurrency < 1:
            raise ValueError("processes, channels and concurrency must be at least 1")
        if self.warmup_s < 0 or self.start_delay_s < 0 or not self.duration_s > 0:
            raise ValueError("warmup_s and start_delay_s must be >= 0, duration_s > 0")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0")


@dataclass
class Sample:
    """One client process's share of a run."""

    latencies_ms: list[float] = field(default_factory=list)  # of calls measured
    ok: int = 0  # calls that succeeded within the window (the throughput)
    errors: Counter[str] = field(default_factory=Counter)  # status code name -> count
    late: int = 0
    cpu_s: float = 0.0  # the client process's CPU time in the measured window
    reply_bytes: int = 0


@dataclass(frozen=True)
class Outcome:
    """A run, all processes together."""

    qps: float
    p50_ms: float
    p99_ms: float
    ok: int
    errors: dict[str, int]
    late: int
    client_cpu: float  # cores busy in the clients on average (1.0 = one core)
    server_cpu: float  # the same for the server's process tree
    peak_rss_mib: float  # the server tree's peak resident set since it started
    reply_bytes: int


# --- the parent side ------------------------------------------------------------------------


class LoadGenerator:
    """A pool of ``processes`` client processes; use as a context manager."""

    def __init__(self, processes: int) -> None:
        # spawn, not fork: the parent has used gRPC already, and gRPC does not survive a fork.
        self._pool: Pool = multiprocessing.get_context("spawn").Pool(processes)
        self.processes = processes
        # Every child imports gRPC before the first run; meanwhile the caller starts servers.
        self._warm = self._pool.map_async(_ping, range(processes))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.terminate()
        self._pool.join()

    def run(self, call: Call, load: Load, server_pid: int) -> Outcome:
        """Drive ``call`` with ``load``; ``server_pid`` is measured (CPU, peak RSS)."""
        if load.processes != self.processes:
            raise ValueError(f"this generator has {self.processes} processes")
        try:
            self._warm.get(timeout=CONNECT_TIMEOUT_S + 60)
        except multiprocessing.TimeoutError:
            raise BenchError("the load generator's processes did not start") from None
        start_at = time.time() + load.start_delay_s
        pending = self._pool.map_async(
            _drive, [(call, load, start_at, index) for index in range(load.processes)]
        )
        _sleep_until(start_at + load.warmup_s)
        cpu_before = tree_cpu_s(server_pid)
        _sleep_until(start_at + load.warmup_s + load.duration_s)
        cpu_after = tree_cpu_s(server_pid)
        budget = CONNECT_TIMEOUT_S + load.warmup_s + load.duration_s + CALL_TIMEOUT_S + 30
        try:
            samples: list[Sample] = pending.get(timeout=budget)
        except multiprocessing.TimeoutError:
            raise BenchError(f"the load generator did not finish within {budget:.0f} s") from None
        return _combine(samples, load, (cpu_after - cpu_before) / load.duration_s, server_pid)


def _ping(_index: int) -> int:
    return os.getpid()


def _sleep_until(deadline: float) -> None:
    delay = deadline - time.time()
    if delay > 0:
        time.sleep(delay)


def _combine(samples: list[Sample], load: Load, server_cpu: float, server_pid: int) -> Outcome:
    latencies = [ms for s in samples for ms in s.latencies_ms]
    errors: Counter[str] = Counter()
    for sample in samples:
        errors.update(sample.errors)
    ok = sum(s.ok for s in samples)
    if not latencies:
        raise BenchError(f"no call succeeded in the measured window (errors: {dict(errors)})")
    return Outcome(
        qps=ok / load.duration_s,
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        ok=ok,
        errors=dict(errors),
        late=sum(s.late for s in samples),
        client_cpu=sum(s.cpu_s for s in samples) / load.duration_s,
        server_cpu=server_cpu,
        peak_rss_mib=tree_peak_rss_kib(server_pid) / 1024,
        reply_bytes=max(s.reply_bytes for s in samples),
    )


# --- /proc: the server's process tree -------------------------------------------------------


def process_tree(pid: int) -> Iterator[int]:
    """``pid`` and its descendants (Linux ``/proc/<pid>/task/<tid>/children``)."""
    yield pid
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            text = children.read_text()
        except OSError:  # the thread or process is gone
            continue
        for child in text.split():
            yield from process_tree(int(child))


def tree_peak_rss_kib(pid: int) -> int:
    """Sum of ``VmHWM`` (peak resident set) over ``pid``'s process tree, in KiB."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])  # "VmHWM:   123456 kB"
    return total


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid``'s process tree."""
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may contain spaces: split after its closing parenthesis.
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the client side (runs in the pool's processes) -----------------------------------------

_loop: asyncio.AbstractEventLoop | None = None


def _drive(job: tuple[Call, Load, float, int]) -> Sample:
    # One event loop per client process for its whole life: gRPC aio binds to the first loop.
    global _loop  # noqa: PLW0603 - per-process state of a pool worker
    if _loop is None:
        _loop = asyncio.new_event_loop()
        asyncio.set_event_loop(_loop)
    return _loop.run_until_complete(_client(*job))


async def _client(call: Call, load: Load, start_at: float, index: int) -> Sample:
    channels = [
        grpc.aio.insecure_channel(call.target, options=_CHANNEL_OPTIONS)
        for _ in range(load.channels)
    ]
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.channel_ready() for c in channels)), CONNECT_TIMEOUT_S
        )
        # No (de)serializers: bytes in, bytes out, and no client-side parsing to measure.
        stubs = [c.unary_unary(call.method, None, None) for c in channels]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        window = _Window(time.perf_counter() + load.warmup_s, load.duration_s)
        sample = Sample()
        cpu = asyncio.create_task(_window_cpu(window, sample))
        if load.rate is None:
            callers = [
                _closed_caller(stubs[i % len(stubs)], call, window, sample)
                for i in range(load.concurrency)
            ]
            await asyncio.gather(*callers)
        else:
            await _open_loop(stubs, call, load, index, window, sample)
        await cpu
        return sample
    finally:
        for channel in channels:
            await channel.close(None)


@dataclass(frozen=True)
class _Window:
    """The measured interval, in ``time.perf_counter()`` seconds."""

    start: float
    duration: float

    @property
    def end(self) -> float:
        return self.start + self.duration

    def __contains__(self, moment: float) -> bool:
        return self.start <= moment < self.end


async def _window_cpu(window: _Window, sample: Sample) -> None:
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    before = time.process_time()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    sample.cpu_s = time.process_time() - before


async def _one(
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], call: Call
) -> tuple[bytes | None, str]:
    try:
        reply = await stub(call.request, metadata=call.metadata, timeout=CALL_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        return None, exc.code().name
    return reply, ""


def _record(
    sample: Sample, reply: bytes | None, error: str, latency_s: float, *, count: bool = True
) -> None:
    """A measured call: its latency if it succeeded, else its status; ``count`` it as done."""
    if reply is None:
        sample.errors[error] += 1
        return
    sample.ok += count
    sample.latencies_ms.append(latency_s * 1000)
    sample.reply_bytes = len(reply)


async def _closed_caller(
    stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes],
    call: Call,
    window: _Window,
    sample: Sample,
) -> None:
    while (started := time.perf_counter()) < window.end:
        reply, error = await _one(stub, call)
        finished = time.perf_counter()
        if finished in window:
            _record(sample, reply, error, finished - started)


async def _open_loop(
    stubs: list[grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]],
    call: Call,
    load: Load,
    index: int,
    window: _Window,
    sample: Sample,
) -> None:
    assert load.rate is not None
    interval = load.processes / load.rate  # this process's share of the schedule
    # Processes interleave their schedules instead of all firing at the same instants.
    first = window.start - load.warmup_s + interval * index / load.processes
    in_flight: set[asyncio.Task[None]] = set()

    async def scheduled(stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], due: float) -> None:
        reply, error = await _one(stub, call)
        finished = time.perf_counter()
        # Throughput: what finished in the window. Latency: what was due in it, from when it
        # was due (not from when it got going), however late it finished.
        sample.ok += reply is not None and finished in window
        if due in window:
            _record(sample, reply, error, finished - due, count=False)

    n = 0
    while (due := first + n * interval) < window.end:
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        if len(in_flight) >= MAX_OUTSTANDING:
            sample.late += due in window
        else:
            task = asyncio.create_task(scheduled(stubs[n % len(stubs)], due))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        n += 1
    if in_flight:
        await asyncio.gather(*in_flight)
