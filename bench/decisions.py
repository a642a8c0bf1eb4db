"""Scenario "Decisions and tokens": the per-request work of the fast path, in-process.

* **Policy decisions per second**: our engine (:meth:`certbroker.policy.model.PolicySet.decide`)
against
  pycasbin on an equivalent role × matter × record-type model built from the same shipped
  rules (:mod:`bench.casbin_model`), on the same requests. Before timing, both engines decide
  every request and must agree on every one, else the comparison is void and the run fails.
  Two request mixes: an even sample of every combination of role, matter, record type,
  office, consent, time and case number (mostly denials), and the allowed ones of it (what a
  hall mostly sends).
* **JWT verifications per second**: :class:`certbroker.auth.authenticator.Authenticator` verifying
one clerk
  token (EdDSA, the development IdP) with the token cache off and on (a hit after the first).

Single-threaded, one process; each row runs for a fixed time (``MIN_S``) over its batch.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench import casbin_model
from bench.harness import BenchError, Options, Result
from certbroker import config, policy
from certbroker.auth.authenticator import Authenticator, DevIdentityProvider
from certbroker.policy.model import Request

SECTION = "Policy decisions and token verification"
#: Seconds each row runs for (full run / smoke).
MIN_S = 2.0
SMOKE_MIN_S = 0.05
#: Requests of the mix: an even sample of every combination (casbin_model.sample).
SAMPLE = 3000
#: Smoke runs check the engines' agreement on every n-th request only (casbin is slow).
SMOKE_STRIDE = 9
_CST = dt.timezone(dt.timedelta(hours=8))
#: A Wednesday morning (staffed halls open) and a Sunday evening (closed).
MOMENTS = (
    dt.datetime(2026, 11, 18, 10, 0, tzinfo=_CST),
    dt.datetime(2026, 11, 22, 20, 0, tzinfo=_CST),
)


def run(options: Options) -> Result:
    """Check the engines agree, then time policy decisions and token verifications."""
    min_s = SMOKE_MIN_S if options.smoke else MIN_S
    rules = policy.load(config.DEFAULT_POLICY_DIR)
    every = casbin_model.sample(casbin_model.requests(rules, MOMENTS), SAMPLE)
    if options.smoke:
        every = every[::SMOKE_STRIDE]
    allowed = [r for r in every if rules.decide(r).allowed]
    if not allowed:
        raise BenchError("no request of the mix is allowed: the comparison would be one-sided")
    engines = {
        "pycasbin Enforcer": casbin_model.enforcer(rules),
        "pycasbin FastEnforcer": casbin_model.enforcer(rules, fast=True),
    }
    for name, engine in engines.items():
        wrong = next(casbin_model.disagreements(rules, engine, every), None)
        if wrong is not None:
            request, by_us, by_casbin = wrong
            raise BenchError(f"{name} decides {request} as {by_casbin}, our engine as {by_us}")
    rows: list[tuple[str, ...]] = []
    for mix, batch in (("sample of all combinations", every), ("allowed only", allowed)):
        ours = _rate(rules.decide, batch, min_s)
        theirs = {name: _rate(_enforce(e), batch, min_s) for name, e in engines.items()}
        reference = theirs["pycasbin Enforcer"]
        label = f"policy decision, {mix} ({len(batch)} requests)"
        rows.append(_row(f"{label}: ours (PolicySet.decide)", ours, reference))
        rows += [_row(f"{label}: {name}", rate, reference) for name, rate in theirs.items()]
    rows += _tokens(min_s)
    return Result(
        section=SECTION,
        setup=(
            "In one process, single-threaded. Policy: the shipped rules; pycasbin "
            f"{_casbin_version()} gets the same rules as an RBAC model with office glob, "
            "consent, case-number regex and opening-hours terms (bench/casbin_model.py), and "
            "both engines agree on every request before timing. Ours also computes the "
            "released, withheld and masked fields and the reason; casbin only allow/deny. "
            "Tokens: one clerk JWT (EdDSA) verified by `Authenticator`, token cache off and on."
        ),
        header=("what", "per second", "µs each", "× reference"),
        rows=rows,
        verdict="Reference (1.00): pycasbin Enforcer for decisions, the uncached check for tokens.",
        notes=[
            f"Each row ran for at least {min_s:g} s; the request mix: {len(every)} requests, "
            f"{len(allowed)} allowed."
        ],
    )


def _tokens(min_s: float) -> list[tuple[str, ...]]:
    with tempfile.TemporaryDirectory(prefix="certbroker-bench-") as tmp:
        idp = DevIdentityProvider(Path(tmp))
        token = idp.issue("bench-clerk", ["window_clerk"], "gz-haizhu-24h-01")
        uncached = Authenticator([idp.trusted_issuer()], token_max_age_s=0)
        cached = Authenticator([idp.trusted_issuer()])
        off = _rate(uncached.verify, [token], min_s)
        on = _rate(cached.verify, [token], min_s)
    return [
        _row("JWT verification (EdDSA), token cache off", off, off),
        _row("JWT verification (EdDSA), token cache on (hit)", on, off),
    ]


def _enforce(engine: Any) -> Callable[[Request], object]:
    def decide(request: Request) -> object:
        return engine.enforce(*casbin_model.casbin_args(request))

    return decide


def _rate(work: Callable[[Any], object], batch: Sequence[Any], min_s: float) -> float:
    """Calls of ``work`` per second over whole passes of ``batch``, for at least ``min_s``."""
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_s:
        for item in batch:
            work(item)
        done += len(batch)
    return done / elapsed


def _row(what: str, rate: float, reference: float) -> tuple[str, ...]:
    return (what, f"{rate:.0f}", f"{1e6 / rate:.1f}", f"{rate / reference:.2f}")


def _casbin_version() -> str:
    from importlib.metadata import version

    return version("casbin")
