"""``python -m bench``: run the benchmark scenarios and print a table for each.

    python -m bench [--smoke] [--write] [--rounds N] [--scenario NAME ...]

``--smoke`` makes a few calls only (seconds; what CI runs to keep the benchmark working);
``--write`` rewrites each scenario's section of docs/benchmarks.md (full runs only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import (
    audit_backends,
    audit_verify,
    bundle,
    cluster,
    cpu,
    decisions,
    evidence,
    fastpath,
    hall,
    outbox,
    scale,
    sweep,
)
from bench.harness import ROOT, BenchError, Options, Result, render, write_section

#: Scenario name → its ``run``. A new scenario is a module in bench/ and one line here.
SCENARIOS: dict[str, Callable[[Options], Result]] = {
    "bundle": bundle.run,
    "audit-verify": audit_verify.run,
    "audit-backends": audit_backends.run,
    "fastpath": fastpath.run,
    "cpu": cpu.run,
    "sweep": sweep.run,
    "decisions": decisions.run,
    "hall": hall.run,
    "cluster": cluster.run,
    "outbox": outbox.run,
    "evidence": evidence.run,
    "scale": scale.run,
}
RESULTS_FILE = ROOT / "docs" / "benchmarks.md"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen scenarios; exit status 1 if one could not run (the others still do)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few calls only (for CI)")
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS_FILE.name}")
    parser.add_argument("--rounds", type=int, help="rounds per scenario (overrides the default)")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="default: all"
    )
    parser.add_argument("--results-file", type=Path, default=RESULTS_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write and args.smoke:
        parser.error("--write records full runs only; drop --smoke")
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    figures = args.results_file.parent if args.write else None
    options = Options(smoke=args.smoke, rounds=args.rounds, figures=figures)
    failed = []
    for name in args.scenario or list(SCENARIOS):
        print(f"\n== {name}{' (smoke)' if args.smoke else ''}", flush=True)
        try:
            result = SCENARIOS[name](options)
        except BenchError as exc:
            # The others still run: one broken scenario should not hide every other number.
            print(f"error: {name}: {exc}", file=sys.stderr)
            failed.append(name)
            continue
        print(render(result), flush=True)
        if args.write:
            write_section(args.results_file, result)
            print(f"(written to {args.results_file})")
    if failed:
        print(f"error: scenario(s) that could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
