"""Declarative access policy: the model and the decision engine.

A policy set (the YAML files under ``policies/``, read by :func:`certbroker.policy.load`) says
which record types exist and which department serves each, which fields each matter (事项)
needs, and which roles may handle which matters under which conditions.

The package is layered, each module importing only those below it:

* bottom: :mod:`~certbroker.policy.hours` (opening hours), :mod:`~certbroker.policy.rule` (one
  rule and its conditions) and this module (the catalogue, :class:`PolicySet` and its
  decisions);
* above them: :mod:`~certbroker.policy.reader` and :mod:`~certbroker.policy.schema` (the file
  format, one file at a time), :mod:`~certbroker.policy.loader` (set-level validation and
  loading), :mod:`~certbroker.policy.views` (what a clerk may handle, for ``ListMatters``) and
  :mod:`~certbroker.policy.testing` (the policy-test runner);
* :mod:`certbroker.policy` itself re-exports the public API of them all.

:meth:`PolicySet.decide` is a pure function of the policy set and the request (``now``
included), so a decision can be replayed and tested. Its semantics, in order:

1. The matter must need the record type, else deny with rule id ``matter-scope``.
2. Candidate rules are those naming one of the clerk's roles and the matter (and the record
   type, if the rule narrows record types). No candidate: deny with rule id ``default-deny``.
3. Candidates are tried in policy order (file name, then position); the first whose conditions
   all pass decides. It releases the matter's fields for the record type, intersected with the
   rule's field restriction and with the requested fields, in catalogue order.
4. If every candidate fails a condition, the denial names the candidate that got furthest
   through the conditions (office, hours, consent, case number; the earliest rule on a tie) and
   its failing condition, so the clerk is told what to fix rather than an unrelated office rule.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from certbroker.contract.generic import RecordSchema
from certbroker.errors import InvalidArgument
from certbroker.policy.hours import DAYS as DAYS  # noqa: PLC0414 - re-exported
from certbroker.policy.hours import Hours as Hours  # noqa: PLC0414 - re-exported
from certbroker.policy.rule import CASE_NUMBER_REQUIRED as CASE_NUMBER_REQUIRED  # noqa: PLC0414
from certbroker.policy.rule import CONSENT_REQUIRED as CONSENT_REQUIRED  # noqa: PLC0414
from certbroker.policy.rule import OFFICE_NOT_ALLOWED as OFFICE_NOT_ALLOWED  # noqa: PLC0414
from certbroker.policy.rule import OUTSIDE_HOURS as OUTSIDE_HOURS  # noqa: PLC0414
from certbroker.policy.rule import Conditions as Conditions  # noqa: PLC0414 - re-exported
from certbroker.policy.rule import Failure, clip
from certbroker.policy.rule import Request as Request  # noqa: PLC0414 - re-exported
from certbroker.policy.rule import Rule as Rule  # noqa: PLC0414 - re-exported

#: Consent methods a rule may accept, in the order the proto enum declares them.
CONSENT_METHODS: tuple[str, ...] = ("id_card_read", "signed_form", "delegated_agent")

#: Rule ids of the built-in denials; policy rules may not use them.
MATTER_SCOPE = "matter-scope"
DEFAULT_DENY = "default-deny"
RESERVED_RULE_IDS = frozenset({MATTER_SCOPE, DEFAULT_DENY})

#: The deciding rule passed, but nothing requested is both needed and allowed.
NO_FIELDS_RELEASED = "NO_FIELDS_RELEASED"
#: Entries a PolicySet keeps of what it derived from itself alone (see PolicySet._memo): a
#: city's hall (1000 matters, 50 roles) sees some 10,000 distinct (roles, matter, record type)
#: and released-field combinations a day; at about 0.7 KiB each, some 12 MiB at most.
_MEMO_MAX = 16384
#: The masks of a decision that masks nothing (most), shared rather than one per decision.
_NO_MASKS: Mapping[str, str] = MappingProxyType({})


class PolicyError(Exception):
    """A policy set that cannot be loaded; ``errors`` holds ``"path:line: message"`` strings."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors) or "invalid policy")


#: Ceiling of a record type's ``max_record_bytes``: the broker's adapter channels refuse larger
#: replies as they arrive (``certbroker.routing.channels``), before anything is parsed.
MAX_RECORD_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RecordLimits:
    """Bounds on what a department may answer for one record (catalogue ``limits``).

    ``max_string_chars``: characters (code points) of any one string value;
    ``max_record_bytes``: the record's wire size as the adapter sent it;
    ``max_repeated``: items of any one repeated field (``members``, ``holdings``, ...).
    A record over any of them is refused (UNAVAILABLE ``ADAPTER_BAD_RESPONSE``).
    """

    max_string_chars: int = 1024
    max_record_bytes: int = 64 * 1024
    max_repeated: int = 64


#: An IP address of an endpoint, as :func:`ipaddress.ip_address` gives it.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class EndpointRule:
    """Where a department's adapters may be registered (one entry of its ``endpoints``).

    An endpoint matches when its host does -- an IP address inside one of ``networks``, or a
    DNS name matching one of ``names`` (case-insensitive globs, ``*.mca.gz.gov.cn``) -- and its
    port lies in one of the ``ports`` ranges and in none of the ``except_ports`` ranges (both
    inclusive). Names match names only: an address never matches a name pattern, nor a name a
    network (the broker does not resolve names; a name pattern trusts the department's DNS).
    """

    networks: tuple[IPNetwork, ...] = ()
    names: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    except_ports: tuple[tuple[int, int], ...] = ()

    def allows(self, host: IPAddress | str, port: int) -> bool:
        """Whether ``host:port`` (a parsed address, or a lowercase DNS name) matches."""
        if not any(lo <= port <= hi for lo, hi in self.ports) or any(
            lo <= port <= hi for lo, hi in self.except_ports
        ):
            return False
        if isinstance(host, str):
            return any(fnmatch.fnmatchcase(host, pattern) for pattern in self.names)
        if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
            host = host.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1: one address, one answer
        return any(host in network for network in self.networks)


@dataclass(frozen=True)
class RecordType:
    """A kind of record and the fields the policy knows, in order.

    A contract type (a ``Record`` oneof case) has ``schema`` None; a catalogue-declared type has
    its declared :class:`~certbroker.contract.generic.RecordSchema` (its records travel as
    ``Record.generic``, checked against it), and ``fields`` are the schema's field paths.
    """

    name: str
    department: str
    fields: tuple[str, ...]
    cache_ttl_s: int = 0
    limits: RecordLimits = RecordLimits()
    schema: RecordSchema | None = None
    label: str = ""


@dataclass(frozen=True)
class Department:
    """A department, the record types it serves and where its adapters may be registered
    (``endpoints``; none: nowhere, the Registry refuses every registration of it)."""

    id: str
    name: str
    record_types: tuple[str, ...]
    endpoints: tuple[EndpointRule, ...] = ()

    def allows_endpoint(self, host: IPAddress | str, port: int) -> bool:
        """Whether one of :attr:`endpoints` matches ``host:port`` (see :class:`EndpointRule`)."""
        return any(rule.allows(host, port) for rule in self.endpoints)


@dataclass(frozen=True)
class Matter:
    """A matter (事项): what the clerk is handling, and the fields it needs per record type."""

    code: str
    name: str
    needs: Mapping[str, tuple[str, ...]]
    #: A covert matter (e.g. a public-security investigation): its accesses are shown to the
    #: citizen only ``disclosure_delay_s`` after they happened; auditors always see them.
    disclosure_delay_s: int = 0

    @property
    def covert(self) -> bool:
        return self.disclosure_delay_s > 0


@dataclass(frozen=True)
class Package:
    """A package of matters handled as one (一件事, e.g. 二手房交易一件事): one ``LookupMatter``
    call fetches what all ``matters`` (member matter codes, in catalogue order) need, each item
    decided under its own matter."""

    code: str
    name: str
    matters: tuple[str, ...]


@dataclass(frozen=True)
class CitizenView:
    """The policy's ``citizen`` section: what the Citizen service shows and does.

    ``show_clerk`` is "office" (the hall only) or "number" (the clerk's number too);
    ``freeze_on_dispute`` freezes the citizen's records when they dispute an access, until a
    security officer unfreezes them.
    """

    show_clerk: str = "office"
    freeze_on_dispute: bool = False


@dataclass(frozen=True)
class Role:
    """A clerk role as named in JWT claims."""

    id: str
    name: str


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`PolicySet.decide`; ``reason`` is for humans, ``condition`` for code.

    ``fields`` are the released field paths (empty on deny), ``withheld`` the requested (or all)
    fields of the record type that are not released, ``masks`` field path → mask name.
    """

    allowed: bool
    rule_id: str
    reason: str
    condition: str
    record_type: str
    department: str
    fields: tuple[str, ...]
    withheld: tuple[str, ...]
    masks: Mapping[str, str]
    policy_version: str


@dataclass(frozen=True)
class PolicySet:
    """A loaded, validated policy set. Immutable: a reload builds a new one."""

    version: str  # hex SHA-256 of the files it was loaded from
    record_types: Mapping[str, RecordType]
    departments: Mapping[str, Department]
    matters: Mapping[str, Matter]
    roles: Mapping[str, Role] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    #: Packages of matters (一件事) by code; their codes never collide with matter codes.
    packages: Mapping[str, Package] = field(default_factory=dict)
    citizen: CitizenView = CitizenView()
    # What the set derives from itself alone, kept for the next request: the candidate rules
    # of (roles, matter, record type) and the decision a passing rule gives for a set of
    # requested fields. Conditions (office, hours, consent, case number) are still checked on
    # every request; a reload builds a new set, so nothing here outlives the policy it came
    # from. Bounded by _MEMO_MAX (callers choose roles and fields).
    _memo: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    # matter code -> the rules naming it, in policy order: a candidate search reads a matter's
    # few rules, not a city's hundreds (built once per set, in __post_init__).
    _by_matter: dict[str, tuple[Rule, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        index: dict[str, list[Rule]] = {}
        for rule in self.rules:
            for code in dict.fromkeys(rule.matters):
                index.setdefault(code, []).append(rule)
        self._by_matter.update((code, tuple(rules)) for code, rules in index.items())

    def check_request(self, record_type: str, matter_code: str, fields: Sequence[str]) -> None:
        """Raise :class:`InvalidArgument` unless the request names things the policy knows.

        Reasons: UNKNOWN_RECORD_TYPE, UNKNOWN_MATTER, TOO_MANY_FIELDS, UNKNOWN_FIELD.
        """
        rt = self.record_types.get(record_type)
        if rt is None:
            raise InvalidArgument(
                "UNKNOWN_RECORD_TYPE",
                f"unknown record type {clip(record_type)!r}; known: {', '.join(self.record_types)}",
            )
        if matter_code not in self.matters:
            raise InvalidArgument("UNKNOWN_MATTER", f"unknown matter {clip(matter_code)!r}")
        # Before looking at names, so a huge list costs nothing more than its length.
        if len(fields) > len(rt.fields):
            raise InvalidArgument(
                "TOO_MANY_FIELDS",
                f"{len(fields)} fields requested; record type {record_type} has {len(rt.fields)}",
            )
        known = set(rt.fields)
        for name in fields:
            if name not in known:
                raise InvalidArgument(
                    "UNKNOWN_FIELD",
                    f"unknown field {clip(name)!r} for record type {record_type}",
                    field=clip(name),
                )

    def decide(self, request: Request) -> Decision:
        """Decide one lookup (see the module docstring). Raises InvalidArgument like
        :meth:`check_request`, and ValueError for a naive ``now``."""
        if request.now.utcoffset() is None:
            raise ValueError("Request.now must be timezone-aware")
        self.check_request(request.record_type, request.matter_code, request.fields)
        rt = self.record_types[request.record_type]
        matter = self.matters[request.matter_code]
        needed = matter.needs.get(rt.name)
        if needed is None:
            return self._deny(
                request,
                MATTER_SCOPE,
                f"matter {matter.code} ({matter.name}) does not need {rt.name} records",
            )
        candidates = self._candidates(request.clerk.roles, matter.code, rt.name)
        if not candidates:
            roles = ", ".join(request.clerk.roles) or "none"
            return self._deny(
                request,
                DEFAULT_DENY,
                f"no rule lets role(s) {roles} handle "
                f"{matter.code} ({matter.name}) with {rt.name} records",
            )
        closest: tuple[Rule, Failure] | None = None
        for rule in candidates:
            failure = rule.failure(request)
            if failure is None:
                return self._allow(request, rule, rt, matter, needed)
            if closest is None or failure.stage > closest[1].stage:
                closest = (rule, failure)
        assert closest is not None  # candidates is not empty
        rule, failure = closest
        return self._deny(
            request, rule.id, f"rule {rule.id} does not allow this: {failure.detail}", failure.code
        )

    def _candidates(self, roles: Sequence[str], matter: str, record_type: str) -> Sequence[Rule]:
        """The rules covering (roles, matter, record type), in policy order (memoised)."""
        key = ("candidates", tuple(roles), matter, record_type)
        found: tuple[Rule, ...] | None = self._memo.get(key)
        if found is None:
            rules = self._by_matter.get(matter, ())
            found = tuple(r for r in rules if r.covers(roles, matter, record_type))
            self._remember(key, found)
        return found

    def _remember(self, key: Hashable, value: object) -> None:
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[key] = value

    def _allow(
        self, request: Request, rule: Rule, rt: RecordType, matter: Matter, needed: Sequence[str]
    ) -> Decision:
        # A passing rule's decision depends on the set alone and on which fields were asked
        # for, not on who asked or when: computed once per (rule, record type, matter, fields).
        key = ("allow", id(rule), rt.name, matter.code, frozenset(request.fields))
        found: Decision | None = self._memo.get(key)
        if found is None:
            found = self._remember_allow(request, rule, rt, matter, needed)
            self._remember(key, found)
        return found

    def _remember_allow(
        self, request: Request, rule: Rule, rt: RecordType, matter: Matter, needed: Sequence[str]
    ) -> Decision:
        released = rule.release(rt, needed, request.fields)
        if not released:
            reason = f"rule {rule.id} releases none of the requested {rt.name} fields"
            return self._deny(request, rule.id, reason, NO_FIELDS_RELEASED)
        reason = f"rule {rule.id} allows {matter.code} ({matter.name}) with {rt.name} records"
        masks = rule.masks.get(rt.name, {})
        return self._decision(request, rule.id, reason, "", released=released, masks=masks)

    def _deny(self, request: Request, rule_id: str, reason: str, condition: str = "") -> Decision:
        return self._decision(request, rule_id, reason, condition, released=(), masks={})

    def _decision(
        self,
        request: Request,
        rule_id: str,
        reason: str,
        condition: str,
        *,
        released: tuple[str, ...],
        masks: Mapping[str, str],
    ) -> Decision:
        rt = self.record_types[request.record_type]
        basis = set(request.fields or rt.fields)
        return Decision(
            allowed=bool(released),  # an allow always releases something; a deny nothing
            rule_id=rule_id,
            reason=reason,
            condition=condition,
            record_type=rt.name,
            department=rt.department,
            fields=released,
            withheld=tuple(f for f in rt.fields if f in basis and f not in released),
            # Read-only: an allow decision is remembered and shared by later requests.
            masks=(
                MappingProxyType({f: masks[f] for f in released if f in masks})
                if masks
                else _NO_MASKS
            ),
            policy_version=self.version,
        )


class PolicySource(Protocol):
    """Holds the policy set in force (``certbroker.server.policy_holder.PolicyHolder``); reloads
    swap it atomically, so each call reads ``current`` once and decides against that set."""

    @property
    def current(self) -> PolicySet: ...
