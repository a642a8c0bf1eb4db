"""The generic SQL adapter: a department exposes an existing SQLite or PostgreSQL database with
no code, only a TOML file::

    python -m certbroker.adapters.sql --config property.toml --broker-public-key broker.pem [sdk
    flags]

The configuration (every key is checked; errors name the file and the key)::

    [adapter]
    department = "natural_resources"          # the department serving the records
    record_type = "property"                  # a contract type, or a declared one ([schema])
    # Optional: the citizen is known iff this returns a row. Without it the first [[query]]
    # decides (no row: SUBJECT_NOT_FOUND) -- so a query of a list needs it to tell "known,
    # owns nothing" from "unknown".
    exists = "SELECT 1 FROM persons WHERE resident_id = :subject_id"

    [database]
    url = "sqlite:///property.sqlite"         # relative to this file; sqlite:////abs/path
    # url = "postgresql://reader@db.internal/bdc?options=-csearch_path%3Dbdc"  (any libpq URI)
    statement_timeout_ms = 5000               # optional; PostgreSQL cancels slower statements

    [[query]]                                 # one or more
    sql = '''
      SELECT h.cert_no, h.addr, h.area, h.co_owners FROM holdings h
      JOIN owners o ON o.cert_no = h.cert_no WHERE o.resident_id = :subject_id
      ORDER BY h.registered_on'''
    [query.columns]                           # result column = field path
    cert_no = "holdings.certificate_number"
    addr = "holdings.address"
    area = "holdings.area_sqm"
    co_owners = { field = "holdings.co_owner_names", split = "|" }   # text -> list

A record type declared in the policy catalogue alone (no contract message, e.g.
``housing_fund``) adds a ``[schema]`` table declaring its fields as the catalogue does (types
only; labels, masks and enum values stay in the catalogue), and maps columns to those paths::

    [schema]
    balance = "decimal"
    deposits = { type = "repeated_group", fields = { month = "date", amount = "decimal" } }

A query then fills the record's own fields, or one group's (a ``group``: one row at most; a
``repeated_group``: one item per row); values are coerced to the declared types. The broker
checks every answer against the catalogue. Example: ``examples/housing_fund.toml``.

``:subject_id`` is the only parameter (bound, never interpolated). A query fills either the
record's own fields (at most one row) or the items of one list field (``holdings.*`` or
``members.*``, one item per row). The database is opened read-only (SQLite ``mode=ro``;
PostgreSQL ``default_transaction_read_only``). Worked examples over the demo datasets:
``certbroker/adapters/sql/examples/*.toml``.
"""

from certbroker.adapters.sql.adapter import AmbiguousRecord, SourceValueError, SqlAdapter
from certbroker.adapters.sql.config import ConfigError, SqlConfig, load
from certbroker.adapters.sql.database import SourceUnavailable

__all__ = [
    "AmbiguousRecord",
    "ConfigError",
    "SourceUnavailable",
    "SourceValueError",
    "SqlAdapter",
    "SqlConfig",
    "load",
]
