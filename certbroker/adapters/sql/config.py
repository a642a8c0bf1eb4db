"""The SQL adapter's TOML configuration, validated up front with errors naming file and key.

See :mod:`certbroker.adapters.sql` for the format. Validation here needs no database: record type,
field
paths, which fields each query fills, the ``:subject_id`` parameter. The database-dependent
checks (the SQL runs, the mapped columns exist) happen when the adapter starts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from certbroker.adapters.sql.params import SUBJECT_PARAM, param_names
from certbroker.contract import fields as record_fields
from certbroker.contract import generic


class ConfigError(ValueError):
    """A configuration problem: ``file: key: problem``."""

    def __init__(self, path: Path, key: str, problem: str) -> None:
        super().__init__(f"{path}: {key}: {problem}")
        self.path, self.key, self.problem = path, key, problem


@dataclass(frozen=True)
class Column:
    """One result column mapped to a field.

    ``group`` is the repeated message field the column fills one item of per row (``holdings``,
    ``members``), or ``""`` for a field of the record itself; ``name`` is the field within.
    ``split`` cuts a text value into a repeated field (``"张三,李四"`` with ``split = ","``).
    ``path`` is the record field path that asks for this column: ``field`` itself, or the whole
    group for lists taken whole (``members.name`` is asked for as ``members``).
    """

    column: str
    field: str
    group: str
    name: str
    descriptor: FieldDescriptor | None  # None for a catalogue-declared type's field (``spec``)
    path: str
    split: str | None = None
    spec: generic.FieldSpec | None = None


@dataclass(frozen=True)
class Query:
    """One SQL query and what its columns fill. ``group == ""``: one row at most, the record's
    own fields; else one item of the ``group`` list per row, in the query's order."""

    index: int
    sql: str
    columns: tuple[Column, ...]
    group: str
    #: Whether ``group`` is a list (one item per row) or, for a declared ``group``, one item.
    repeated: bool = True

    @property
    def paths(self) -> frozenset[str]:
        """The record field paths this query serves (see :attr:`Column.path`)."""
        return frozenset(c.path for c in self.columns)


@dataclass(frozen=True)
class SqlConfig:
    """A validated SQL adapter configuration."""

    path: Path
    department: str
    record_type: str
    url: str
    exists: str | None
    queries: tuple[Query, ...]
    statement_timeout_ms: int
    #: The declared fields of a catalogue-declared record type (``[schema]``), else None.
    schema: generic.RecordSchema | None = None

    @property
    def base_dir(self) -> Path:
        """Relative SQLite paths are relative to the configuration file."""
        return self.path.parent


_TOP = {"adapter", "database", "query", "schema"}
_ADAPTER = {"department", "record_type", "exists"}
_DATABASE = {"url", "statement_timeout_ms"}
_QUERY = {"sql", "columns"}
_COLUMN = {"field", "split"}


def load(path: Path) -> SqlConfig:
    """Read and validate the configuration in ``path``; raises :class:`ConfigError`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(path, "(file)", f"cannot read ({exc.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "(file)", f"not valid TOML ({exc})") from None
    return parse(data, path)


def parse(data: Mapping[str, Any], path: Path) -> SqlConfig:
    """Validate parsed TOML (``path`` names the file in errors)."""
    _only(data, _TOP, path, "")
    adapter = _table(data, "adapter", path)
    database = _table(data, "database", path)
    _only(adapter, _ADAPTER, path, "adapter.")
    _only(database, _DATABASE, path, "database.")
    department = _text(adapter, "department", path, "adapter.")
    record_type = _text(adapter, "record_type", path, "adapter.")
    schema = None
    if "schema" in data:
        if record_type in record_fields.RECORD_TYPES:
            raise ConfigError(path, "schema", f"{record_type} is a contract type: no [schema]")
        if generic.NAME.fullmatch(record_type) is None:
            raise ConfigError(path, "adapter.record_type", "names are [a-z][a-z0-9_]*")
        schema = generic.RecordSchema(record_type, _schema(data["schema"], path, "schema", 1))
    elif record_type not in record_fields.RECORD_TYPES:
        known = ", ".join(sorted(record_fields.RECORD_TYPES))
        raise ConfigError(
            path,
            "adapter.record_type",
            f"unknown {record_type!r} (one of {known}, or declare its fields in [schema])",
        )
    url = check_url(_text(database, "url", path, "database."), path)
    timeout = database.get("statement_timeout_ms", 5000)
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        raise ConfigError(path, "database.statement_timeout_ms", "must be a positive integer")
    exists = None
    if "exists" in adapter:
        exists = _text(adapter, "exists", path, "adapter.")
        _check_sql(exists, path, "adapter.exists")
    raw_queries = data.get("query")
    if not isinstance(raw_queries, list) or not raw_queries:
        raise ConfigError(path, "query", "need at least one [[query]] table")
    if schema is not None:
        queries = tuple(
            _declared_query(q, i, schema, path) for i, q in enumerate(raw_queries, start=1)
        )
    else:
        # The C (upb) and Python descriptor classes are one type at run time; the stubs differ.
        message = cast(Descriptor, record_fields.RECORD_TYPES[record_type]().DESCRIPTOR)
        queries = tuple(
            _query(q, i, message, record_type, path) for i, q in enumerate(raw_queries, start=1)
        )
    _no_overlap(queries, path)
    return SqlConfig(path, department, record_type, url, exists, queries, timeout, schema)


def _schema(raw: Any, path: Path, key: str, depth: int) -> tuple[generic.FieldSpec, ...]:
    """``[schema]``: field name = type, or ``{ type = "group" | "repeated_group", fields =
    { ... } }`` for a group; declaration order is the table's."""
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(path, key, "need a table of field = type")
    out = []
    for name, value in raw.items():
        where = f"{key}.{name}"
        if generic.NAME.fullmatch(name) is None:
            raise ConfigError(path, where, "field names are [a-z][a-z0-9_]*")
        if isinstance(value, str):
            if value not in generic.SCALAR_CASES:
                known = ", ".join(generic.SCALAR_CASES)
                raise ConfigError(path, where, f"unknown type {value!r} ({known}, or a group)")
            out.append(generic.FieldSpec(name, value))
            continue
        if not isinstance(value, dict):
            raise ConfigError(path, where, 'a type, or { type = "group", fields = { ... } }')
        _only(value, {"type", "fields"}, path, where + ".")
        kind = value.get("type")
        if kind not in generic.GROUP_CASES:
            raise ConfigError(path, where + ".type", "must be group or repeated_group")
        if depth >= 2:
            raise ConfigError(path, where, "the SQL adapter maps groups one level deep")
        fields = _schema(value.get("fields"), path, where + ".fields", depth + 1)
        out.append(generic.FieldSpec(name, str(kind), fields=fields))
    return tuple(out)


def _query_table(raw: Any, index: int, path: Path) -> tuple[str, str, dict[str, Any]]:
    """The parts every ``[[query]]`` has, checked: its key prefix for messages, its SQL and its
    (non-empty) table of column mappings."""
    where = f"query[{index}]."
    if not isinstance(raw, dict):
        raise ConfigError(path, f"query[{index}]", "must be a table")
    _only(raw, _QUERY, path, where)
    sql = _text(raw, "sql", path, where)
    _check_sql(sql, path, where + "sql")
    raw_columns = raw.get("columns")
    if not isinstance(raw_columns, dict) or not raw_columns:
        raise ConfigError(path, where + "columns", "need a table of column = field mappings")
    return where, sql, raw_columns


def _one_level(columns: Sequence[Column], path: Path, where: str) -> str:
    """The one level (the record's own fields "", or a group) that a query's columns fill."""
    groups = {c.group for c in columns}
    if len(groups) > 1:
        shown = " and ".join(sorted(g or "the record's own fields" for g in groups))
        raise ConfigError(
            path, where + "columns", f"one query fills one level: not both {shown} (split it)"
        )
    return groups.pop()


def _declared_query(raw: Any, index: int, schema: generic.RecordSchema, path: Path) -> Query:
    """A ``[[query]]`` of a catalogue-declared record type: its columns map to declared field
    paths, all of the record's own fields or all of one group's."""
    where, sql, raw_columns = _query_table(raw, index, path)
    columns = []
    for name, spec in raw_columns.items():
        key = f"{where}columns.{name}"
        if not isinstance(spec, str):
            raise ConfigError(path, key, "must be a declared field path")
        declared = schema.specs.get(spec)
        if declared is None or declared.is_group:
            known = ", ".join(schema.paths)
            raise ConfigError(path, key, f"{spec!r} is not a declared field path ({known})")
        group, _, inner = spec.rpartition(".")
        columns.append(Column(name, spec, group, inner, None, spec, spec=declared))
    group = _one_level(columns, path, where)
    repeated = not group or schema.specs[group].type == "repeated_group"
    return Query(index, sql, tuple(columns), group, repeated)


def check_url(url: str, path: Path) -> str:
    """``url`` if its scheme is supported, else :class:`ConfigError` for ``database.url``."""
    if not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError(
            path, "database.url", "must start with sqlite:///, postgresql:// or postgres://"
        )
    return url


def _query(raw: Any, index: int, message: Descriptor, rt: str, path: Path) -> Query:
    where, sql, raw_columns = _query_table(raw, index, path)
    columns = tuple(
        _column(name, spec, message, rt, path, f"{where}columns.{name}")
        for name, spec in raw_columns.items()
    )
    group = _one_level(columns, path, where)
    return Query(index, sql, columns, group)


def _column(name: str, spec: Any, message: Descriptor, rt: str, path: Path, key: str) -> Column:
    split = None
    if isinstance(spec, dict):
        _only(spec, _COLUMN, path, key + ".")
        field = _text(spec, "field", path, key + ".")
        if "split" in spec:
            split = spec["split"]
            if not isinstance(split, str) or not split:
                raise ConfigError(path, key + ".split", "must be a non-empty string")
    elif isinstance(spec, str):
        field = spec
    else:
        raise ConfigError(path, key, 'must be a field path or { field = "...", split = "," }')
    group, _, inner = field.rpartition(".")
    container = message
    if group:
        outer = message.fields_by_name.get(group)
        if outer is None or outer.message_type is None or not outer.is_repeated:
            raise ConfigError(path, key, f"{field!r}: {group!r} is not a list of {rt} items")
        container = outer.message_type
    descriptor = container.fields_by_name.get(inner)
    if descriptor is None:
        known = ", ".join(_mappable(message))
        raise ConfigError(path, key, f"unknown {rt} field {field!r} (mappable: {known})")
    if descriptor.message_type is not None:
        raise ConfigError(
            path, key, f"{field!r} is a list of items: map their fields ({field}.<name>)"
        )
    if split is not None and not descriptor.is_repeated:
        raise ConfigError(path, key + ".split", f"{field!r} holds one value, nothing to split")
    path_ = field if field in record_fields.field_paths(rt) else group
    return Column(name, field, group, inner, descriptor, path_, split)


def _mappable(message: Descriptor) -> list[str]:
    out = []
    for field in message.fields:
        if field.message_type is None:
            out.append(field.name)
        else:
            out += [f"{field.name}.{inner.name}" for inner in field.message_type.fields]
    return out


def _no_overlap(queries: tuple[Query, ...], path: Path) -> None:
    seen_fields: dict[str, int] = {}
    seen_groups: dict[str, int] = {}
    for query in queries:
        if query.group:
            if query.group in seen_groups:
                raise ConfigError(
                    path,
                    f"query[{query.index}].columns",
                    f"{query.group} items already come from query[{seen_groups[query.group]}]",
                )
            seen_groups[query.group] = query.index
        for field in (c.field for c in query.columns):
            if field in seen_fields:
                raise ConfigError(
                    path,
                    f"query[{query.index}].columns",
                    f"{field!r} is already mapped in query[{seen_fields[field]}]",
                )
            seen_fields[field] = query.index


def _check_sql(sql: str, path: Path, key: str) -> None:
    try:
        names = param_names(sql)
    except ValueError as exc:
        raise ConfigError(path, key, str(exc)) from None
    if SUBJECT_PARAM not in names:
        raise ConfigError(path, key, f"must use the :{SUBJECT_PARAM} parameter")
    if other := sorted(names - {SUBJECT_PARAM}):
        raise ConfigError(path, key, f"unknown parameter(s) {other}: only :{SUBJECT_PARAM}")


def _table(data: Mapping[str, Any], key: str, path: Path) -> Mapping[str, Any]:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ConfigError(path, key, f"missing [{key}] table")
    return value


def _text(data: Mapping[str, Any], key: str, path: Path, prefix: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, prefix + key, "required, a non-empty string")
    return value


def _only(data: Mapping[str, Any], allowed: set[str], path: Path, prefix: str) -> None:
    # A misspelt key silently ignored would be a mapping silently missing.
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(
            path, prefix + unknown[0], f"unknown key (allowed: {', '.join(sorted(allowed))})"
        )
