"""Policy unit tests (``certbroker policy test``), in the spirit of ``opa test``.

A test file (``policies/tests/*.yaml``) gives a clerk, a request and a time, and the decision it
expects::

    at: "2025-03-03T10:00:00+08:00"      # default time for the file's tests (a Monday)
    clerks:                               # named clerks the tests can refer to
      haizhu_window: {roles: [window_clerk], office: gz-haizhu-hall-01}
    tests:
      - name: window clerk reads the spouse's ID masked
        clerk: haizhu_window              # a name from `clerks`, or an inline mapping
        at: "2025-03-03T20:00:00+08:00"   # optional override
        request: {record_type: marriage, matter: BDC-ZY-001, case_number: GZ20250303-000123,
                  consent: id_card_read, fields: [spouse_resident_id]}   # fields optional
        expect:
          decision: allow                 # allow | deny; `rule` is then required
          rule: window-clerk-hall
          fields: [spouse_resident_id]    # optional; compared as sets
          withheld: []                    # optional; compared as sets
          masks: {spouse_resident_id: last4}   # optional; exact
          condition: OUTSIDE_HOURS        # optional
          reason_contains: opening hours  # optional substring of the human reason
          # or, instead of decision/rule: error: UNKNOWN_FIELD  (an InvalidArgument reason)

      - name: the 61st distinct citizen within an hour is refused
        clerk: haizhu_window
        history:                          # optional: lookups this clerk was admitted before,
          - {at: "2025-03-03T09:30:00+08:00", citizens: 60}   # one each of 60 other citizens
          - {at: "2025-03-03T09:59:00+08:00", lookups: 2}     # 2 of the request's citizen
        request: {record_type: property, matter: BDC-ZY-001, ...}
        expect: {decision: deny, rule: window-clerk-citizens, condition: QUOTA_EXCEEDED}

A test's history and request are counted by the broker's own quota counter
(:class:`certbroker.policy.counters.SqliteQuotaCounter`, in memory, one per test), under the
quotas of the clerk's roles: a request the policy allows but a quota refuses is denied with the
quota's id as ``rule`` and condition ``QUOTA_EXCEEDED``. A history entry that a quota refuses
itself fails the test (it cannot have happened). The clerk's ``sub`` is the counter's key.

A malformed test or file is reported as a failure (with ``path:line``), never raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from certbroker.auth.authenticator import Clerk
from certbroker.errors import InvalidArgument
from certbroker.policy.counters import SqliteQuotaCounter, refusal
from certbroker.policy.loader import load
from certbroker.policy.model import Decision, PolicySet, Request
from certbroker.policy.reader import Reader

#: The citizen a test's request is about, for quotas (a policy decision names none).
_REQUEST_CITIZEN = "request-citizen"


@dataclass
class TestReport:
    """Outcome of a run: one ``failures`` entry (``path:line: ...``) per failed test or file."""

    __test__ = False  # tell pytest this is not a test class

    passed: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def ok(self) -> bool:
        """True when at least one test ran and none failed."""
        return self.passed > 0 and not self.failures


@dataclass(frozen=True)
class _Past:
    """One ``history`` entry: at ``at``, one lookup each of ``citizens`` other citizens and
    ``lookups`` lookups of the request's citizen."""

    at: datetime
    citizens: int
    lookups: int
    where: str


@dataclass(frozen=True)
class _Expect:
    decision: str | None
    rule: str | None
    error: str | None
    condition: str | None
    fields: frozenset[str] | None
    withheld: frozenset[str] | None
    masks: dict[str, str] | None
    reason_contains: str | None


def run_tests(policy_dir: Path, tests_dir: Path | None = None) -> TestReport:
    """Run every ``*.yaml`` in ``tests_dir`` (default ``policy_dir/tests``) against the policy
    set in ``policy_dir``. Raises PolicyError if the policy set itself does not load."""
    policy_set = load(policy_dir)
    tests_dir = policy_dir / "tests" if tests_dir is None else tests_dir
    report = TestReport()
    files = sorted(tests_dir.glob("*.yaml")) if tests_dir.is_dir() else []
    if not files:
        report.failures.append(f"{tests_dir}:1: no policy test files (*.yaml)")
    for path in files:
        _run_file(policy_set, path, report)
    return report


def _run_file(policy_set: PolicySet, path: Path, report: TestReport) -> None:
    errors: list[str] = []
    r = Reader(str(path), errors)
    try:
        root = r.compose(path.read_bytes())
    except OSError as exc:
        report.failures.append(f"{path}:1: cannot read: {exc.strerror or exc}")
        return
    if root is None:
        report.failures.append("; ".join(errors) or f"{path}:1: empty test file")
        return
    top = r.mapping(root, "test file", required=("tests",), optional=("at", "clerks")) or {}
    default_at = _time(r, top["at"], "at") if "at" in top else None
    clerks: dict[str, Clerk] = {}
    for name, _, node in (r.pairs(top["clerks"], "clerks") or []) if "clerks" in top else []:
        clerk = _clerk(r, node, f"clerk {name}")
        if clerk is not None:
            clerks[name] = clerk
    tests = (r.sequence(top["tests"], "tests") or []) if "tests" in top else []
    if errors:
        # A broken header would make every test fail for the same reason: report it once.
        report.failures.append("; ".join(errors))
        return
    seen: set[str] = set()
    for item in tests:
        problem = _run_one(
            policy_set, str(path), item, clerks=clerks, default_at=default_at, seen=seen
        )
        if problem is None:
            report.passed += 1
        else:
            report.failures.append(problem)


def _run_one(
    policy_set: PolicySet,
    display: str,
    item: yaml.Node,
    *,
    clerks: dict[str, Clerk],
    default_at: datetime | None,
    seen: set[str],
) -> str | None:
    """Run one test; return its failure message, or None when it passes."""
    errors: list[str] = []
    r = Reader(display, errors)
    m = r.mapping(
        item,
        "test",
        required=("name", "clerk", "request", "expect"),
        optional=("at", "history"),
    )
    if m is None:
        return "; ".join(errors)
    name = (r.string(m["name"], "test name") if "name" in m else None) or "?"
    label = f"{r.at(item)}: test {name!r}"
    if name in seen:
        r.error(m["name"], f"another test in this file is named {name!r}")
    seen.add(name)
    clerk = _clerk_ref(r, m["clerk"], clerks) if "clerk" in m else None
    now = _time(r, m["at"], "test at") if "at" in m else default_at
    if now is None and "at" not in m:
        r.error(item, "test: no time: give `at` in the test or at the top of the file")
    request = _request(r, m["request"], clerk, now) if "request" in m else None
    expect = _expect(r, m["expect"]) if "expect" in m else None
    history = _history(r, m["history"]) if "history" in m else []
    if errors or request is None or expect is None:
        return f"{label}: malformed: " + "; ".join(errors)
    problems = _compare(policy_set, request, expect, history)
    return f"{label}: " + "; ".join(problems) if problems else None


def _compare(
    policy_set: PolicySet, request: Request, expect: _Expect, history: list[_Past]
) -> list[str]:
    try:
        decision = policy_set.decide(request)
    except InvalidArgument as exc:
        if expect.error == exc.reason:
            return []
        wanted = expect.decision or f"error {expect.error}"
        return [f"expected {wanted}, got InvalidArgument {exc.reason}: {exc.message}"]
    quotas = policy_set.quotas_for(request.clerk.roles)
    if decision.allowed and quotas:
        counter = SqliteQuotaCounter(":memory:")
        try:
            clerk = request.clerk.sub
            for past in history:
                subjects = [f"{past.where}#{i}" for i in range(past.citizens)]
                subjects += [_REQUEST_CITIZEN] * past.lookups
                refused = counter.admit(clerk, subjects, quotas, past.at.timestamp())
                over = next((q for q in refused if q is not None), None)
                if over is not None:
                    return [
                        f"history at {past.where}: quota {over.id} refuses it ({over.describe()})"
                    ]
            (over,) = counter.admit(clerk, [_REQUEST_CITIZEN], quotas, request.now.timestamp())
        finally:
            counter.close()
        if over is not None:
            decision = refusal(policy_set, decision, over)
    got = _verdict(decision)
    if expect.error is not None:
        return [f"expected InvalidArgument {expect.error}, got {got}"]
    problems = []
    if decision.allowed != (expect.decision == "allow"):
        problems.append(f"expected {expect.decision}, got {got}")
    if expect.rule != decision.rule_id:
        problems.append(f"expected rule {expect.rule}, got {got}")
    if expect.condition is not None and expect.condition != decision.condition:
        problems.append(
            f"expected condition {expect.condition}, got {decision.condition or 'none'}"
        )
    for what, want, have in (
        ("fields", expect.fields, decision.fields),
        ("withheld", expect.withheld, decision.withheld),
    ):
        if want is not None and want != set(have):
            problems.append(f"expected {what} {sorted(want)}, got {list(have)}")
    if expect.masks is not None and expect.masks != dict(decision.masks):
        problems.append(f"expected masks {expect.masks}, got {dict(decision.masks)}")
    if expect.reason_contains is not None and expect.reason_contains not in decision.reason:
        problems.append(
            f"expected reason containing {expect.reason_contains!r}, got {decision.reason!r}"
        )
    return problems


def _history(r: Reader, node: yaml.Node) -> list[_Past]:
    out = []
    for entry in r.sequence(node, "history") or []:
        m = r.mapping(entry, "history entry", required=("at",), optional=("citizens", "lookups"))
        if m is None or "at" not in m:
            continue
        at = _time(r, m["at"], "history at")
        counts = {k: r.integer(m[k], f"history {k}") for k in ("citizens", "lookups") if k in m}
        if not counts:
            r.error(entry, "history entry: give `citizens` and/or `lookups`")
        for key, value in counts.items():
            if value is not None and not 0 <= value <= 100_000:
                r.error(m[key], f"history {key}: must be 0..100000")
                counts[key] = None
        if at is not None and None not in counts.values():
            out.append(
                _Past(at, counts.get("citizens") or 0, counts.get("lookups") or 0, r.at(entry))
            )
    return out


def _verdict(decision: Decision) -> str:
    condition = f" [{decision.condition}]" if decision.condition else ""
    verb = "allow" if decision.allowed else "deny"
    return f"{verb} by {decision.rule_id}{condition} ({decision.reason})"


def _time(r: Reader, node: yaml.Node, what: str) -> datetime | None:
    # Read as written: unquoted ISO times are YAML timestamps, which we do not construct.
    text = r.string(node, what, as_written=True)
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.utcoffset() is None:
        r.error(
            node,
            f"{what}: expected an ISO time with offset like "
            f"2025-03-03T10:00:00+08:00, got {text!r}",
        )
        return None
    return value


def _clerk(r: Reader, node: yaml.Node, what: str) -> Clerk | None:
    m = r.mapping(node, what, required=("roles", "office"), optional=("sub", "name", "issuer"))
    if m is None or "roles" not in m or "office" not in m:
        return None
    roles = r.strings(m["roles"], f"{what} roles", allow_empty=True)
    office = r.string(m["office"], f"{what} office")
    texts = {k: r.string(m[k], f"{what} {k}") or "" for k in ("sub", "name", "issuer") if k in m}
    if roles is None or office is None:
        return None
    return Clerk(
        sub=texts.get("sub") or "policy-test",
        roles=tuple(x for x, _ in roles),
        office=office,
        issuer=texts.get("issuer", ""),
        name=texts.get("name", ""),
    )


def _clerk_ref(r: Reader, node: yaml.Node, clerks: dict[str, Clerk]) -> Clerk | None:
    if not isinstance(node, yaml.ScalarNode):
        return _clerk(r, node, "test clerk")
    name = r.string(node, "test clerk")
    if name is not None and name not in clerks:
        r.error(
            node,
            f"test clerk: unknown clerk {name!r} (file defines: {', '.join(clerks) or 'none'})",
        )
    return None if name is None else clerks.get(name)


def _request(
    r: Reader, node: yaml.Node, clerk: Clerk | None, now: datetime | None
) -> Request | None:
    m = r.mapping(
        node,
        "request",
        required=("record_type", "matter"),
        optional=("case_number", "consent", "fields"),
    )
    if m is None:
        return None
    text = {k: r.string(v, f"request {k}") for k, v in m.items() if k != "fields"}
    fields = r.strings(m["fields"], "request fields", allow_empty=True) if "fields" in m else []
    record_type, matter = text.get("record_type"), text.get("matter")
    if clerk is None or now is None or record_type is None or matter is None or fields is None:
        return None
    return Request(
        clerk=clerk,
        record_type=record_type,
        matter_code=matter,
        case_number=text.get("case_number") or "",
        consent_method=text.get("consent") or "",
        fields=tuple(f for f, _ in fields),
        now=now,
    )


def _expect(r: Reader, node: yaml.Node) -> _Expect | None:
    m = r.mapping(
        node,
        "expect",
        optional=(
            "decision",
            "rule",
            "error",
            "condition",
            "fields",
            "withheld",
            "masks",
            "reason_contains",
        ),
    )
    if m is None:
        return None
    text = {
        k: r.string(m[k], f"expect {k}")
        for k in ("decision", "rule", "error", "condition", "reason_contains")
        if k in m
    }
    decision = text.get("decision")
    if ("decision" in m) == ("error" in m):
        r.error(node, "expect: give exactly one of `decision` (with `rule`) and `error`")
    elif "decision" in m and "rule" not in m:
        r.error(node, "expect: `decision` needs the `rule` that decides")
    if decision is not None and decision not in ("allow", "deny"):
        r.error(m["decision"], f"expect decision: expected allow or deny, got {decision!r}")

    def field_set(key: str) -> frozenset[str] | None:
        if key not in m:
            return None
        return frozenset(f for f, _ in r.strings(m[key], f"expect {key}", allow_empty=True) or [])

    masks = None
    if "masks" in m:
        masks = {
            path: r.string(v, f"expect mask of {path}") or ""
            for path, _, v in r.pairs(m["masks"], "expect masks") or []
        }
    return _Expect(
        decision=decision,
        rule=text.get("rule"),
        error=text.get("error"),
        condition=text.get("condition"),
        fields=field_set("fields"),
        withheld=field_set("withheld"),
        masks=masks,
        reason_contains=text.get("reason_contains"),
    )
