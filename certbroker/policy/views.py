"""What a clerk may handle, for ``ListMatters``: each matter, and each package of matters, as one
clerk sees it.

Built on the policy model (:mod:`certbroker.policy.model`), from a :class:`PolicySet` and a
clerk (:func:`matters_for`); request-time conditions (hours, consent, case number) are not
decided here, only described.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from certbroker.auth.authenticator import Clerk
from certbroker.policy.model import CONSENT_METHODS, Matter, Package, PolicySet
from certbroker.policy.rule import Conditions


@dataclass(frozen=True)
class MatterView:
    """A matter as one clerk may handle it (for ListMatters), ignoring request-time conditions.

    ``fields``/``masks`` map record type → field paths (only record types the clerk can get).
    ``consent_methods`` are accepted for every record type that requires consent;
    ``consent_required`` says whether any does.
    """

    matter: Matter
    fields: Mapping[str, tuple[str, ...]]
    masks: Mapping[str, tuple[str, ...]]
    case_number_required: bool
    consent_methods: tuple[str, ...]
    consent_required: bool = False


def matters_for(policies: PolicySet, clerk: Clerk) -> list[MatterView]:
    """Matters the clerk has a rule for at their office (hours, consent and case number are
    request-time and ignored), with the fields and masks the first such rule gives."""
    views = (_view(policies, matter, clerk) for matter in policies.matters.values())
    return [view for view in views if view is not None]


@dataclass(frozen=True)
class PackageView:
    """A package (一件事) as one clerk may handle it: ``matters`` are the members the clerk has
    a rule for at their office (as :func:`matters_for` decides), ``unavailable`` the others,
    whose items a package lookup by this clerk returns denied. Both in the package's order."""

    package: Package
    matters: tuple[str, ...]
    unavailable: tuple[str, ...]


def packages_for(policies: PolicySet, clerk: Clerk) -> list[PackageView]:
    """Packages of which the clerk may handle at least one member matter (see
    :class:`PackageView`), in catalogue order."""
    handled = {view.matter.code for view in matters_for(policies, clerk)}
    out = []
    for package in policies.packages.values():
        matters = tuple(m for m in package.matters if m in handled)
        if matters:
            unavailable = tuple(m for m in package.matters if m not in handled)
            out.append(PackageView(package, matters, unavailable))
    return out


def _view(policies: PolicySet, matter: Matter, clerk: Clerk) -> MatterView | None:
    fields: dict[str, tuple[str, ...]] = {}
    masks: dict[str, tuple[str, ...]] = {}
    chosen: list[Conditions] = []
    for rt_name, needed in matter.needs.items():
        rules = (r for r in policies.rules if r.covers(clerk.roles, matter.code, rt_name))
        rule = next((r for r in rules if r.office_allows(clerk.office)), None)
        released = () if rule is None else rule.release(policies.record_types[rt_name], needed, ())
        if rule is None or not released:
            continue
        chosen.append(rule.conditions)
        fields[rt_name] = released
        masked = tuple(f for f in released if f in rule.masks.get(rt_name, {}))
        if masked:
            masks[rt_name] = masked
    if not fields:
        return None
    # Methods that satisfy every record type that asks for consent.
    consenting = [c.consent for c in chosen if c.consent]
    methods = [m for m in CONSENT_METHODS if all(m in c for c in consenting)]
    return MatterView(
        matter=matter,
        fields=fields,
        masks=masks,
        case_number_required=any(c.needs_case_number for c in chosen),
        consent_methods=tuple(methods) if consenting else (),
        consent_required=bool(consenting),
    )
