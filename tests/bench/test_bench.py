"""The benchmark keeps working: its smoke mode end to end, and its reporting helpers.

Nothing here asserts how fast anything is; numbers belong in docs/benchmarks.md.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import bundle, casbin_model, echo, fastpath
from bench.harness import (
    BenchError,
    Options,
    Processes,
    Result,
    child_environment,
    percentile,
    render,
    table,
    write_section,
)
from bench.load import Call, Load, LoadGenerator, process_tree, tree_cpu_s, tree_peak_rss_kib
from bench.policies import uncached_policies
from bench.servers import Lab, probe_lookup
from certbroker import config, policy
from certbroker.cli import main as cli
from certbroker.v1 import broker_pb2
from tests.helpers import BrokerThread, make_config

ROOT = Path(__file__).resolve().parents[2]


def _bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _table_rows(lines: list[str]) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell (header and rule excluded)."""
    rows = {}
    for line in lines:
        if line.startswith("| ") and not line.startswith("| --"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_smoke_run_prints_the_bundle_table(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    out = _bench(
        "--smoke",
        "--scenario",
        "bundle",
        "--scenario",
        "audit-verify",
        "--results-file",
        str(results),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "== bundle (smoke)" in lines
    for call in ("Lookup household", "Lookup marriage", "Lookup property", "LookupMatter"):
        assert any(line.startswith(f"| {call}") for line in lines), call
    assert any(line.startswith("bundle / slowest single") for line in lines)
    assert any("record cache off, so every record is fetched" in line for line in lines)
    assert not results.exists()  # only --write (full runs) touches the results file


def test_write_needs_a_full_run() -> None:
    out = _bench("--smoke", "--write", timeout=60)
    assert out.returncode == 2
    assert "full runs only" in out.stderr


#: Cells of a row the fast-path scenario could run: QPS, p50, p99, RSS, CPU, then "× echo".
_NUMBER = re.compile(r"\d+(\.\d+)?")


def test_smoke_run_prints_the_fast_path_table(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    out = _bench("--smoke", "--scenario", "fastpath", "--results-file", str(results))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "== fastpath (smoke)" in lines
    rows = _table_rows(lines)
    assert rows["#"][:3] == ["#", "configuration", "QPS"]
    assert set(rows) == {"#", "1", "2", "2m", "2q", "3", "4", "5", "6", "1o", "2o"}
    for key, cells in rows.items():  # every row ran: QPS, p50, p99, RSS, CPU
        assert key == "#" or all(_NUMBER.fullmatch(cell) for cell in cells[2:7]), cells
    assert rows["1"][7] == "1.00"  # the baseline is its own reference
    judged = {k for k, cells in rows.items() if k != "#" and cells[-1] in {"met", "NOT met"}}
    assert judged == {"2", "2m", "3", "4", "6", "2o"}
    assert rows["6"][8] == "≥ 1.30 × row 2"
    assert {rows[key][-1] for key in ("1", "5", "1o")} == {"-"}
    assert any(line.startswith("Targets met: ") and line.endswith(" of 6.") for line in lines)
    assert any(line.startswith("- Reply size ") for line in lines)
    assert any(line.startswith("- Metrics cost: row 2 (on) ") for line in lines)
    assert any(line.startswith("- Quota checking: row 2q ") for line in lines)
    assert any(line.startswith("- `--workers 2` / 1 worker (row 6 / row 2): ") for line in lines)
    assert any(line.startswith("- Smoke run: every broker was started at once") for line in lines)
    assert not results.exists()


def test_smoke_run_prints_the_decisions_table() -> None:
    out = _bench("--smoke", "--scenario", "decisions")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _table_rows(out.stdout.splitlines())
    whats = list(rows)[1:]
    assert sum("ours (PolicySet.decide)" in w for w in whats) == 2
    assert sum("pycasbin Enforcer" in w for w in whats) == 2
    assert sum(w.startswith("JWT verification") for w in whats) == 2
    for cells in list(rows.values())[1:]:
        assert all(_NUMBER.fullmatch(c) for c in cells[1:]), cells


def test_the_benchmark_is_not_part_of_the_installed_cli(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m bench`` runs from a checkout (``make bench``); the installed ``certbroker``
    has no ``bench`` command that could only fail outside one."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--smoke"])
    assert exc.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_metrics_knob_comes_from_file_and_environment(tmp_path: Path) -> None:
    assert config.load(None, env={}).metrics_enabled is True
    toml = tmp_path / "broker.toml"
    toml.write_text("[server]\nmetrics_enabled = false\n")
    assert config.load(toml, env={}).metrics_enabled is False
    env = {"CERTBROKER_METRICS_ENABLED": "true"}
    assert config.load(toml, env=env).metrics_enabled is True
    with pytest.raises(config.ConfigError, match="CERTBROKER_METRICS_ENABLED"):
        config.load(None, env={"CERTBROKER_METRICS_ENABLED": "maybe"})


def test_broker_turns_metrics_off_from_config(tmp_path: Path, dataset_dir: Path) -> None:
    broker = BrokerThread(make_config(tmp_path, dataset_dir, metrics_enabled=False))
    try:
        assert broker.broker is not None
        assert broker.broker.metrics.enabled is False
    finally:
        broker.stop()


_CST = dt.timezone(dt.timedelta(hours=8))
_MOMENTS = (
    dt.datetime(2026, 11, 18, 10, 0, tzinfo=_CST),
    dt.datetime(2026, 11, 22, 20, 0, tzinfo=_CST),
)


@pytest.mark.parametrize("fast", [False, True])
def test_casbin_model_decides_like_our_engine(fast: bool) -> None:
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    batch = casbin_model.sample(casbin_model.requests(rules, _MOMENTS), 2000)
    counts = casbin_model.allow_counts(rules, batch)
    assert counts[True] > 0  # a comparison of both outcomes
    assert counts[False] > 0
    engine = casbin_model.enforcer(rules, fast=fast)
    assert list(casbin_model.disagreements(rules, engine, batch)) == []


def test_casbin_comparison_notices_a_different_rule_set() -> None:
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    night = next(r for r in rules.rules if r.id == "window-clerk-24h")
    fewer = replace(rules, rules=tuple(r for r in rules.rules if r is not night))
    # The matters of the removed rule: an even sample of every matter could miss them all.
    requests = [r for r in casbin_model.requests(rules, _MOMENTS) if r.matter_code in night.matters]
    batch = casbin_model.sample(requests, 2000)
    wrong = list(casbin_model.disagreements(rules, casbin_model.enforcer(fewer), batch))
    assert wrong
    assert all(ours and not theirs for _request, ours, theirs in wrong)
    assert {request.clerk.office for request, _o, _t in wrong} == {"gz-haizhu-24h-01"}


def test_echo_payload_has_the_asked_size() -> None:
    assert len(echo.payload(410)) == 410
    assert echo.payload(0) == b""
    with pytest.raises(ValueError, match="size"):
        echo.payload(-1)


def test_load_generator_drives_the_echo_server(tmp_path: Path) -> None:
    # A window long enough that calls finish in it even on a loaded machine (no speed check).
    load = Load(processes=1, channels=2, concurrency=4, warmup_s=0.2, duration_s=1.0)
    with Processes(tmp_path) as processes, LoadGenerator(1) as generator:
        server = processes.start({"echo": ["-m", "bench.echo", "--size", "123"]})["echo"]
        call = Call(f"127.0.0.1:{server.port}", echo.METHOD, b"request", (("x-k", "v"),))
        closed = generator.run(call, load, server.process.pid)
        opened = generator.run(call, replace(load, rate=200.0), server.process.pid)
    for outcome in (closed, opened):
        assert outcome.errors == {}
        assert outcome.ok > 0
        assert outcome.reply_bytes == 123
        assert 0 < outcome.p50_ms <= outcome.p99_ms
        assert outcome.peak_rss_mib > 0


def test_load_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Load(processes=0)
    with pytest.raises(ValueError, match="duration_s"):
        Load(duration_s=0)
    with pytest.raises(ValueError, match="rate"):
        Load(rate=0)


def test_process_tree_measures_children(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert child.pid in set(process_tree(os.getpid()))
        assert tree_peak_rss_kib(os.getpid()) > tree_peak_rss_kib(child.pid) > 0
        assert tree_cpu_s(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def test_fast_path_targets_are_the_issue_s() -> None:
    assert fastpath.TARGET_RATIO == {"2": 0.70, "3": 0.50, "4": 0.40}
    assert (fastpath.P99_ADDED_MS, fastpath.METRICS_COST, fastpath.WORKERS_GAIN) == (
        2.0,
        0.03,
        1.3,
    )


def test_a_failing_scenario_does_not_stop_the_others(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(_options: Options) -> Result:
        raise BenchError("no server")

    scenarios = {"broken": broken, "fine": lambda _options: _result("Fine", "1.0")}
    monkeypatch.setattr(bench_main, "SCENARIOS", scenarios)
    results = tmp_path / "benchmarks.md"
    assert bench_main.main(["--write", "--results-file", str(results)]) == 1
    out = capsys.readouterr()
    assert "error: broken: no server" in out.err
    assert "| Lookup x |    1.0 |" in out.out
    assert "## Fine" in results.read_text()


def test_percentile_is_nearest_rank() -> None:
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 90) == 5.0
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError, match="no samples"):
        percentile([], 50)


def test_options_pick_the_round_count() -> None:
    assert Options().count(full=200, smoke=3) == 200
    assert Options(smoke=True).count(full=200, smoke=3) == 3
    assert Options(smoke=True, rounds=7).count(full=200, smoke=3) == 7


def _result(section: str, value: str) -> Result:
    return Result(
        section=section,
        setup="What ran.",
        header=("call", "p50 ms"),
        rows=[("Lookup x", value)],
        verdict="ratio 1.00",
    )


def test_table_aligns_and_right_justifies_numbers() -> None:
    text = table(("call", "p50 ms"), [("Lookup household", "26.2"), ("LookupMatter", "130.5")])
    header, rule, first, second = text.splitlines()
    assert len({len(header), len(rule), len(first), len(second)}) == 1
    assert rule.endswith(": |")  # a right-aligned Markdown column
    assert first.endswith("  26.2 |")


def test_table_keeps_a_number_column_with_missing_cells_right_aligned() -> None:
    text = table(("row", "QPS"), [("1", "4818"), ("6", "-")])
    assert text.splitlines()[1].endswith("-: |")
    assert text.splitlines()[3].endswith("    - |")
    rule = table(("row", "met"), [("1", "-"), ("6", "-")]).splitlines()[1]
    assert not rule.endswith(": |")  # all "-": not a number column


def test_write_section_replaces_its_own_section_only(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    write_section(path, _result("Matter bundles", "1.0"))
    write_section(path, _result("Another scenario", "2.0"))
    write_section(path, _result("Matter bundles", "3.0"))
    text = path.read_text()
    assert text.startswith("# Benchmarks\n")
    assert text.count("## Matter bundles") == 1
    assert "| Lookup x |    1.0 |" not in text
    assert "| Lookup x |    3.0 |" in text
    assert "| Lookup x |    2.0 |" in text  # the other section is untouched
    assert text.index("## Matter bundles") < text.index("## Another scenario")
    assert render(_result("Matter bundles", "3.0")) in text


def test_uncached_policies_turn_every_ttl_off_and_change_nothing_else(tmp_path: Path) -> None:
    shipped = policy.load(config.DEFAULT_POLICY_DIR)
    assert any(rt.cache_ttl_s for rt in shipped.record_types.values())  # else this proves nothing
    copy = policy.load(uncached_policies(tmp_path / "ttl0"))
    assert {name: rt.cache_ttl_s for name, rt in copy.record_types.items()} == dict.fromkeys(
        shipped.record_types, 0
    )
    assert _without_source(copy.rules) == _without_source(shipped.rules)
    assert copy.matters == shipped.matters
    assert copy.roles == shipped.roles
    assert policy.load(config.DEFAULT_POLICY_DIR) == shipped  # the source is untouched


def _without_source(rules: tuple[policy.Rule, ...]) -> list[policy.Rule]:
    return [replace(rule, source="") for rule in rules]  # "path:line" differs in a copy


def test_uncached_policies_refuse_a_ttl_they_cannot_reach(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(config.DEFAULT_POLICY_DIR, source)
    catalogue = source / "catalogue.yaml"
    text = catalogue.read_text(encoding="utf-8")
    catalogue.write_text(text.replace("cache_ttl_s: 600", "cache_ttl_s: 0x258"), encoding="utf-8")
    assert policy.load(source).record_types["household"].cache_ttl_s == 600  # YAML hex
    with pytest.raises(BenchError, match=r"record cache off for \['household'\]"):
        uncached_policies(tmp_path / "ttl0", source)


def test_children_get_no_broker_settings_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTBROKER_WORKERS", "8")
    monkeypatch.setenv("CERTBROKER_AUDIT_DSN", "postgresql://elsewhere/db")
    monkeypatch.setenv("KEEP_ME", "1")
    env = child_environment({"CERTBROKER_DATASET_DIR": "/data"})
    assert env["KEEP_ME"] == "1"
    assert env["CERTBROKER_DATASET_DIR"] == "/data"
    assert "CERTBROKER_WORKERS" not in env
    assert "CERTBROKER_AUDIT_DSN" not in env


def test_bundle_scenario_refuses_an_answer_from_the_cache() -> None:
    bundle._fetched(broker_pb2.LookupResponse(department="public_security"))
    with pytest.raises(BenchError, match="public_security record came from the cache"):
        bundle._fetched(broker_pb2.LookupResponse(department="public_security", from_cache=True))


def test_workers_broker_is_measured_as_a_whole_process_tree(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    with lab.brokers(fastpath.WORKERS) as (broker,):
        size, from_cache = probe_lookup(lab, broker)  # the port of the supervisor's READY line
        assert size > 0
        assert from_cache  # the row-2 configuration: a repeated lookup is a cache hit
        tree = list(process_tree(broker.pid))
        assert len(tree) >= 3  # the supervisor and its two workers
        each = [_peak_rss_kib(pid) for pid in tree]
        assert all(kib > 0 for kib in each)
        # Read after its parts, and peaks only grow: the total is at least their sum.
        assert tree_peak_rss_kib(broker.pid) >= sum(each)


def _peak_rss_kib(pid: int) -> int:
    """One process's own VmHWM (peak resident set), in KiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_smoke_run_prints_the_evidence_table() -> None:
    out = _bench("--smoke", "--scenario", "evidence")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _table_rows(out.stdout.splitlines())
    for call in ("Lookup", "Lookup + evidence", "verify offline (6 records)"):
        assert all(_NUMBER.fullmatch(c) for c in rows[call][1:]), rows[call]
    assert "evidence adds (p50)" in out.stdout


_SPREAD = re.compile(r"\d+(\.\d+)?( \(\d+(\.\d+)?–\d+(\.\d+)?\))?")


def test_smoke_run_prints_cpu_per_call_and_the_sweep(tmp_path: Path) -> None:
    results = tmp_path / "benchmarks.md"
    args = ["--smoke", "--scenario", "cpu", "--scenario", "sweep", "--rounds", "2"]
    out = _bench(*args, "--results-file", str(results), timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    cpu_at, sweep_at = lines.index("== cpu (smoke)"), lines.index("== sweep (smoke)")
    rows = _table_rows(lines[cpu_at:sweep_at])
    assert rows["row"][2:4] == ["CPU µs/call", "× echo"]
    assert set(rows) == {
        "row",
        "echo",
        "echo/asyncio",
        "hit",
        "hit/asyncio",
        "hit/nometrics",
        "hit/window",
        "hit/quotas",
        "miss",
        "workers",
    }
    for key, cells in rows.items():  # every row ran, two rounds: "median (min–max)"
        assert key == "row" or all(_SPREAD.fullmatch(cell) for cell in cells[2:8]), cells
        assert key == "row" or "–" in cells[2], cells
    assert rows["echo"][3] == rows["echo/asyncio"][3] == "1.00"
    assert rows["hit"][8] == "≤ 2.0 × echo"
    assert rows["miss"][8] == "≤ 2.5 × echo"
    assert any(line.startswith("- `--workers 2`: audit write-lock wait ") for line in lines)
    steps = [
        [c.strip() for c in line.strip("|").split("|")][:2]
        for line in lines[sweep_at:]
        if line.startswith(("| echo ", "| hit "))
    ]  # the smoke sweep: a quarter and a half of each server's maximum
    assert steps == [["echo", "0.25"], ["echo", "0.50"], ["hit", "0.25"], ["hit", "0.50"]]
    assert any(line.startswith("Broker at half its maximum (") for line in lines[sweep_at:])
    assert any("`fdatasync` of a 4 KiB append took p50" in line for line in lines[sweep_at:])
    assert not results.exists()
    assert not (tmp_path / "benchmarks-sweep.png").exists()  # charts only with --write


def test_the_sweep_chart_is_a_png(tmp_path: Path) -> None:
    from bench import sweep
    from bench.load import Outcome

    def outcome(ms: float) -> Outcome:
        return Outcome(100, ms, 2 * ms, 300, {}, 0, 0.5, 0.5, 40, 400)

    curves = {
        "echo": sweep.Curve("echo", 1000, {0.25: outcome(1), 0.5: outcome(2)}),
        "hit": sweep.Curve("hit", 500, {0.25: outcome(3), 0.5: outcome(4)}),
    }
    chart = tmp_path / "sweep.png"
    sweep.draw(curves, chart)
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.timeout(360)  # a few thousand entries per store, generated and read back
def test_smoke_run_prints_the_scale_table() -> None:
    out = _bench("--smoke", "--scenario", "scale", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = _table_rows(out.stdout.splitlines())
    assert "SQLite" in list(rows)[1:]
    for cells in list(rows.values())[1:]:
        assert cells[1] == "3,000"
        assert int(cells[2]) > 0  # bytes per entry, measured on the generated log
