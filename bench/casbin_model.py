"""Our policy set as a pycasbin model, for comparing decision engines on the same rules.

The model is role × matter × record type (RBAC: a clerk has roles through ``g``), with our
rules' conditions as matcher terms: the office glob (casbin's ``globMatch``), the consent
method (one policy line per accepted method, ``*`` for any), the case-number pattern (casbin's
``regexMatch``, anchored), and opening hours (a custom ``inHours`` function, since casbin has
no notion of them). One policy line per (rule, role, matter, record type the matter needs and
the rule covers, office glob, consent method), generated from a loaded
:class:`~certbroker.policy.model.PolicySet`.

Casbin answers allow or deny only; our engine also computes the released, withheld and masked
fields and a reason. :func:`disagreements` checks that both allow exactly the same requests.
"""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import casbin  # type: ignore[import-untyped]
from casbin.model import FastModel  # type: ignore[import-untyped]

from certbroker.auth.authenticator import Clerk
from certbroker.policy.model import Hours, PolicySet, Request

MODEL = """
[request_definition]
r = sub, matter, rt, office, consent, case, now

[policy_definition]
p = role, matter, rt, office, consent, case, hours

[role_definition]
g = _, _

[policy_effect]
e = some(where (p.eft == allow))

[matchers]
m = g(r.sub, p.role) && r.matter == p.matter && r.rt == p.rt \
&& globMatch(r.office, p.office) && (p.consent == "*" || r.consent == p.consent) \
&& regexMatch(r.case, p.case) && inHours(r.now, p.hours)
"""
#: Positions of matter and record type in both the request and the policy definitions: what
#: casbin's FastEnforcer indexes policy lines by.
FAST_KEYS = (1, 2)


def policy_lines(policy: PolicySet) -> tuple[list[list[str]], dict[str, tuple[Hours, ...]]]:
    """Casbin ``p`` lines for every rule, and the opening hours each ``hours`` key stands for."""
    lines: list[list[str]] = []
    hours: dict[str, tuple[Hours, ...]] = {"": ()}
    for rule in policy.rules:
        cond = rule.conditions
        key = ""
        if cond.hours:
            key = f"hours:{rule.id}"
            hours[key] = cond.hours
        if cond.case_number_pattern is not None:
            case = f"^(?:{cond.case_number_pattern.pattern})$"
        else:
            case = "^.+$" if cond.case_number_required else "^.*$"
        for role, code in itertools.product(rule.roles, rule.matters):
            for rt_name, needed in policy.matters[code].needs.items():
                if rule.record_types and rt_name not in rule.record_types:
                    continue
                if not rule.release(policy.record_types[rt_name], needed, ()):
                    continue  # our engine denies it (nothing released): no line allows it
                for office, consent in itertools.product(
                    cond.offices or ("*",), cond.consent or ("*",)
                ):
                    lines.append([role, code, rt_name, office, consent, case, key])
    return lines, hours


def enforcer(policy: PolicySet, *, fast: bool = False) -> Any:
    """A casbin enforcer (``fast``: a FastEnforcer indexed by matter and record type)."""
    model = FastModel(list(FAST_KEYS)) if fast else casbin.Model()
    model.load_model_from_text(MODEL)
    engine = (
        casbin.FastEnforcer(model, cache_key_order=list(FAST_KEYS))
        if fast
        else casbin.Enforcer(model)
    )
    lines, hours = policy_lines(policy)

    def in_hours(now: dt.datetime, key: str) -> bool:
        windows = hours[key]
        return not windows or any(w.contains(now) for w in windows)

    engine.add_function("inHours", in_hours)
    engine.add_policies(lines)
    engine.add_grouping_policies([[_subject(role), role] for role in policy.roles])
    return engine


def _subject(role: str) -> str:
    return f"clerk-with-{role}"


def requests(policy: PolicySet, now: Sequence[dt.datetime]) -> list[Request]:
    """Every combination of role, matter, record type, office kind, consent, time and case
    number presence: allows and denies of every kind, from the policy's own names."""
    offices = ("gz-haizhu-24h-01", "gz-tianhe-hall-02", "sz-futian-hall-01")
    consents = ("id_card_read", "signed_form", "delegated_agent", "")
    cases = ("GZ20261121-000123", "")
    combos = itertools.product(
        policy.roles, policy.matters, policy.record_types, offices, consents, now, cases
    )
    return [
        Request(
            clerk=Clerk(_subject(role), (role,), office),
            record_type=rt,
            matter_code=matter,
            case_number=case,
            consent_method=consent,
            fields=(),
            now=moment,
        )
        for role, matter, rt, office, consent, moment, case in combos
    ]


def sample(batch: Sequence[Request], size: int) -> list[Request]:
    """About ``size`` of ``batch`` (all of it if smaller), evenly spread: every n-th request
    for an n coprime with 48 (= 2 case numbers x 2 times x 4 consents x 3 offices, the inner
    dimensions of :func:`requests`), so the sample holds every combination of those.

    The hall's policy set has hundreds of casbin lines, which pycasbin's Enforcer tries one by
    one (milliseconds a request): all the combinations of its 30-odd matters would take minutes.
    """
    stride = max(1, len(batch) // size)
    while stride > 1 and math.gcd(stride, 48) != 1:
        stride += 1
    return list(batch[::stride])


def casbin_args(request: Request) -> tuple[Any, ...]:
    """The request as casbin's ``r`` tuple (one role per clerk, as :func:`requests` makes)."""
    return (
        request.clerk.sub,
        request.matter_code,
        request.record_type,
        request.clerk.office,
        request.consent_method,
        request.case_number,
        request.now,
    )


def disagreements(
    policy: PolicySet, engine: Any, batch: Iterable[Request]
) -> Iterator[tuple[Request, bool, bool]]:
    """(request, ours, casbin's) wherever the two engines decide differently."""
    for request in batch:
        ours = policy.decide(request).allowed
        theirs = bool(engine.enforce(*casbin_args(request)))
        if ours != theirs:
            yield request, ours, theirs


def allow_counts(policy: PolicySet, batch: Iterable[Request]) -> Mapping[bool, int]:
    """How many of ``batch`` our engine allows (True) and denies (False)."""
    counts = {True: 0, False: 0}
    for request in batch:
        counts[policy.decide(request).allowed] += 1
    return counts
