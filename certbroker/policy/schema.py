"""The schema of one policy YAML file: shapes, types and local values, with ``path:line``.

Any policy file may hold any of the top-level sections below; :mod:`certbroker.policy.loader`
merges the sections of all files of a set, checks that ids are unique and references resolve, and
evaluates rules in file-name order, then in order within a file::

    departments:
      - id: public_security
        name: 公安局
        endpoints:                 # where its adapters may be registered; none = nowhere
          - hosts: ["10.20.0.0/16", "::1", "*.gaj.gz.gov.cn"]  # CIDR ranges, addresses,
                                   # DNS name globs (case-insensitive)
            ports: [443, "7000-7999"]   # ports and inclusive ranges, 1..65535
            except_ports: [7432]   # optional: never these ports (or ranges)
    record_types:                  # record types are the contract's Record oneof cases
      - name: household
        department: public_security
        cache_ttl_s: 600           # optional, default 0 = never cached
        fields: [name, birth_date] # contract field paths (certbroker.contract.fields.field_paths)
        limits:                    # optional, each key too: what an adapter's answer may hold
          max_string_chars: 1024   # characters of one string value (default 1024)
          max_record_bytes: 65536  # the record's wire size (default 64 KiB, at most 1 MiB)
          max_repeated: 64         # items of one repeated field (default 64)
      - name: housing_fund         # a record type the contract does not have: declared here,
        label: 住房公积金           # its fields with their types (served as Record.generic)
        department: housing_fund_center
        fields:
          - {name: account_number, type: string, label: 个人公积金账号, personal: true,
             masks: [last4]}       # masks a rule may apply (string fields only)
          - {name: account_status, type: enum, label: 账户状态, values: [正常, 封存, 销户]}
          - {name: balance, type: decimal, label: 账户余额（元）}
          - name: deposits         # group | repeated_group: fields of their own (paths
            type: repeated_group   # deposits.month, deposits.amount), nested at most 4 deep
            label: 缴存记录
            fields:
              - {name: month, type: date, label: 缴存月份}
        # types: string, integer, decimal, boolean, date, timestamp, enum, group, repeated_group
    matters:
      - code: BDC-ZY-001
        name: 不动产转移登记
        needs: {household: [name], marriage: [marital_status, spouse_resident_id]}
      - code: GA-ZC-001            # a covert matter: citizens see its accesses only after
        name: 刑事案件侦查           # disclosure_delay_days (1..3650); auditors always
        covert: true
        disclosure_delay_days: 180
        needs: {household: [name]}
    citizen:                       # the citizens' own view (Citizen service); a mapping
      show_clerk: number           # office (default: the hall only) | number (clerk's too)
      freeze_on_dispute: true      # a dispute freezes the citizen's records (default false)
    roles:
      - {id: window_clerk, name: 综合受理窗口}
    packages:                      # 一件事: several matters handled as one (LookupMatter)
      - code: YJS-ESF-001
        name: 二手房交易一件事
        matters: [BDC-ZY-001, SDQ-GH-001, HJ-QY-001]   # member matter codes, in order
    rules:
      - id: window-clerk-hall
        description: optional text
        roles: [window_clerk]
        matters: [BDC-ZY-001]
        record_types: [marriage]     # optional narrowing; default: all the matter needs
        fields: {marriage: [marital_status]}   # optional; unlisted record types: unrestricted
        masks: {marriage: {spouse_resident_id: last4}}   # optional; mask names are
                                     # certbroker.contract.fields.MASKS, strings only
        conditions:                  # every key optional; all present must pass
          offices: ["gz-*-hall-*"]   # office patterns, any may match: '-' separates
                                     # segments, '*' is exactly one non-empty segment
          hours:                     # one window, or a list of windows (any may match)
            {days: [mon, tue, wed, thu, fri, sat], from: "08:30", to: "17:30",
             utc_offset: "+08:00"}   # "to" is exclusive and may be "24:00"
          consent: [id_card_read, signed_form, delegated_agent]
          case_number: true          # or {pattern: '^GZ\\d{8}-\\d{6}$'} (full match, ASCII:
                                     # \\d is [0-9]; add `unicode: true` for Unicode classes)

Files are read as composed node trees (``yaml.compose`` with ``SafeLoader``), which keep line
numbers; nothing is constructed from tags, and times are read as written, so an unquoted
``17:30`` (YAML 1.1 reads it as the base-60 integer 1050) still means half past five.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import yaml

from certbroker.contract import fields as contract
from certbroker.contract import generic
from certbroker.policy.hours import DAYS, Hours
from certbroker.policy.model import (
    CONSENT_METHODS,
    MAX_RECORD_BYTES,
    RESERVED_RULE_IDS,
    EndpointRule,
    IPNetwork,
    RecordLimits,
)
from certbroker.policy.reader import Located, Reader, describe
from certbroker.policy.rule import Conditions, office_pattern_problem

# ASCII: int() reads other scripts' digits too ("１７:３０" would be half past five).
_TIME = re.compile(r"(\d{1,2}):(\d{2})", re.ASCII)
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})", re.ASCII)
_PORTS = re.compile(r"(\d{1,5})(?:-(\d{1,5}))?", re.ASCII)
# A DNS name pattern: labels of letters, digits and hyphens, where * and ? are globs. Lowercase:
# names are matched case-insensitively, as lowercase.
_NAME_PATTERN = re.compile(r"[a-z0-9*?-]+(\.[a-z0-9*?-]+)*")


@dataclass
class RecordTypeSpec:
    name: Located
    department: Located | None
    fields: list[Located]
    cache_ttl_s: int
    limits: RecordLimits = field(default_factory=RecordLimits)
    #: Declared fields (a catalogue-declared type), None for a contract type's path list.
    declared: tuple[generic.FieldSpec, ...] | None = None
    label: str = ""


@dataclass
class DepartmentSpec:
    id: Located
    name: str
    endpoints: tuple[EndpointRule, ...]


@dataclass
class RuleSpec:
    id: Located
    description: str
    roles: list[Located]
    matters: list[Located]
    record_types: list[Located]
    fields: list[tuple[Located, list[Located]]]
    masks: list[tuple[Located, list[tuple[Located, str]]]]
    conditions: Conditions


@dataclass
class PackageSpec:
    """A ``packages`` entry as written: its code, name and member matter codes (unresolved)."""

    code: Located
    name: str
    matters: list[Located]


@dataclass
class Sections:
    departments: list[DepartmentSpec] = field(default_factory=list)
    record_types: list[RecordTypeSpec] = field(default_factory=list)
    matters: list[tuple[Located, str, list[tuple[Located, list[Located]]]]] = field(
        default_factory=list
    )
    roles: list[tuple[Located, str]] = field(default_factory=list)
    rules: list[RuleSpec] = field(default_factory=list)
    packages: list[PackageSpec] = field(default_factory=list)
    #: matter code -> its disclosure delay in days: the covert matters (``covert: true``).
    covert: dict[str, int] = field(default_factory=dict)
    #: The ``citizen`` section's values as read (keys of :data:`CITIZEN_KEYS`).
    citizen: dict[str, object] = field(default_factory=dict)


#: The ``citizen`` section: what a citizen's own view (the Citizen service) shows and does.
CITIZEN_KEYS = ("show_clerk", "freeze_on_dispute")
#: ``show_clerk`` values: the office only, or the clerk's number too.
SHOW_CLERK = ("office", "number")


def read_file(r: Reader, data: bytes, out: Sections) -> None:
    root = r.compose(data)
    if root is None:
        return  # empty file, or a syntax error already recorded
    top = r.mapping(
        root,
        "policy file",
        optional=(
            "departments",
            "record_types",
            "matters",
            "roles",
            "rules",
            "packages",
            "citizen",
        ),
    )
    if top is None:
        return
    for name, node in top.items():
        if name == "citizen":
            _read_citizen(r, node, out)
            continue
        for item in r.sequence(node, name) or []:
            _ITEM_READERS[name](r, item, out)


def _named(
    r: Reader,
    item: yaml.Node,
    what: str,
    key: str,
    *,
    required: Sequence[str] = (),
    optional: Sequence[str] = (),
) -> tuple[dict[str, yaml.Node], Located] | None:
    """An entry with an id-like key; None (error recorded) without a usable id."""
    m = r.mapping(item, what, required=(key, *required), optional=optional)
    if m is None or key not in m:
        return None
    ident = r.string(m[key], f"{what} {key}")
    return None if ident is None else (m, (ident, r.at(m[key])))


def _read_department(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(r, item, "department", "id", required=("name",), optional=("endpoints",))
    if got:
        m, ident = got
        what = f"department {ident[0]}"
        endpoints = _endpoints(r, m["endpoints"], f"{what} endpoints") if "endpoints" in m else ()
        out.departments.append(DepartmentSpec(ident, _text(r, m, "name", what), endpoints))


def _endpoints(r: Reader, node: yaml.Node, what: str) -> tuple[EndpointRule, ...]:
    rules = []
    for entry in r.sequence(node, what) or []:
        m = r.mapping(entry, what, required=("hosts", "ports"), optional=("except_ports",))
        if m is None:
            continue
        networks: list[IPNetwork] = []
        names: list[str] = []
        for host, at in (r.strings(m["hosts"], f"{what} hosts") or []) if "hosts" in m else []:
            try:
                networks.append(ipaddress.ip_network(host, strict=True))
                continue
            except ValueError:
                pass
            if _NAME_PATTERN.fullmatch(host.lower()) and "/" not in host:
                names.append(host.lower())
            else:
                r.errors.append(
                    f"{at}: {what} hosts: {host!r} is not an IP address, a CIDR range (host bits "
                    "zero) or a DNS name pattern"
                )
        ports = []
        for port_node in (r.sequence(m["ports"], f"{what} ports") or []) if "ports" in m else []:
            ports.extend(_port_range(r, port_node, f"{what} ports"))
        if "ports" in m and not ports:
            r.error(m["ports"], f"{what} ports: must list at least one port or range")
        excepted = []
        if "except_ports" in m:
            for port_node in r.sequence(m["except_ports"], f"{what} except_ports") or []:
                excepted.extend(_port_range(r, port_node, f"{what} except_ports"))
        rules.append(EndpointRule(tuple(networks), tuple(names), tuple(ports), tuple(excepted)))
    return tuple(rules)


def _port_range(r: Reader, node: yaml.Node, what: str) -> list[tuple[int, int]]:
    """``443`` or ``"7000-7999"`` as an inclusive range; [] (error recorded) when malformed."""
    text = r.string(node, what, as_written=True)
    if text is None:
        return []
    match = _PORTS.fullmatch(text.strip())
    if match is not None:
        lo = int(match[1])
        hi = int(match[2]) if match[2] is not None else lo
        if 1 <= lo <= hi <= 65535:
            return [(lo, hi)]
    r.error(node, f"{what}: expected a port or a range LOW-HIGH within 1..65535, got {text!r}")
    return []


def _read_role(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(r, item, "role", "id", required=("name",))
    if got:
        m, ident = got
        out.roles.append((ident, _text(r, m, "name", f"role {ident[0]}")))


def _read_record_type(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(
        r,
        item,
        "record type",
        "name",
        required=("department", "fields"),
        optional=("cache_ttl_s", "limits", "label"),
    )
    if not got:
        return
    m, name = got
    what = f"record type {name[0]}"
    dept = r.string(m["department"], f"{what} department") if "department" in m else None
    ttl = r.integer(m["cache_ttl_s"], f"{what} cache_ttl_s") if "cache_ttl_s" in m else 0
    if ttl is not None and ttl < 0:
        r.error(m["cache_ttl_s"], f"{what} cache_ttl_s: must be 0 or more")
    fields: list[Located] | None = None
    declared: tuple[generic.FieldSpec, ...] | None = None
    if "fields" in m:
        node = m["fields"]
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        if items and all(isinstance(i, yaml.MappingNode) for i in items):
            declared = _declarations(r, node, f"{what} fields", 1)
        else:
            fields = r.strings(node, f"{what} fields")
    out.record_types.append(
        RecordTypeSpec(
            name,
            None if dept is None else (dept, r.at(m["department"])),
            fields or [],
            max(ttl or 0, 0),
            _limits(r, m["limits"], f"{what} limits") if "limits" in m else RecordLimits(),
            declared,
            _text(r, m, "label", what),
        )
    )


_DECLARATION_KEYS = ("label", "personal", "masks", "values", "fields")


def _declarations(
    r: Reader, node: yaml.Node, what: str, depth: int
) -> tuple[generic.FieldSpec, ...]:
    """The field declarations of a catalogue-declared record type (or of one of its groups)."""
    out: list[generic.FieldSpec] = []
    seen: set[str] = set()
    for item in r.sequence(node, what) or []:
        got = _named(r, item, "field", "name", required=("type",), optional=_DECLARATION_KEYS)
        if not got:
            continue
        m, (name, _at) = got
        where = f"{what}: field {name}"
        if generic.NAME.fullmatch(name) is None:
            r.error(m["name"], f"{where}: names are [a-z][a-z0-9_]*, at most 64 characters")
        if name in seen:
            r.error(m["name"], f"{where}: declared twice")
        seen.add(name)
        kind = r.string(m["type"], f"{where} type") if "type" in m else None
        if kind is not None and kind not in generic.FIELD_TYPES:
            r.error(m["type"], f"{where}: unknown type {kind!r} ({', '.join(generic.FIELD_TYPES)})")
            kind = None
        personal = r.boolean(m["personal"], f"{where} personal") if "personal" in m else False
        masks = (
            [x for x, _ in r.strings(m["masks"], f"{where} masks") or []] if "masks" in m else []
        )
        for mask in masks:
            if mask not in contract.MASKS:
                r.error(m["masks"], f"{where}: unknown mask {mask!r} ({', '.join(contract.MASKS)})")
        if masks and kind is not None and kind not in generic.MASKABLE_TYPES:
            r.error(m["masks"], f"{where}: masks apply to string fields only")
        values = (
            [x for x, _ in r.strings(m["values"], f"{where} values") or []]
            if ("values" in m)
            else []
        )
        if (kind == "enum") != bool(values):
            at = m.get("values", m["type"])
            r.error(at, f"{where}: an enum needs its values; only an enum has values")
        subfields: tuple[generic.FieldSpec, ...] = ()
        if kind in generic.GROUP_CASES:
            if "fields" not in m:
                r.error(m["type"], f"{where}: a {kind} needs fields")
            elif depth >= generic.MAX_DEPTH:
                r.error(m["fields"], f"{where}: groups nest at most {generic.MAX_DEPTH} deep")
            else:
                subfields = _declarations(r, m["fields"], f"{where} fields", depth + 1)
        elif "fields" in m:
            r.error(m["fields"], f"{where}: only a group or repeated_group has fields")
        if kind is None:
            continue
        out.append(
            generic.FieldSpec(
                name,
                kind,
                label=_text(r, m, "label", where),
                personal=bool(personal),
                masks=tuple(masks),
                values=tuple(values),
                fields=subfields,
            )
        )
    return tuple(out)


#: Each ``limits`` key and its largest value.
_LIMIT_CEILINGS = {
    "max_string_chars": MAX_RECORD_BYTES,
    "max_record_bytes": MAX_RECORD_BYTES,
    "max_repeated": 100_000,
}


def _limits(r: Reader, node: yaml.Node, what: str) -> RecordLimits:
    m = r.mapping(node, what, optional=tuple(_LIMIT_CEILINGS)) or {}
    values: dict[str, int] = {}
    for key, value_node in m.items():
        value = r.integer(value_node, f"{what} {key}")
        if value is None:
            continue
        if not 1 <= value <= _LIMIT_CEILINGS[key]:
            r.error(value_node, f"{what} {key}: must be 1..{_LIMIT_CEILINGS[key]}")
            continue
        values[key] = value
    return RecordLimits(**values)


def _read_matter(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(
        r,
        item,
        "matter",
        "code",
        required=("name", "needs"),
        optional=("covert", "disclosure_delay_days"),
    )
    if got:
        m, code = got
        what = f"matter {code[0]}"
        needs = _per_record_type(r, m["needs"], f"{what} needs") if "needs" in m else []
        out.matters.append((code, _text(r, m, "name", what), needs))
        covert = r.boolean(m["covert"], f"{what} covert") if "covert" in m else False
        delay = None
        if "disclosure_delay_days" in m:
            delay = r.integer(m["disclosure_delay_days"], f"{what} disclosure_delay_days")
            if delay is not None and not (covert and 1 <= delay <= 3650):
                r.error(
                    m["disclosure_delay_days"],
                    f"{what} disclosure_delay_days: 1..3650, and only for a covert matter",
                )
        elif covert:
            r.error(m["covert"], f"{what}: a covert matter needs disclosure_delay_days")
        if covert and delay is not None:
            out.covert[code[0]] = delay


def _read_citizen(r: Reader, node: yaml.Node, out: Sections) -> None:
    m = r.mapping(node, "citizen", optional=CITIZEN_KEYS) or {}
    if "show_clerk" in m:
        show = r.string(m["show_clerk"], "citizen show_clerk")
        if show is not None and show not in SHOW_CLERK:
            r.error(m["show_clerk"], f"citizen show_clerk: one of {', '.join(SHOW_CLERK)}")
        elif show is not None:
            out.citizen["show_clerk"] = show
    if "freeze_on_dispute" in m:
        freeze = r.boolean(m["freeze_on_dispute"], "citizen freeze_on_dispute")
        if freeze is not None:
            out.citizen["freeze_on_dispute"] = freeze


def _read_rule(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(
        r,
        item,
        "rule",
        "id",
        required=("roles", "matters"),
        optional=("description", "record_types", "fields", "masks", "conditions"),
    )
    if not got:
        return
    m, ident = got
    what = f"rule {ident[0]}"
    if ident[0] in RESERVED_RULE_IDS:
        r.error(m["id"], f"{what}: id is reserved for built-in denials")

    def names(key: str) -> list[Located]:
        return (r.strings(m[key], f"{what} {key}") or []) if key in m else []

    masks: list[tuple[Located, list[tuple[Located, str]]]] = []
    mask_pairs = (r.pairs(m["masks"], f"{what} masks") or []) if "masks" in m else []
    for rt, rt_node, node in mask_pairs:
        entries = []
        for path, path_node, mask_node in r.pairs(node, f"{what} masks.{rt}") or []:
            mask = r.string(mask_node, f"{what} mask of {path}")
            if mask is not None and mask not in contract.MASKS:
                r.error(
                    mask_node, f"{what}: unknown mask {mask!r} (known: {', '.join(contract.MASKS)})"
                )
            elif mask is not None:
                entries.append(((path, r.at(path_node)), mask))
        masks.append(((rt, r.at(rt_node)), entries))
    out.rules.append(
        RuleSpec(
            id=ident,
            description=_text(r, m, "description", what),
            roles=names("roles"),
            matters=names("matters"),
            record_types=names("record_types"),
            fields=_per_record_type(r, m["fields"], f"{what} fields") if "fields" in m else [],
            masks=masks,
            conditions=_conditions(r, m["conditions"], what) if "conditions" in m else Conditions(),
        )
    )


def _read_package(r: Reader, item: yaml.Node, out: Sections) -> None:
    got = _named(r, item, "package", "code", required=("name", "matters"))
    if got:
        m, code = got
        what = f"package {code[0]}"
        # An empty list is reported here (path:line of the list); unknown codes by the loader.
        members = (r.strings(m["matters"], f"{what} matters") or []) if "matters" in m else []
        out.packages.append(PackageSpec(code, _text(r, m, "name", what), members))


_ITEM_READERS = {
    "departments": _read_department,
    "record_types": _read_record_type,
    "matters": _read_matter,
    "roles": _read_role,
    "rules": _read_rule,
    "packages": _read_package,
}


def _text(r: Reader, m: dict[str, yaml.Node], key: str, what: str) -> str:
    if key not in m:
        return ""
    return r.string(m[key], f"{what} {key}") or ""


def _per_record_type(r: Reader, node: yaml.Node, what: str) -> list[tuple[Located, list[Located]]]:
    return [
        ((rt, r.at(key)), r.strings(value, f"{what}.{rt}") or [])
        for rt, key, value in r.pairs(node, what) or []
    ]


def _conditions(r: Reader, node: yaml.Node, rule: str) -> Conditions:
    what = f"{rule} conditions"
    m = r.mapping(node, what, optional=("offices", "hours", "consent", "case_number")) or {}
    offices = (r.strings(m["offices"], f"{what} offices") or []) if "offices" in m else []
    for office, at in offices:
        problem = office_pattern_problem(office)
        if problem is not None:
            r.errors.append(f"{at}: {what} offices: {office!r}: {problem}")
    consent = (r.strings(m["consent"], f"{what} consent") or []) if "consent" in m else []
    for method, at in consent:
        if method not in CONSENT_METHODS:
            r.errors.append(
                f"{at}: {what}: unknown consent method {method!r} "
                f"(known: {', '.join(CONSENT_METHODS)})"
            )
    hours: list[Hours] = []
    if "hours" in m:
        windows = m["hours"]
        if isinstance(windows, yaml.SequenceNode) and not windows.value:
            # An empty list would silently mean "always open"; say so by leaving `hours` out.
            r.error(windows, f"{what} hours: must not be an empty list")
        for window in windows.value if isinstance(windows, yaml.SequenceNode) else [windows]:
            parsed = _hours(r, window, f"{what} hours")
            if parsed is not None:
                hours.append(parsed)
    required, pattern = False, None
    if "case_number" in m:
        required, pattern = _case_number(r, m["case_number"], f"{what} case_number")
    return Conditions(
        offices=tuple(o for o, _ in offices if office_pattern_problem(o) is None),
        hours=tuple(hours),
        consent=tuple(c for c, _ in consent if c in CONSENT_METHODS),
        case_number_required=required,
        case_number_pattern=pattern,
    )


def _hours(r: Reader, node: yaml.Node, what: str) -> Hours | None:
    m = r.mapping(node, what, required=("days", "from", "to", "utc_offset"))
    if m is None or len(m) < 4:
        return None
    days = []
    for day, at in r.strings(m["days"], f"{what} days") or []:
        if day.lower() in DAYS:
            days.append(DAYS.index(day.lower()))
        else:
            r.errors.append(f"{at}: {what}: unknown day {day!r} (use {', '.join(DAYS)})")
    start = _minutes(r, m["from"], f"{what} from", allow_midnight_end=False)
    end = _minutes(r, m["to"], f"{what} to", allow_midnight_end=True)
    offset = _utc_offset(r, m["utc_offset"], f"{what} utc_offset")
    if start is not None and end is not None and start >= end:
        r.error(
            m["to"], f"{what}: 'to' must be after 'from' (split overnight hours into two windows)"
        )
        return None
    if start is None or end is None or offset is None or not days:
        return None
    return Hours(tuple(sorted(days)), start, end, offset)


def _minutes(r: Reader, node: yaml.Node, what: str, *, allow_midnight_end: bool) -> int | None:
    text = r.string(node, what, as_written=True)
    if text is None:
        return None
    match = _TIME.fullmatch(text.strip())
    if match:
        hour, minute = int(match[1]), int(match[2])
        if (hour < 24 and minute < 60) or (allow_midnight_end and (hour, minute) == (24, 0)):
            return hour * 60 + minute
    limit = "24:00" if allow_midnight_end else "23:59"
    r.error(node, f"{what}: expected a time HH:MM from 00:00 to {limit}, got {text!r}")
    return None


def _utc_offset(r: Reader, node: yaml.Node, what: str) -> timedelta | None:
    text = r.string(node, what, as_written=True)
    if text is None:
        return None
    match = _OFFSET.fullmatch(text.strip())
    if match and int(match[2]) <= 14 and int(match[3]) < 60:
        delta = timedelta(hours=int(match[2]), minutes=int(match[3]))
        return -delta if match[1] == "-" else delta
    r.error(node, f'{what}: expected an offset like "+08:00", got {text!r}')
    return None


def _case_number(r: Reader, node: yaml.Node, what: str) -> tuple[bool, re.Pattern[str] | None]:
    if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
        return bool(r.boolean(node, what)), None
    if not isinstance(node, yaml.MappingNode):
        r.error(node, f"{what}: expected true, false or {{pattern: REGEX}}, got {describe(node)}")
        return False, None
    m = r.mapping(node, what, optional=("pattern", "unicode")) or {}
    text = r.string(m["pattern"], f"{what} pattern") if "pattern" in m else None
    unicode = bool(r.boolean(m["unicode"], f"{what} unicode")) if "unicode" in m else False
    if text is None:
        return True, None
    try:
        # ASCII unless the policy asks otherwise: \d, \w and case folding must not let
        # full-width or other scripts' characters satisfy a format meant for ASCII.
        return True, re.compile(text, 0 if unicode else re.ASCII)
    except re.error as exc:
        r.error(m["pattern"], f"{what} pattern: invalid regular expression: {exc}")
        return True, None
