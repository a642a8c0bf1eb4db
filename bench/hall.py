"""Scenario "Policy engine at hall scale": a synthetic catalogue of a city's halls, timed.

:func:`generate` writes a policy directory of :data:`MATTERS` matters and :data:`ROLES` roles,
with rules in the proportion of the shipped set (about one rule per two matters: each
department's windows, the general windows that take in several departments' matters, 24-hour
and police-station variants, narrowed fields and masks), from a seed, so every run times the
same set. :func:`requests` draws a realistic mix from it: mostly lookups some rule allows (a
clerk of the rule's role at one of its offices, in its hours, with an accepted consent and a
case number of its format), and denials of every kind (wrong consent, closed hall, wrong
office, no case number, a matter the role does not handle, a record type the matter does not
need).

The scenario times, in one process, for the shipped set (the baseline, measured in the same
run) and the synthetic one: loading the directory (``policy.load``), reloading it after one
rule was edited (what ``certbroker policy reload`` does besides its audit entry), and each
decision of the mix (``PolicySet.decide``), as median and p99 over every call.

Record types: the shipped catalogue's (the four contract types and the catalogue-declared credit
and housing fund) and :data:`DECLARED` more declared in a generated ``catalogue-hall.yaml``, so
the synthetic set has :data:`RECORD_TYPES_WANTED` = 60, as a city's halls would.

    python -m bench.hall DIR     # write the synthetic policy directory to DIR, to inspect it
"""

from __future__ import annotations

import datetime as dt
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import yaml

from bench.harness import BenchError, Options, Result, percentile
from certbroker import config, policy
from certbroker.auth.authenticator import Clerk
from certbroker.contract import fields as contract
from certbroker.policy.model import Request

SECTION = "Policy engine at hall scale"
MATTERS = 1000
ROLES = 50
#: What the issue asks for, and what the schema can declare today (the built-in types).
RECORD_TYPES_WANTED = 60
#: Catalogue-declared record types the generator adds to the shipped six (four contract types,
#: credit, housing fund), one per synthetic department.
DECLARED = RECORD_TYPES_WANTED - 6
#: The kinds of field a generated record type mixes (a group holds a few scalars).
_FIELD_TYPES = ("string", "integer", "decimal", "boolean", "date", "timestamp", "enum")
#: Targets of the issue.
DECISION_TARGET_US = 10.0
LOAD_TARGET_S = 1.0
SEED = 13
#: Requests in the mix, timed passes over it, loads and reloads timed (full run / smoke).
MIX, SMOKE_MIX = 20_000, 2_000
PASSES, SMOKE_PASSES = 5, 1
LOADS, SMOKE_LOADS = 5, 1
#: Share of the mix drawn from what some rule allows (the rest: denials of every kind).
ALLOWED_SHARE = 0.7

DEPARTMENTS = 20  # domains of matters; each has its own windows (roles)
GENERAL_WINDOWS = 5  # roles that take in several departments' matters (一窗受理)
CITIES = ("gz", "sz", "fs")
CASE_FORMATS = {city: rf"^{city.upper()}\d{{8}}-\d{{6}}$" for city in CITIES}
HALL_HOURS = {
    "days": ["mon", "tue", "wed", "thu", "fri", "sat"],
    "from": "08:30",
    "to": "17:30",
    "utc_offset": "+08:00",
}
CONSENTS = (
    ["id_card_read", "signed_form", "delegated_agent"],
    ["id_card_read", "signed_form"],
    ["signed_form"],
)
_CST = dt.timezone(dt.timedelta(hours=8))
WEDNESDAY_10 = dt.datetime(2026, 11, 18, 10, 0, tzinfo=_CST)
SUNDAY_20 = dt.datetime(2026, 11, 22, 20, 0, tzinfo=_CST)


# ---- the synthetic catalogue ----


def generate(target: Path, *, matters: int = MATTERS, roles: int = ROLES, seed: int = SEED) -> Path:
    """Write a synthetic policy directory to ``target`` (created; must not hold policies)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible on purpose, nothing secret
    target.mkdir(parents=True, exist_ok=True)
    # The shipped departments and record types, and declared ones up to a city's sixty.
    shutil.copy(config.DEFAULT_POLICY_DIR / "catalogue.yaml", target / "catalogue.yaml")
    declared = [_record_type(rng, n) for n in range(DECLARED)]
    _dump(
        target / "catalogue-hall.yaml",
        {
            "departments": [
                {"id": f"dept_{n:02d}", "name": f"委办局 {n:02d}", "endpoints": []}
                for n in range(DECLARED)
            ],
            "record_types": declared,
        },
    )
    paths = {rt: list(contract.field_paths(rt)) for rt in sorted(contract.RECORD_TYPES)}
    paths.update(
        {str(d["name"]): _paths(cast(list[dict[str, object]], d["fields"])) for d in declared}
    )
    codes = [f"S{d:02d}-SX-{i:04d}" for i in range(matters) for d in [i % DEPARTMENTS]]
    matter_entries = [_matter(rng, code, i, paths) for i, code in enumerate(codes)]
    role_ids = [f"role-{r:02d}" for r in range(roles)]
    needs = {str(m["code"]): set(m["needs"]) for m in matter_entries}  # type: ignore[call-overload]
    rules = _rules(rng, codes, needs, role_ids)
    _dump(target / "matters.yaml", {"matters": matter_entries})
    _dump(
        target / "rules.yaml",
        {"roles": [{"id": r, "name": f"窗口 {r}"} for r in role_ids], "rules": rules},
    )
    return target


def _record_type(rng: random.Random, n: int) -> dict[str, object]:
    """A declared record type of 6 to 14 fields of every kind, one of them a repeated group."""
    fields: list[dict[str, object]] = []
    for f in range(rng.randint(5, 13)):
        kind = rng.choice(_FIELD_TYPES)
        field: dict[str, object] = {"name": f"f{f:02d}", "type": kind, "label": f"字段 {f:02d}"}
        if kind == "enum":
            field["values"] = ["甲", "乙", "丙"]
        if kind == "string" and rng.random() < 0.3:
            field["masks"] = ["last4"]
            field["personal"] = True
        fields.append(field)
    fields.append(
        {
            "name": "items",
            "type": "repeated_group",
            "label": "明细",
            "fields": [
                {"name": "on", "type": "date", "label": "日期"},
                {"name": "amount", "type": "decimal", "label": "金额"},
            ],
        }
    )
    return {
        "name": f"rt_{n:02d}",
        "label": f"记录 {n:02d}",
        "department": f"dept_{n:02d}",
        "cache_ttl_s": rng.choice([0, 60, 300]),
        "fields": fields,
    }


def _paths(fields: list[dict[str, object]], prefix: str = "") -> list[str]:
    """The leaf field paths of a declared type (``items.amount``), in declaration order."""
    out: list[str] = []
    for field in fields:
        name = f"{prefix}{field['name']}"
        children = field.get("fields")
        out.extend(_paths(children, f"{name}.") if isinstance(children, list) else [name])
    return out


def _matter(
    rng: random.Random, code: str, index: int, paths: dict[str, list[str]]
) -> dict[str, object]:
    """A matter needing 1 to 4 record types (a built-in one more often than not)."""
    builtin = sorted(contract.RECORD_TYPES)
    declared = sorted(set(paths) - set(builtin))
    kinds = set(rng.sample(builtin, rng.randint(0, 2)) + rng.sample(declared, rng.randint(1, 2)))
    needs = {}
    for rt in sorted(kinds):
        own = paths[rt]
        needs[rt] = sorted(rng.sample(own, rng.randint(1, len(own))), key=own.index)
    return {"code": code, "name": f"事项 {index:04d}", "needs": needs}


def _rules(
    rng: random.Random, codes: list[str], needs: dict[str, set[str]], roles: list[str]
) -> list[dict[str, object]]:
    """About one rule per two matters, as in the shipped set."""
    by_department = [codes[d::DEPARTMENTS] for d in range(DEPARTMENTS)]
    general, own = roles[:GENERAL_WINDOWS], roles[GENERAL_WINDOWS:]
    rules: list[dict[str, object]] = []
    # Each department's windows: its matters in chunks, in the staffed halls of one city, and
    # now and then a variant for police stations that sees a few household fields only.
    for r, role in enumerate(own):
        department = by_department[r % DEPARTMENTS]
        city = CITIES[r % len(CITIES)]
        for c in range(0, len(department), 5):
            chunk = department[c : c + 5]
            rules.append(_rule(rng, f"{role}-hall-{c // 5:02d}", role, chunk, city, "hall"))
            household = [m for m in chunk if "household" in needs[m]]
            if household and rng.random() < 0.3:
                variant = _rule(rng, f"{role}-pcs-{c // 5:02d}", role, household, city, "pcs")
                variant["record_types"] = ["household"]
                variant["fields"] = {"household": ["name", "birth_date", "registered_address"]}
                rules.append(variant)
    # The general windows (一窗受理): several departments each, in staffed halls and at night.
    for g, role in enumerate(general):
        city = CITIES[g % len(CITIES)]
        for d in range(g, DEPARTMENTS, GENERAL_WINDOWS):
            department = by_department[d]
            for c in range(0, len(department), 10):
                chunk = department[c : c + 10]
                rules.append(
                    _rule(rng, f"{role}-d{d:02d}-{c // 10:02d}", role, chunk, city, "hall")
                )
            rules.append(_rule(rng, f"{role}-d{d:02d}-24h", role, department[:5], city, "24h"))
    return rules


def _rule(
    rng: random.Random, rule_id: str, role: str, matters: list[str], city: str, office_kind: str
) -> dict[str, object]:
    conditions: dict[str, object] = {
        "offices": [f"{city}-*-{office_kind}-*"],
        "consent": rng.choice(CONSENTS),
        "case_number": {"pattern": CASE_FORMATS[city]},
    }
    if office_kind != "24h":
        conditions["hours"] = HALL_HOURS
    rule: dict[str, object] = {
        "id": rule_id,
        "description": f"synthetic rule {rule_id}",
        "roles": [role],
        "matters": matters,
        "conditions": conditions,
    }
    if rng.random() < 0.4:
        rule["masks"] = {
            "marriage": {"spouse_resident_id": "last4"},
            "social_security": {"social_security_number": "last4"},
        }
    return rule


def _dump(path: Path, data: object) -> None:
    path.write_text(
        yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=100), encoding="utf-8"
    )


# ---- the request mix ----


def requests(policies: policy.PolicySet, count: int, seed: int = SEED) -> list[Request]:
    """``count`` lookups: :data:`ALLOWED_SHARE` drawn from what a rule allows, the rest
    denials of every kind (module docstring)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible on purpose, nothing secret
    rules = [r for r in policies.rules if r.matters]
    roles = sorted(policies.roles)
    out = []
    for _ in range(count):
        rule = rng.choice(rules)
        matter = policies.matters[rng.choice(rule.matters)]
        kinds = [rt for rt in matter.needs if not rule.record_types or rt in rule.record_types]
        record_type = rng.choice(kinds)
        cond = rule.conditions
        office = _office(rng, rng.choice(cond.offices)) if cond.offices else "gz-x-hall-01"
        pattern = cond.case_number_pattern.pattern if cond.case_number_pattern else ""
        city = pattern[1:3] if pattern[1:3].isalpha() else "GZ"  # ^GZ\d{8}... or ^[A-Z]{2}...
        needed = matter.needs[record_type]
        fields: tuple[str, ...] = ()
        if rng.random() < 0.3:  # a clerk asking for some fields only
            fields = tuple(rng.sample(needed, rng.randint(1, len(needed))))
        request = Request(
            clerk=Clerk(f"clerk-{rng.randrange(10_000):04d}", (rng.choice(rule.roles),), office),
            record_type=record_type,
            matter_code=matter.code,
            case_number=f"{city}20261118-{rng.randrange(1_000_000):06d}",
            consent_method=rng.choice(cond.consent) if cond.consent else "id_card_read",
            fields=fields,
            now=WEDNESDAY_10,
        )
        if rng.random() >= ALLOWED_SHARE:
            request = _spoil(rng, request, policies, roles)
        out.append(request)
    return out


def _office(rng: random.Random, pattern: str) -> str:
    names = ("tianhe", "haizhu", "yuexiu", "liwan", "baiyun", "panyu", "futian", "nanshan")
    parts = pattern.split("-")
    filled = [
        rng.choice(names) if i == 1 else f"{rng.randint(1, 9):02d}" for i in range(len(parts))
    ]
    return "-".join(p if p != "*" else filled[i] for i, p in enumerate(parts))


def _spoil(
    rng: random.Random, request: Request, policies: policy.PolicySet, roles: list[str]
) -> Request:
    """The request, made a denial of one kind (it may still be allowed by another rule)."""
    kind = rng.randrange(6)
    if kind == 0:
        return _replace(request, consent_method="")
    if kind == 1:
        return _replace(request, now=SUNDAY_20)
    if kind == 2:
        clerk = Clerk(request.clerk.sub, request.clerk.roles, "xa-yanta-hall-01")
        return _replace(request, clerk=clerk)
    if kind == 3:
        return _replace(request, case_number="")
    if kind == 4:
        clerk = Clerk(request.clerk.sub, (rng.choice(roles),), request.clerk.office)
        return _replace(request, clerk=clerk)
    needs = policies.matters[request.matter_code].needs
    other = [rt for rt in policies.record_types if rt not in needs]
    return _replace(request, record_type=rng.choice(other), fields=()) if other else request


def _replace(request: Request, **changes: object) -> Request:
    import dataclasses

    return dataclasses.replace(request, **changes)  # type: ignore[arg-type]


# ---- timing ----


@dataclass(frozen=True)
class Scale:
    """What one policy directory measured."""

    matters: int
    roles: int
    rules: int
    record_types: int
    load_s: float  # median of the timed loads (wall clock)
    reload_s: float  # median of the timed reloads of the edited directory (wall clock)
    load_cpu_s: float  # the same, in this process's CPU time
    reload_cpu_s: float
    decision_p50_us: float
    decision_p99_us: float
    fastest_p99_us: float  # p99 over requests of each one's fastest pass
    first_pass_p99_us: float  # the first pass after a load: nothing remembered yet
    allowed: float  # share of the mix allowed


def measure(directory: Path, mix: int, passes: int, loads: int) -> Scale:
    """Load, reload (after editing one rule) and decide a mix drawn from ``directory``."""
    load_times = [_timed(lambda: policy.load(directory)) for _ in range(loads)]
    policies = policy.load(directory)
    batch = requests(policies, mix)
    edited = directory.parent / f"{directory.name}-edited"
    shutil.copytree(directory, edited)
    rules_file = next(p for p in sorted(edited.glob("*.yaml")) if p.name.startswith("rules"))
    rules_file.write_text(
        rules_file.read_text(encoding="utf-8") + "\n# reviewed\n", encoding="utf-8"
    )
    reload_times = []
    for _ in range(loads):  # the old set serves while the new one is read, as in the broker
        reload_times.append(_timed(lambda: policy.load(edited)))
    first = _decision_times(policy.load(directory), batch)
    _decision_times(policies, batch)  # untimed: the set in force has served these before
    runs = [_decision_times(policies, batch) for _ in range(passes)]
    steady = [t for run in runs for t in run]
    # Each request's fastest pass: what the decision costs without the other processes of a
    # shared machine preempting it mid-call (which the raw p99 includes).
    fastest = [min(times) for times in zip(*runs, strict=True)]
    allowed = sum(policies.decide(r).allowed for r in batch) / len(batch)
    return Scale(
        matters=len(policies.matters),
        roles=len(policies.roles),
        rules=len(policies.rules),
        record_types=len(policies.record_types),
        load_s=statistics.median(w for w, _ in load_times),
        reload_s=statistics.median(w for w, _ in reload_times),
        load_cpu_s=statistics.median(c for _, c in load_times),
        reload_cpu_s=statistics.median(c for _, c in reload_times),
        decision_p50_us=statistics.median(steady),
        decision_p99_us=percentile(steady, 99),
        fastest_p99_us=percentile(fastest, 99),
        first_pass_p99_us=percentile(first, 99),
        allowed=allowed,
    )


def _timed(work: Callable[[], object]) -> tuple[float, float]:
    """(wall, CPU) seconds of ``work``: other processes on the machine stretch the first."""
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


def _decision_times(policies: policy.PolicySet, batch: Sequence[Request]) -> list[float]:
    """µs of each decision, timed one by one."""
    decide, clock = policies.decide, time.perf_counter_ns
    out = []
    for request in batch:
        started = clock()
        decide(request)
        out.append((clock() - started) / 1000)
    return out


def run(options: Options) -> Result:
    """Measure the shipped set (baseline) and the synthetic hall-scale set in this run."""
    mix = SMOKE_MIX if options.smoke else MIX
    passes = options.count(PASSES, SMOKE_PASSES)
    loads = options.count(LOADS, SMOKE_LOADS)
    with tempfile.TemporaryDirectory(prefix="certbroker-hall-") as tmp:
        shipped = Path(tmp) / "shipped"
        shutil.copytree(config.DEFAULT_POLICY_DIR, shipped, ignore=shutil.ignore_patterns("tests"))
        synthetic = generate(Path(tmp) / "synthetic")
        try:
            base = measure(shipped, mix, passes, loads)
            hall = measure(synthetic, mix, passes, loads)
        except policy.PolicyError as exc:
            raise BenchError(f"a policy set of the scenario does not load: {exc}") from None
    rows = [
        _row("load (policy.load), s", base.load_s, hall.load_s, LOAD_TARGET_S, "{:.3f}"),
        _row("load, CPU s", base.load_cpu_s, hall.load_cpu_s, LOAD_TARGET_S, "{:.3f}"),
        _row("reload after one edit, s", base.reload_s, hall.reload_s, LOAD_TARGET_S, "{:.3f}"),
        _row("reload, CPU s", base.reload_cpu_s, hall.reload_cpu_s, LOAD_TARGET_S, "{:.3f}"),
        _row(
            "decision, median µs",
            base.decision_p50_us,
            hall.decision_p50_us,
            DECISION_TARGET_US,
            "{:.1f}",
        ),
        _row(
            "decision, p99 µs",
            base.decision_p99_us,
            hall.decision_p99_us,
            DECISION_TARGET_US,
            "{:.1f}",
        ),
        _row(
            "decision, p99 µs of each request's fastest pass",
            base.fastest_p99_us,
            hall.fastest_p99_us,
            None,
            "{:.1f}",
        ),
        _row(
            "decision, p99 µs, first pass after a load",
            base.first_pass_p99_us,
            hall.first_pass_p99_us,
            None,
            "{:.1f}",
        ),
    ]
    met = sum(row[-1] == "met" for row in rows)
    return Result(
        section=SECTION,
        setup=(
            "In one process, single-threaded. Baseline: the shipped policy set "
            f"({_size(base)}). Hall scale: a synthetic set from bench/hall.py ({_size(hall)}; "
            f"seed {SEED}), rules in the shipped set's proportion. Each mix: {mix} lookups, "
            f"{ALLOWED_SHARE:.0%} drawn from what a rule allows and the rest spoiled into "
            "denials (consent, hours, office, case number, role, record type); decisions "
            f"timed one by one over {passes} pass(es) after an untimed one (the first pass "
            f"after a load is timed apart); {loads} load(s) and reload(s)."
        ),
        header=("what", "shipped set", "hall scale", "× shipped", "target", "met"),
        rows=rows,
        verdict=f"Targets met at hall scale: {met} of {sum(row[4] != '-' for row in rows)}.",
        notes=[
            f"Allowed share of the mix: shipped {base.allowed:.0%}, hall scale {hall.allowed:.0%}.",
            f"Record types: {hall.record_types} at hall scale (the shipped six and "
            f"{DECLARED} catalogue-declared ones); a decision looks a record type up by name.",
            "Reload = reading and validating the edited directory while the old set serves "
            "(what `certbroker policy reload` does besides writing its audit entry).",
            "Times are wall clock unless marked CPU; on a machine shared with other work the "
            "wall-clock times, and the p99s most, include time spent preempted (see the load "
            "average below). The synthetic mix is uniform over matters and roles, so few "
            "requests repeat: a harsher test of the engine's memo than a real hall's skewed mix.",
        ],
    )


def _size(scale: Scale) -> str:
    return (
        f"{scale.matters} matters, {scale.roles} roles, {scale.rules} rules, "
        f"{scale.record_types} record types"
    )


def _row(what: str, base: float, hall: float, target: float | None, fmt: str) -> tuple[str, ...]:
    if target is None:
        judged = ("-", "-")
    else:
        judged = (f"≤ {target:g}", "met" if hall <= target else "NOT met")
    return (what, fmt.format(base), fmt.format(hall), f"{hall / base:.2f}", *judged)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.hall DIR``: write the synthetic policy directory to DIR."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.hall DIR", file=sys.stderr)
        return 2
    target = Path(args[0])
    if target.exists() and any(target.glob("*.yaml")):
        print(f"error: {target} already holds policy files", file=sys.stderr)
        return 1
    loaded = policy.load(generate(target))
    print(
        f"{target}: {len(loaded.matters)} matters, {len(loaded.roles)} roles, "
        f"{len(loaded.rules)} rules, {len(loaded.record_types)} record types"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
