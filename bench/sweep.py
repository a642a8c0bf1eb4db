"""Scenario "Latency–throughput sweep": open loop at rising fractions of each server's own
maximum rate, p50 and p99 at each step, for the bare echo server and the broker's cache hit.

Each server's maximum is first measured closed loop (the best of ``rounds`` runs); then calls
start on a fixed schedule at :data:`FRACTIONS` of that rate, timed from their scheduled start
(no coordinated omission: a server that falls behind shows it in its tail). The chart
(``docs/benchmarks-sweep.png``, drawn with matplotlib, a dev dependency) has offered load on
the x axis and p50/p99 on a log y axis, one colour per server.

Target (issue 19): at half of the broker's own maximum rate, its p99 ≤ 5 ms.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import echo
from bench.harness import BenchError, Options, Result, percentile
from bench.load import Call, Load, LoadGenerator, Outcome
from bench.servers import BrokerSpec, Lab, probe_lookup

SECTION = "Latency–throughput sweep"
FRACTIONS = (0.1, 0.25, 0.5, 0.75, 0.9)
SMOKE_FRACTIONS = (0.25, 0.5)
HALF_P99_MS = 5.0
CHART = "benchmarks-sweep.png"  # in Options.figures (docs/ with --write)
HIT = BrokerSpec("sweep-hit")


@dataclass
class Curve:
    """One server's sweep: its closed-loop maximum and an outcome per fraction."""

    name: str
    max_qps: float = 0.0
    steps: dict[float, Outcome] = dataclasses.field(default_factory=dict)


def run(options: Options) -> Result:
    """Measure both servers' maxima, then sweep each; draw the chart :data:`CHART` in
    ``options.figures`` when that is set (``python -m bench --write``: docs/)."""
    chart = None if options.figures is None else options.figures / CHART
    load = Load.standard(smoke=options.smoke, processes=2)
    rounds = options.count(full=2, smoke=1)
    fractions = SMOKE_FRACTIONS if options.smoke else FRACTIONS
    curves = {"echo": Curve("bare grpc.aio echo"), "hit": Curve("broker, record-cache hit")}
    with (
        tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp,
        LoadGenerator(load.processes) as generator,
    ):
        lab = Lab(Path(tmp))
        fsync = fsync_ms(Path(tmp), 20 if options.smoke else 300)
        with lab.brokers(HIT) as (broker,):
            size, cached = probe_lookup(lab, broker)
            if not cached:
                raise BenchError("the repeated lookup was not a record-cache hit")
            with lab.echo(size) as server:
                base = lab.lookup_call(broker)
                calls: dict[str, tuple[Call, int]] = {
                    "echo": (
                        dataclasses.replace(
                            base, target=f"127.0.0.1:{server.port}", method=echo.METHOD
                        ),
                        server.process.pid,
                    ),
                    "hit": (base, broker.pid),
                }
                for _ in range(rounds):  # the maxima, interleaved; the best run of each
                    for key, (call, pid) in calls.items():
                        qps = generator.run(call, load, pid).qps
                        curves[key].max_qps = max(curves[key].max_qps, qps)
                for fraction in fractions:  # interleaved too: step by step, both servers
                    for key, (call, pid) in calls.items():
                        rate = fraction * curves[key].max_qps
                        stepped = dataclasses.replace(load, rate=rate)
                        curves[key].steps[fraction] = generator.run(call, stepped, pid)
    if chart is not None:
        draw(curves, chart)
    return _result(curves, load, rounds, chart, fsync)


def fsync_ms(folder: Path, count: int) -> tuple[float, float]:
    """(p50, p99) milliseconds of ``fdatasync`` after a 4 KiB append, in ``folder`` (where the
    audit logs are): the floor under every audited answer's latency, whatever the CPU does."""
    path = folder / "fsync-probe"
    times = []
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        for _ in range(count):
            os.write(fd, b"\0" * 4096)
            began = time.perf_counter()
            os.fdatasync(fd)
            times.append((time.perf_counter() - began) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(times, 50), percentile(times, 99)


def draw(curves: dict[str, Curve], path: Path) -> None:
    """The chart: offered load (calls/s) against p50 and p99 (ms, log scale), per server."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for (key, curve), colour in zip(curves.items(), ("tab:blue", "tab:red"), strict=False):
        rates = [fraction * curve.max_qps for fraction in curve.steps]
        p50 = [o.p50_ms for o in curve.steps.values()]
        p99 = [o.p99_ms for o in curve.steps.values()]
        axes.plot(rates, p99, "o-", color=colour, label=f"{key} p99 (max {curve.max_qps:.0f}/s)")
        axes.plot(rates, p50, "s--", color=colour, alpha=0.6, label=f"{key} p50")
    hit = curves["hit"]
    axes.axhline(HALF_P99_MS, color="grey", linestyle=":", linewidth=1)
    axes.axvline(0.5 * hit.max_qps, color="grey", linestyle=":", linewidth=1)
    axes.annotate(
        f"target: p99 ≤ {HALF_P99_MS:g} ms at half the broker's max",
        (0.5 * hit.max_qps, HALF_P99_MS),
        textcoords="offset points",
        xytext=(6, 6),
        fontsize=8,
        color="grey",
    )
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())  # 2, 5, 10 ms rather than 10^0
    axes.set_xlabel("offered load (calls/s, open loop)")
    axes.set_ylabel("latency (ms)")
    axes.set_title("Latency against offered load: echo and the broker's cache hit")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _result(
    curves: dict[str, Curve],
    load: Load,
    rounds: int,
    chart: Path | None,
    fsync: tuple[float, float],
) -> Result:
    rows = []
    for key, curve in curves.items():
        for fraction, outcome in curve.steps.items():
            lost = sum(outcome.errors.values()) + outcome.late
            rows.append(
                (
                    key,
                    f"{fraction:.2f}",
                    f"{fraction * curve.max_qps:.0f}",
                    f"{outcome.qps:.0f}",
                    f"{outcome.p50_ms:.2f}",
                    f"{outcome.p99_ms:.2f}",
                    str(lost),
                )
            )
    hit = curves["hit"]
    half = hit.steps.get(0.5)
    verdict = ""
    if half is not None:
        met = "met" if half.p99_ms <= HALF_P99_MS else "NOT met"
        verdict = (
            f"Broker at half its maximum ({0.5 * hit.max_qps:.0f}/s): p99 {half.p99_ms:.2f} ms "
            f"(target ≤ {HALF_P99_MS:g} ms): {met}."
        )
    notes = [
        f"Maxima (closed loop, {load.processes * load.concurrency} calls in flight, best of "
        f"{rounds}): echo {curves['echo'].max_qps:.0f}/s, broker {hit.max_qps:.0f}/s. Each "
        f"step: {load.warmup_s:g} s warm-up, {load.duration_s:g} s measured; the two servers "
        "alternate step by step. `lost` = calls that failed or could not be sent in time.",
        f"The disk under the audit log: `fdatasync` of a 4 KiB append took p50 {fsync[0]:.2f} "
        f"ms, p99 {fsync[1]:.2f} ms in the same run. Every audited answer waits for one (its "
        "batch's commit), so the broker's p99 cannot be below the disk's.",
    ]
    if chart is not None:
        notes.append(f"![latency against offered load]({chart.name})")
    return Result(
        section=SECTION,
        setup=(
            "Open loop at rising fractions of each server's own closed-loop maximum: the bare "
            "echo server and the broker answering a record-cache hit (its audit entry durable "
            "before the answer). Latency from each call's scheduled start."
        ),
        header=("server", "× max", "offered /s", "answered /s", "p50 ms", "p99 ms", "lost"),
        rows=rows,
        verdict=verdict,
        notes=notes,
    )
