"""Anomaly rules over lookup audit entries: patterns worth an auditor's attention.

Pure functions over the lookups of a time range, as slim :class:`Lookup` records: the few values
the rules read. :func:`find` takes :class:`~certbroker.audit.events.AuditEntry` lists;
:func:`find_lookups` takes the records :func:`certbroker.audit.lookups.read_lookups` reads
straight from the store's columns (the Audit service's path: no body is rebuilt). Each
:class:`Finding` names the clerk and the sequences of the entries behind it. Rules
(``Finding.rule``):

``NO_CASE_NUMBER``
    Lookups without a case number (办件号), one finding per clerk.
``OUTSIDE_HOURS``
    Lookups outside the office's opening hours, one finding per clerk. The hours are derived
    from the policy rules: the rules whose ``offices`` globs match the entry's office; if any
    of them has no ``hours`` condition the office is open around the clock (a 24-hour hall),
    otherwise it is open during any of their windows. An office no rule names gets
    :attr:`Thresholds.default_hours` (Mon–Sat 08:30–17:30 +08:00). The policy in force at
    analysis time is used, not the one recorded in the entry.
``MANY_SUBJECTS``
    A clerk looked up at least :attr:`Thresholds.many_subjects` distinct citizens.
``REPEATED_SUBJECT``
    A clerk looked up the same citizen under at least :attr:`Thresholds.repeated_cases`
    distinct case numbers (unrelated cases), one finding per (clerk, citizen).
``DENIAL_BURST``
    At least :attr:`Thresholds.denial_burst` denied calls of one clerk within
    :attr:`Thresholds.burst_window`; overlapping windows merge into one finding. The denied
    items of one ``LookupMatter`` call (a bundle or a package: same ``bundle_id``) count as one
    call: a package with one member matter the clerk may not handle denies that matter's items
    for every subject at once, which is one act at the counter, not a burst.
``QUOTA_EXCEEDED``
    Lookups refused because the clerk reached a quota of the policy
    (:mod:`certbroker.policy.quota`), one finding per clerk naming the quotas: a clerk who
    reaches a quota is looking up more citizens, or more often, than the counter's work needs.
    Every refusal counts (one is enough: quotas are sized well above honest work).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from certbroker.audit.events import AuditEntry
from certbroker.audit.scan import entry_time
from certbroker.policy.model import Hours, PolicySet

NO_CASE_NUMBER = "NO_CASE_NUMBER"
OUTSIDE_HOURS = "OUTSIDE_HOURS"
MANY_SUBJECTS = "MANY_SUBJECTS"
REPEATED_SUBJECT = "REPEATED_SUBJECT"
DENIAL_BURST = "DENIAL_BURST"
CITIZEN_DISPUTE = "CITIZEN_DISPUTE"
QUOTA_EXCEEDED = "QUOTA_EXCEEDED"  # the refusal's own reason (certbroker.contract.reasons)

#: Mon–Sat 08:30–17:30 at UTC+08:00: the staffed halls' hours.
HALL_HOURS = Hours(
    days=(0, 1, 2, 3, 4, 5),
    start_min=8 * 60 + 30,
    end_min=17 * 60 + 30,
    utc_offset=timedelta(hours=8),
)


_MINUTE = timedelta(minutes=1)
_ZERO = timedelta(0)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)


@dataclass(frozen=True)
class Thresholds:
    """Tunable limits of the anomaly rules."""

    many_subjects: int = 20
    repeated_cases: int = 3
    denial_burst: int = 5
    burst_window: timedelta = timedelta(minutes=10)
    default_hours: tuple[Hours, ...] = (HALL_HOURS,)


@dataclass(frozen=True)
class Finding:
    """One anomaly: which rule, which clerk, a human description, the entries behind it."""

    rule: str
    clerk: str
    description: str
    sequences: tuple[int, ...]


class Lookup(NamedTuple):
    """What the rules read of one lookup entry (``time`` in milliseconds since the epoch, the
    precision entries are stored at)."""

    sequence: int
    time: int
    clerk: str
    office: str
    subject_id: str
    case_number: str
    decision: str
    bundle_id: str
    outcome: str  # QUOTA_EXCEEDED: refused past a quota
    rule_id: str  # the rule, or the quota, that decided


def lookup_of(entry: AuditEntry) -> Lookup:
    """The :class:`Lookup` record of a fully read entry."""
    event = entry.event
    return Lookup(
        entry.sequence,
        (entry_time(entry) - EPOCH) // MILLISECOND,
        event.clerk,
        event.office,
        event.subject_id,
        event.case_number,
        event.decision,
        event.bundle_id,
        event.outcome,
        event.rule_id,
    )


def office_hours(policy: PolicySet, office: str, default: Sequence[Hours]) -> tuple[Hours, ...]:
    """Opening windows of ``office`` from the rules naming it; ``()`` = open around the clock."""
    rules = [
        rule for rule in policy.rules if rule.conditions.offices and rule.office_allows(office)
    ]
    if not rules:
        return tuple(default)
    if any(not rule.conditions.hours for rule in rules):
        return ()
    return tuple(h for rule in rules for h in rule.conditions.hours)


def _by_clerk(entries: Iterable[Lookup]) -> dict[str, list[Lookup]]:
    groups: dict[str, list[Lookup]] = defaultdict(list)
    for entry in entries:
        groups[entry.clerk].append(entry)
    return groups


def _seqs(entries: Iterable[Lookup]) -> tuple[int, ...]:
    return tuple(sorted(entry.sequence for entry in entries))


def no_case_number(entries: Sequence[Lookup]) -> list[Finding]:
    """Lookups without a case number, per clerk."""
    missing = [e for e in entries if not e.case_number]
    return [
        Finding(
            NO_CASE_NUMBER, clerk, f"{len(group)} lookup(s) without a case number", _seqs(group)
        )
        for clerk, group in sorted(_by_clerk(missing).items())
    ]


def outside_hours(
    entries: Sequence[Lookup], policy: PolicySet, thresholds: Thresholds
) -> list[Finding]:
    """Lookups outside the opening hours of the office they came from, per clerk."""
    cache: dict[str, tuple[tuple[Hours, ...], int, bool]] = {}
    # Windows start and end on whole local minutes; with a whole-minute UTC offset every
    # instant of one UTC minute is inside or outside alike, so the answer is kept per minute
    # and set of windows (offices share them): at most 1,440 checks a day per set.
    sets: dict[tuple[Hours, ...], int] = {}
    known: dict[tuple[int, int], bool] = {}
    late: list[Lookup] = []
    for entry in entries:
        office = entry.office
        if office not in cache:
            windows = office_hours(policy, office, thresholds.default_hours)
            aligned = all(w.utc_offset % _MINUTE == _ZERO for w in windows)
            cache[office] = windows, sets.setdefault(windows, len(sets)), aligned
        windows, windows_id, by_minute = cache[office]
        if not windows:
            continue
        if by_minute:
            key = (windows_id, entry.time // 60_000)
            outside = known.get(key)
            if outside is None:
                moment = EPOCH + entry.time * MILLISECOND
                outside = known[key] = not any(w.contains(moment) for w in windows)
        else:
            moment = EPOCH + entry.time * MILLISECOND
            outside = not any(w.contains(moment) for w in windows)
        if outside:
            late.append(entry)
    return [
        Finding(
            OUTSIDE_HOURS,
            clerk,
            f"{len(group)} lookup(s) outside the opening hours of "
            + ", ".join(sorted({e.office for e in group})),
            _seqs(group),
        )
        for clerk, group in sorted(_by_clerk(late).items())
    ]


def many_subjects(entries: Sequence[Lookup], thresholds: Thresholds) -> list[Finding]:
    """Clerks who looked up at least ``many_subjects`` distinct citizens."""
    findings = []
    for clerk, group in sorted(_by_clerk(entries).items()):
        if len(group) < thresholds.many_subjects:  # too few lookups to reach it
            continue
        subjects = {e.subject_id for e in group if e.subject_id}
        if len(subjects) >= thresholds.many_subjects:
            limit = thresholds.many_subjects
            text = f"{len(subjects)} distinct citizens looked up (threshold {limit})"
            findings.append(Finding(MANY_SUBJECTS, clerk, text, _seqs(group)))
    return findings


def repeated_subject(entries: Sequence[Lookup], thresholds: Thresholds) -> list[Finding]:
    """A clerk looking up one citizen under ``repeated_cases`` or more distinct case numbers."""
    # Most citizens of a day are looked up once: count them first, group only the others.
    counted = Counter(e.subject_id for e in entries if e.subject_id and e.case_number)
    groups: dict[tuple[str, str], list[Lookup]] = defaultdict(list)
    for entry in entries:
        if entry.case_number and counted[entry.subject_id] >= thresholds.repeated_cases:
            groups[(entry.clerk, entry.subject_id)].append(entry)
    # Most (clerk, citizen) pairs of a day are one lookup: count first, sort only what fires.
    firing = []
    for key, group in groups.items():
        if len(group) >= thresholds.repeated_cases:
            cases = len({e.case_number for e in group})
            if cases >= thresholds.repeated_cases:
                firing.append((key, cases, group))
    findings = []
    for (clerk, subject), cases, group in sorted(firing, key=lambda item: item[0]):
        text = f"citizen {subject} looked up under {cases} different case numbers"
        findings.append(Finding(REPEATED_SUBJECT, clerk, text, _seqs(group)))
    return findings


def denial_bursts(entries: Sequence[Lookup], thresholds: Thresholds) -> list[Finding]:
    """Runs of at least ``denial_burst`` denied calls of one clerk within ``burst_window``
    (the denied items of one bundle count once; the finding names all their entries)."""
    findings = []
    # The least whole number of milliseconds that is at least the window (times are ms).
    window = -(-thresholds.burst_window // MILLISECOND)
    denied = [e for e in entries if e.decision == "deny"]
    for clerk, group in sorted(_by_clerk(denied).items()):
        calls: dict[str, list[Lookup]] = defaultdict(list)
        for entry in group:
            calls[entry.bundle_id or f"seq:{entry.sequence}"].append(entry)
        timed: list[tuple[int, list[Lookup]]] = sorted(
            ((min(e.time for e in call), call) for call in calls.values()),
            key=lambda pair: (pair[0], pair[1][0].sequence),
        )
        marked = [False] * len(timed)
        start = 0
        for end in range(len(timed)):
            while timed[end][0] - timed[start][0] >= window:
                start += 1
            if end - start + 1 >= thresholds.denial_burst:
                for i in range(start, end + 1):
                    marked[i] = True
        runs: list[list[list[Lookup]]] = [[]]
        for flag, (_, call) in zip(marked, timed, strict=True):
            if flag:
                runs[-1].append(call)
            elif runs[-1]:
                runs.append([])
        for run in runs:
            if run:
                text = f"{len(run)} denials within {thresholds.burst_window}"
                findings.append(
                    Finding(DENIAL_BURST, clerk, text, _seqs([e for call in run for e in call]))
                )
    return findings


def citizen_disputes(entries: Sequence[AuditEntry]) -> list[Finding]:
    """The citizens' accepted disputes (entries ``citizen.dispute`` with outcome OK)."""
    findings = []
    for entry in entries:
        e = entry.event
        if e.kind != "citizen" or e.rule_id != "citizen.dispute" or e.outcome != "OK":
            continue
        try:
            details = json.loads(e.decision_id)
            disputed, seq = str(details["entry_id"]), int(details["seq"])
            clerk, text = str(details.get("clerk", "")), str(details.get("text", ""))
        except (ValueError, KeyError, TypeError):
            continue  # not a dispute this version wrote; verify reports malformed entries
        frozen = " (records frozen)" if details.get("frozen") else ""
        description = f"citizen disputes access {disputed}{frozen}: {text}".rstrip(": ")
        sequences = tuple(sorted({entry.sequence, seq}))
        findings.append(Finding(CITIZEN_DISPUTE, clerk, description, sequences))
    return findings


def quota_refusals(entries: Sequence[Lookup]) -> list[Finding]:
    """Lookups refused past a quota (outcome ``QUOTA_EXCEEDED``), per clerk."""
    refused = [e for e in entries if e.outcome == QUOTA_EXCEEDED]
    findings = []
    for clerk, group in sorted(_by_clerk(refused).items()):
        quotas = ", ".join(sorted({e.rule_id for e in group if e.rule_id}))
        text = f"{len(group)} lookup(s) refused past quota {quotas or '?'}"
        findings.append(Finding(QUOTA_EXCEEDED, clerk, text, _seqs(group)))
    return findings


def find(
    entries: Sequence[AuditEntry], policy: PolicySet, thresholds: Thresholds | None = None
) -> list[Finding]:
    """All findings over the lookups among ``entries`` (and the disputes among its ``citizen``
    entries), by rule in the order of the module docstring."""
    lookups = [lookup_of(e) for e in entries if e.event.kind == "lookup"]
    return find_lookups(lookups, policy, thresholds, citizen=entries)


def find_lookups(
    lookups: Sequence[Lookup],
    policy: PolicySet,
    thresholds: Thresholds | None = None,
    *,
    citizen: Sequence[AuditEntry] = (),
) -> list[Finding]:
    """All findings over ``lookups`` (in sequence order) and the disputes among the
    ``citizen`` entries, by rule in the order of the module docstring."""
    limits = thresholds or Thresholds()
    return [
        *no_case_number(lookups),
        *outside_hours(lookups, policy, limits),
        *many_subjects(lookups, limits),
        *repeated_subject(lookups, limits),
        *denial_bursts(lookups, limits),
        *citizen_disputes(citizen),
        *quota_refusals(lookups),
    ]
