"""Named parameters in a department's SQL: ``:subject_id``, translated for each driver.

sqlite3 understands ``:name`` itself; psycopg wants ``%(name)s`` and a literal ``%`` doubled. A
small scanner finds the parameters outside string literals, quoted identifiers, comments and
PostgreSQL's ``::`` casts and dollar-quoted strings, so ``'12:30'`` or ``x::text`` stay as
written.
"""

from __future__ import annotations

import re

#: The one parameter a query may use: the requested citizen's resident ID.
SUBJECT_PARAM = "subject_id"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$")


def _skip(sql: str, i: int) -> int:
    """If a literal, quoted identifier or comment starts at ``i``, the index just after it;
    else ``i``."""
    c = sql[i]
    if c in "'\"":
        end = i + 1
        while True:
            end = sql.find(c, end)
            if end < 0:
                raise ValueError("unterminated quoted string in SQL")
            if sql.startswith(c, end + 1):  # '' or "" escapes the quote
                end += 2
                continue
            return end + 1
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if sql.startswith("/*", i):
        end = sql.find("*/", i + 2)
        if end < 0:
            raise ValueError("unterminated /* comment in SQL")
        return end + 2
    if c == "$" and (tag := _DOLLAR_TAG.match(sql, i)) is not None and not _in_word(sql, i):
        end = sql.find(tag.group(), tag.end())
        if end < 0:
            raise ValueError("unterminated dollar-quoted string in SQL")
        return end + len(tag.group())
    return i


def _in_word(sql: str, i: int) -> bool:
    # `$1` parameters and identifiers containing `$` are not dollar quotes.
    return i > 0 and (sql[i - 1].isalnum() or sql[i - 1] == "_")


def _pieces(sql: str) -> list[tuple[str, str]]:
    """``sql`` as ("text", ...) and ("param", name) pieces."""
    pieces: list[tuple[str, str]] = []
    start = i = 0
    while i < len(sql):
        after = _skip(sql, i)
        if after != i:
            i = after
            continue
        if sql.startswith("::", i):  # a PostgreSQL cast, not a parameter
            i += 2
            continue
        if sql[i] == ":" and (name := _NAME.match(sql, i + 1)) is not None:
            pieces += [("text", sql[start:i]), ("param", name.group())]
            i = start = name.end()
            continue
        i += 1
    pieces.append(("text", sql[start:]))
    return pieces


def param_names(sql: str) -> set[str]:
    """The ``:name`` parameters of ``sql``; ``ValueError`` for unterminated quotes/comments."""
    return {value for kind, value in _pieces(sql) if kind == "param"}


def to_pyformat(sql: str) -> str:
    """``sql`` for psycopg: ``:name`` becomes ``%(name)s`` and every literal ``%`` ``%%``."""
    out = []
    for kind, value in _pieces(sql):
        out.append(f"%({value})s" if kind == "param" else value.replace("%", "%%"))
    return "".join(out)
