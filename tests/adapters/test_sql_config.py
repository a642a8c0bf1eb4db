"""The SQL adapter's configuration: every mistake named by file and key; parameter translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from certbroker.adapters.sql import ConfigError, load
from certbroker.adapters.sql.params import param_names, to_pyformat

GOOD = """
[adapter]
department = "natural_resources"
record_type = "property"
exists = "SELECT 1 FROM persons WHERE resident_id = :subject_id"

[database]
url = "sqlite:///property.sqlite"

[[query]]
sql = "SELECT cert, names FROM h WHERE owner = :subject_id"
[query.columns]
cert = "holdings.certificate_number"
names = { field = "holdings.co_owner_names", split = "," }
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dept.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_good_config_loads(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    assert config.department == "natural_resources"
    assert config.record_type == "property"
    assert config.base_dir == tmp_path
    assert config.statement_timeout_ms == 5000
    (query,) = config.queries
    assert query.group == "holdings"
    assert query.paths == {"holdings.certificate_number", "holdings.co_owner_names"}
    assert [c.split for c in query.columns] == [None, ","]


def test_lists_taken_whole_are_asked_for_by_their_name(tmp_path: Path) -> None:
    text = GOOD.replace('record_type = "property"', 'record_type = "household"').replace(
        '"holdings.certificate_number"', '"members.name"'
    )
    text = text.replace(
        '{ field = "holdings.co_owner_names", split = "," }', '"members.resident_id"'
    )
    (query,) = load(write(tmp_path, text)).queries
    assert query.group == "members"
    assert query.paths == {"members"}  # the record field path a request names


BROKEN = [
    # (replace this, with that, key, message)
    ("[adapter]", "[adaptor]", "adaptor", "unknown key"),
    ('department = "natural_resources"\n', "", "adapter.department", "required"),
    ('"property"', '"vehicle"', "adapter.record_type", "unknown 'vehicle'"),
    ('"sqlite:///property.sqlite"', '"mysql://x"', "database.url", "must start with"),
    ('url = "sqlite', 'urls = "sqlite', "database.urls", "unknown key"),
    ("owner = :subject_id", "owner = :owner", "query[1].sql", "must use the :subject_id"),
    ("owner = :subject_id", "owner = :subject_id OR x = :who", "query[1].sql", "unknown param"),
    ("owner = :subject_id", "owner = :subject_id AND 'x", "query[1].sql", "unterminated"),
    ("resident_id = :subject_id", "resident_id = 1", "adapter.exists", "must use the :subj"),
    ('"holdings.certificate_number"', '"holdings.price"', "query[1].columns.cert", "unknown"),
    ('"holdings.certificate_number"', '"owner.name"', "query[1].columns.cert", "not a list"),
    ('"holdings.certificate_number"', '"holdings"', "query[1].columns.cert", "list of items"),
    ('"holdings.certificate_number"', "7", "query[1].columns.cert", "must be a field path"),
    ('field = "holdings.co_owner_names"', 'field = "holdings.address"', "columns.names.split", ""),
    ('split = ","', 'split = ""', "query[1].columns.names.split", "non-empty"),
    ('split = ","', 'sep = ","', "query[1].columns.names.sep", "unknown key"),
    (
        '"holdings.certificate_number"',
        '"holdings.co_owner_names"',
        "query[1].columns",
        "already mapped",
    ),
]


@pytest.mark.parametrize(("old", "new", "key", "message"), BROKEN)
def test_mistakes_name_the_file_and_key(
    tmp_path: Path, old: str, new: str, key: str, message: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert caught.value.key.endswith(key)
    assert message in caught.value.problem
    assert str(caught.value).startswith(f"{path}: ")


def test_structural_mistakes(tmp_path: Path) -> None:
    def problem(text: str) -> tuple[str, str]:
        with pytest.raises(ConfigError) as caught:
            load(write(tmp_path, text))
        return caught.value.key, caught.value.problem

    head = GOOD.split("[[query]]", maxsplit=1)[0]
    assert problem(head) == ("query", "need at least one [[query]] table")
    assert problem(head + "[[query]]\nsql = 'SELECT 1 WHERE :subject_id'\n")[0] == (
        "query[1].columns"
    )
    same_list = GOOD.replace("names = {", 'address = "holdings.address"\nnames = {')
    assert len(load(write(tmp_path, same_list)).queries[0].columns) == 3
    two_levels = head.replace('"property"', '"household"') + (
        "[[query]]\nsql = 'SELECT a, b FROM t WHERE id = :subject_id'\n"
        '[query.columns]\na = "name"\nb = "members.name"\n'
    )
    key, text = problem(two_levels)
    assert key == "query[1].columns"
    assert "one query fills one level" in text
    twice = GOOD + GOOD[GOOD.index("[[query]]") :].replace("cert =", "c2 =").replace(
        "names =", "n2 ="
    )
    key, text = problem(twice)
    assert (key, text) == ("query[2].columns", "holdings items already come from query[1]")
    zero_timeout = GOOD.replace('url = "sqlite', 'statement_timeout_ms = 0\nurl = "sqlite')
    assert problem(zero_timeout)[0] == "database.statement_timeout_ms"
    assert problem("this is = = not toml")[0] == "(file)"
    with pytest.raises(ConfigError, match=r"absent\.toml: \(file\): cannot read"):
        load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("sql", "names", "pyformat"),
    [
        ("SELECT * FROM t WHERE id = :subject_id", {"subject_id"}, "id = %(subject_id)s"),
        ("SELECT x::text FROM t WHERE id=:subject_id", {"subject_id"}, "x::text"),
        ("SELECT '12:30', 'a%' FROM t WHERE :subject_id = id", {"subject_id"}, "'a%%'"),
        ('SELECT ":nope" FROM t WHERE id = :subject_id', {"subject_id"}, '":nope"'),
        ("SELECT 1 -- :nope\nWHERE id = :subject_id", {"subject_id"}, "-- :nope\n"),
        ("SELECT 1 /* :nope */ WHERE id = :subject_id", {"subject_id"}, "/* :nope */"),
        ("SELECT $$ :nope $$ WHERE id = :subject_id", {"subject_id"}, "$$ :nope $$"),
        ("SELECT $q$ it's :nope $q$ WHERE :subject_id = id", {"subject_id"}, "$q$ it's"),
        ("SELECT 'it''s :nope' WHERE id = :subject_id", {"subject_id"}, "'it''s :nope'"),
        ("SELECT * WHERE a = :subject_id OR b = :subject_id", {"subject_id"}, "b = %(subject_id)s"),
        ("SELECT :other", {"other"}, "%(other)s"),
    ],
)
def test_parameters_outside_literals_and_comments(sql: str, names: set[str], pyformat: str) -> None:
    assert param_names(sql) == names
    assert pyformat in to_pyformat(sql)
