"""The generic SQL adapter: rows of a department's own queries mapped onto a record.

Per fetch: the ``exists`` query (when configured) decides whether the citizen is known; else
the first query does (no row: not found). Other queries run only when a field they fill was
asked for. A query filling the record's own fields returns at most one row; a query filling a
list (``holdings.*``, ``members.*``) gives one item per row, in its ``ORDER BY``. Values are
converted to the record's field types (dates to ``YYYY-MM-DD`` text, 0/1 to booleans, numbers
to text where the record holds text, ``split`` text to lists).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import logging
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from certbroker.adapters.sdk.core import RecordNotFound
from certbroker.adapters.sql import config as config_mod
from certbroker.adapters.sql.config import Column, ConfigError, Query, SqlConfig
from certbroker.adapters.sql.database import Database, Result, first_line, open_database
from certbroker.contract import generic

log = logging.getLogger("certbroker.adapters.sql")

# An empty subject: matches nobody, so the start-up check reads column names, not records.
_PROBE_SUBJECT = ""
_TRUE = frozenset({"t", "true", "y", "yes", "1"})
_FALSE = frozenset({"f", "false", "n", "no", "0"})


class AmbiguousRecord(Exception):
    """A query for the record's own fields returned several rows (a data or SQL problem: the
    adapter will not pick one at random). Reported to the caller as INTERNAL."""


class SourceValueError(TypeError):
    """A column's value cannot fill its field (the message names both, never the value)."""


class SqlAdapter:
    """An :class:`certbroker.adapters.sdk.Adapter` over SQL queries, configured by a
    :class:`SqlConfig`.

    Opening it checks against the database that every query runs and returns its mapped
    columns, raising :class:`ConfigError` naming the key otherwise.
    """

    def __init__(self, config: SqlConfig, database: Database | None = None) -> None:
        self.config = config
        self.department = config.department
        self.record_type = config.record_type
        #: A catalogue-declared record type's fields (the SDK builds Record.generic with it).
        self.schema = config.schema
        self._db = database or open_database(
            config.url, base_dir=config.base_dir, statement_timeout_ms=config.statement_timeout_ms
        )
        self._positions: dict[int, dict[str, int]] = {}
        try:
            self._check()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def from_file(cls, path: Path, *, url: str | None = None) -> SqlAdapter:
        """The adapter configured by the TOML file ``path``; ``url`` overrides its
        ``database.url`` (e.g. to keep deployment details out of the file)."""
        config = config_mod.load(path)
        if url is not None:
            config = dataclasses.replace(config, url=config_mod.check_url(url, path))
        return cls(config)

    def _check(self) -> None:
        if self.config.exists is not None:
            self._probe(self.config.exists, "adapter.exists")
        for query in self.config.queries:
            result = self._probe(query.sql, f"query[{query.index}].sql")
            positions = {}
            for column in query.columns:
                position = _position(result.columns, column.column)
                if position is None:
                    raise ConfigError(
                        self.config.path,
                        f"query[{query.index}].columns.{column.column}",
                        f"not a column of the query's result ({', '.join(result.columns)})",
                    )
                positions[column.column] = position
            self._positions[query.index] = positions

    def _probe(self, sql: str, key: str) -> Result:
        try:
            return self._db.query(sql, _PROBE_SUBJECT)
        except Exception as exc:  # noqa: BLE001 - any driver's error means "this SQL fails"
            raise ConfigError(self.config.path, key, f"does not run: {first_line(exc)}") from None

    def fetch(self, subject_id: str, fields: Sequence[str]) -> Mapping[str, Any]:
        """The record from the configured queries; :class:`RecordNotFound` for an unknown
        citizen."""
        wanted = set(fields)
        exists = self.config.exists
        if exists is not None and not self._db.query(exists, subject_id).rows:
            raise RecordNotFound()
        record: dict[str, Any] = {}
        for position, query in enumerate(self.config.queries):
            decides = exists is None and position == 0
            if not decides and not query.paths & wanted:
                continue  # nothing asked from it: do not read the data at all
            rows = self._db.query(query.sql, subject_id).rows
            if decides and not rows:
                raise RecordNotFound()
            if not query.group:
                if len(rows) > 1:
                    raise AmbiguousRecord(f"query[{query.index}] returned {len(rows)} rows")
                if rows:
                    record.update(self._item(query, rows[0]))
            elif query.repeated:
                record[query.group] = [self._item(query, row) for row in rows]
            else:  # a declared (single) group: one row at most, like the record's own fields
                if len(rows) > 1:
                    raise AmbiguousRecord(f"query[{query.index}] returned {len(rows)} rows")
                record[query.group] = self._item(query, rows[0]) if rows else None
        return record

    def _item(self, query: Query, row: Sequence[Any]) -> dict[str, Any]:
        positions = self._positions[query.index]
        return {c.name: _convert(row[positions[c.column]], c) for c in query.columns}

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()


def _position(columns: Sequence[str], name: str) -> int | None:
    if name in columns:
        return list(columns).index(name)
    # PostgreSQL folds unquoted names to lower case: `certNo` in the config is `certno` there.
    folded = [c.lower() for c in columns]
    return folded.index(name.lower()) if folded.count(name.lower()) == 1 else None


def _convert(value: Any, column: Column) -> Any:
    if value is None:
        return None
    if column.spec is not None:  # a catalogue-declared type's field: its declared type
        try:
            return generic.coerce(column.spec, value, column.field)
        except generic.ValueTypeError:
            raise SourceValueError(
                f"column {column.column!r} ({type(value).__name__}) cannot fill field "
                f"{column.field!r} ({column.spec.type})"
            ) from None
    assert column.descriptor is not None  # a contract type's field
    if column.descriptor.is_repeated:
        if isinstance(value, str) and column.split is not None:
            items: list[Any] = [v.strip() for v in value.split(column.split)]
            items = [v for v in items if v]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            items = [value]
        return [_scalar(v, column) for v in items if v is not None]
    return _scalar(value, column)


def _scalar(value: Any, column: Column) -> Any:
    assert column.descriptor is not None
    cpp = column.descriptor.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float | decimal.Decimal | dt.date | dt.time | uuid.UUID) and (
            not isinstance(value, bool)
        ):
            return value.isoformat() if isinstance(value, dt.date | dt.time) else str(value)
    elif cpp in _INTEGER:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, decimal.Decimal) and value.is_finite() and value == int(value):
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif cpp in _FLOAT:
        if isinstance(value, int | float | decimal.Decimal) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    raise SourceValueError(
        f"column {column.column!r} ({type(value).__name__}) cannot fill field {column.field!r}"
    )


_INTEGER = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)
_FLOAT = frozenset({FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT})
