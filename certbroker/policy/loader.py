"""Loading a policy set: merge the files, check ids and references, hash the bytes.

The file format is described in :mod:`certbroker.policy.schema`, which reads each file on its own;
this module checks the set as a whole (unique ids; departments, record types, contract field
paths, matters, roles and masks that exist) and builds the immutable :class:`PolicySet`.
Every error is ``"path:line: message"``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor

from certbroker.contract import fields as contract
from certbroker.contract import generic
from certbroker.policy.model import (
    CitizenView,
    Department,
    Matter,
    Package,
    PolicyError,
    PolicySet,
    RecordType,
    Role,
    Rule,
)
from certbroker.policy.reader import Located, Reader
from certbroker.policy.schema import PackageSpec, RecordTypeSpec, RuleSpec, Sections, read_file

T = TypeVar("T")


def _unique(items: Iterable[tuple[Located, T]], kind: str, errors: list[str]) -> dict[str, T]:
    out: dict[str, T] = {}
    first: dict[str, str] = {}
    for (name, at), value in items:
        if name in first:
            errors.append(f"{at}: duplicate {kind} {name!r} (first defined at {first[name]})")
        else:
            first[name], out[name] = at, value
    return out


def _build(s: Sections, version: str, errors: list[str]) -> PolicySet:
    dept_specs = _unique(((d.id, d) for d in s.departments), "department id", errors)
    dept_names = {d: spec.name for d, spec in dept_specs.items()}
    record_types = {}
    for spec in _unique(((x.name, x) for x in s.record_types), "record type", errors).values():
        rt = _record_type(spec, dept_names, errors)
        if rt is not None:
            record_types[rt.name] = rt
    departments = {
        d: Department(
            d,
            spec.name,
            tuple(rt for rt, x in record_types.items() if x.department == d),
            spec.endpoints,
        )
        for d, spec in dept_specs.items()
    }
    matters = {}
    for (code, at), name, needs in _unique(
        ((m[0], m) for m in s.matters), "matter code", errors
    ).values():
        if not needs:
            errors.append(f"{at}: matter {code}: needs no record type")
        what = f"matter {code} needs"
        delay_s = s.covert.get(code, 0) * 86400
        matters[code] = Matter(code, name, _field_lists(needs, record_types, what, errors), delay_s)
    roles = {i: Role(i, n) for i, n in _unique(s.roles, "role id", errors).items()}
    rules = tuple(
        _rule(spec, record_types, matters, roles, errors)
        for spec in _unique(((x.id, x) for x in s.rules), "rule id", errors).values()
    )
    packages = {
        code: _package(spec, matters, errors)
        for code, spec in _unique(((p.code, p) for p in s.packages), "package code", errors).items()
    }
    # Read-only views: one PolicySet is shared by every request until a reload replaces it.
    return PolicySet(
        version=version,
        record_types=MappingProxyType(record_types),
        departments=MappingProxyType(departments),
        matters=MappingProxyType(matters),
        roles=MappingProxyType(roles),
        rules=rules,
        packages=MappingProxyType(packages),
        citizen=CitizenView(**s.citizen),  # type: ignore[arg-type]  # checked by the schema
    )


def _package(spec: PackageSpec, matters: dict[str, Matter], errors: list[str]) -> Package:
    """A package whose members are known matters. Its code must not be a matter code: audit
    entries and metrics name either in the same place (``matter_code``), so one code, one
    meaning. An empty ``matters`` list is reported by the schema, at the list."""
    code, at = spec.code
    if code in matters:
        errors.append(f"{at}: package {code}: code is already a matter code")
    for member, member_at in spec.matters:
        if member not in matters:
            errors.append(f"{member_at}: package {code}: unknown matter {member!r}")
    return Package(code, spec.name, tuple(m for m, _ in spec.matters if m in matters))


def _record_type(
    spec: RecordTypeSpec, departments: dict[str, str], errors: list[str]
) -> RecordType | None:
    name, at = spec.name
    department = ""
    if spec.department is not None:
        department, dept_at = spec.department
        if department not in departments:
            errors.append(
                f"{dept_at}: record type {name}: unknown department {department!r} "
                f"(declared: {', '.join(departments) or 'none'})"
            )
    if spec.declared is not None:
        return _declared_type(spec, spec.declared, department, errors)
    if name not in contract.RECORD_TYPES:
        errors.append(
            f"{at}: unknown record type {name!r} (the contract has: "
            f"{', '.join(contract.RECORD_TYPES)}; declare the fields of any other, with types)"
        )
        return None
    paths = contract.field_paths(name)
    for path, path_at in spec.fields:
        if path not in paths:
            errors.append(
                f"{path_at}: record type {name}: {path!r} is not a field path of the "
                f"contract (has: {', '.join(paths)})"
            )
    fields = tuple(p for p, _ in spec.fields if p in paths)
    return RecordType(name, department, fields, spec.cache_ttl_s, spec.limits)


def _declared_type(
    spec: RecordTypeSpec,
    declared: tuple[generic.FieldSpec, ...],
    department: str,
    errors: list[str],
) -> RecordType | None:
    """A catalogue-declared record type (its fields declared with types)."""
    name, at = spec.name
    if name in contract.RECORD_TYPES or name == contract.GENERIC_CASE:
        errors.append(
            f"{at}: record type {name}: a contract type; its fields are the contract's paths, "
            "listed by name, not declared"
        )
        return None
    if generic.NAME.fullmatch(name) is None:
        errors.append(f"{at}: record type {name!r}: names are [a-z][a-z0-9_]*, at most 64")
        return None
    if not declared:
        errors.append(f"{at}: record type {name}: declares no field")
        return None
    schema = generic.RecordSchema(name, declared, spec.label)
    if not schema.paths:
        errors.append(f"{at}: record type {name}: declares groups without any field")
        return None
    return RecordType(
        name, department, schema.paths, spec.cache_ttl_s, spec.limits, schema, spec.label
    )


def _field_lists(
    lists: list[tuple[Located, list[Located]]],
    record_types: dict[str, RecordType],
    what: str,
    errors: list[str],
) -> dict[str, tuple[str, ...]]:
    """Record type → fields, checked against the catalogue and kept in catalogue order."""
    out = {}
    for (rt_name, at), names in lists:
        rt = record_types.get(rt_name)
        if rt is None:
            errors.append(f"{at}: {what}: unknown record type {rt_name!r}")
            continue
        for name, name_at in names:
            if name not in rt.fields:
                errors.append(f"{name_at}: {what}: unknown field {name!r} of {rt_name}")
        wanted = {n for n, _ in names}
        out[rt_name] = tuple(f for f in rt.fields if f in wanted)
    return out


def _rule(
    spec: RuleSpec,
    record_types: dict[str, RecordType],
    matters: dict[str, Matter],
    roles: dict[str, Role],
    errors: list[str],
) -> Rule:
    what = f"rule {spec.id[0]}"
    for role, at in spec.roles:
        if role not in roles:
            errors.append(f"{at}: {what}: unknown role {role!r}")
    for code, at in spec.matters:
        if code not in matters:
            errors.append(f"{at}: {what}: unknown matter {code!r}")
    needed = {rt for c, _ in spec.matters if c in matters for rt in matters[c].needs}
    narrowed = {rt for rt, _ in spec.record_types}
    for rt, at in spec.record_types:
        if rt not in record_types:
            errors.append(f"{at}: {what}: unknown record type {rt!r}")
        elif rt not in needed:
            errors.append(f"{at}: {what}: none of its matters needs {rt} records")
    for (rt, at), _ in spec.fields:
        if narrowed and rt not in narrowed:
            errors.append(f"{at}: {what} fields: {rt} is not among its record_types")
    masks: dict[str, dict[str, str]] = {}
    for (rt, at), entries in spec.masks:
        if rt not in record_types:
            errors.append(f"{at}: {what} masks: unknown record type {rt!r}")
            continue
        for (path, path_at), mask in entries:
            schema = record_types[rt].schema
            if path not in record_types[rt].fields:
                errors.append(f"{path_at}: {what} masks: unknown field {path!r} of {rt}")
            elif schema is not None and mask not in schema.specs[path].masks:
                allowed = ", ".join(schema.specs[path].masks) or "none"
                errors.append(
                    f"{path_at}: {what} masks: the catalogue lets {rt}.{path} be masked by "
                    f"{allowed}, not {mask}"
                )
            elif schema is None and not _is_string_path(rt, path):
                errors.append(
                    f"{path_at}: {what} masks: {rt}.{path} is not a text field; "
                    "masks apply to strings only"
                )
            else:
                masks.setdefault(rt, {})[path] = mask
    return Rule(
        id=spec.id[0],
        roles=tuple(r for r, _ in spec.roles),
        matters=tuple(m for m, _ in spec.matters),
        record_types=tuple(rt for rt, _ in spec.record_types),
        fields=_field_lists(spec.fields, record_types, f"{what} fields", errors),
        masks=masks,
        conditions=spec.conditions,
        description=spec.description,
        source=spec.id[1],
    )


def _is_string_path(record_type: str, path: str) -> bool:
    """Whether a (known) field path holds strings, the only values a mask can rewrite."""
    # Typed Any: the protobuf stubs mix the pure-Python and upb descriptor classes.
    desc: Any = contract.RECORD_TYPES[record_type].DESCRIPTOR
    *parents, leaf = path.split(".")
    for parent in parents:
        desc = desc.fields_by_name[parent].message_type
    return bool(desc.fields_by_name[leaf].type == FieldDescriptor.TYPE_STRING)


# ---- entry points ----


def _load_files(files: Sequence[tuple[Path, str]]) -> tuple[PolicySet, list[str]]:
    """Read, hash and validate files given as (path, name used in the version hash)."""
    errors: list[str] = []
    sections = Sections()
    digest = hashlib.sha256()
    for path, name in sorted(files, key=lambda f: f[1]):
        try:
            data = path.read_bytes()
        except OSError as exc:
            errors.append(f"{path}:1: cannot read: {exc.strerror or exc}")
            continue
        # Length-prefixed so that moving bytes between a name and a body changes the hash.
        encoded = name.encode()
        for part in (encoded, data):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
        read_file(Reader(str(path), errors), data, sections)
    return _build(sections, digest.hexdigest(), errors), errors


def load(policy_dir: Path) -> PolicySet:
    """Load ``policy_dir/*.yaml`` (not subdirectories); raise PolicyError on any problem."""
    if not policy_dir.is_dir():
        raise PolicyError([f"{policy_dir}:1: not a directory"])
    files = sorted(policy_dir.glob("*.yaml"))
    if not files:
        raise PolicyError([f"{policy_dir}:1: no policy files (*.yaml)"])
    policy_set, errors = _load_files([(p, p.relative_to(policy_dir).as_posix()) for p in files])
    if errors:
        raise PolicyError(errors)
    return policy_set


def check(paths: Sequence[Path]) -> list[str]:
    """Validate files as one policy set; a directory stands for its ``*.yaml``. [] when valid."""
    files: dict[Path, None] = {}  # ordered, without repeats
    for path in paths:
        for file in sorted(path.glob("*.yaml")) if path.is_dir() else [path]:
            files.setdefault(file, None)
    if not files:
        return ["-:1: no policy files given"]
    return _load_files([(p, str(p)) for p in files])[1]
