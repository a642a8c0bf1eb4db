"""Synthetic demo datasets: one SQLite file per department, from one deterministic population.

``generate(dir)`` writes ``household.sqlite`` (public security), ``social_security.sqlite``
(human resources and social security), ``property.sqlite`` (natural resources) and
``marriage.sqlite`` (civil affairs). Each holds only its own department's data, with column
names equal to the record's field names, plus a ``meta`` table (seed, size, generator version).
The same ``(citizens, seed)`` gives the same rows on any machine and any day (see
:mod:`certbroker.adapters.demo.population`), and the departments agree: a married
couple is 户主 + 配偶 of one household and each other's spouse under one certificate, a
jointly owned home is at their registered address, and so on.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from certbroker.adapters.demo import population
from certbroker.adapters.demo.population import AS_OF, Population

#: Bump whenever the generated data or schema changes, so stale datasets are regenerated.
GENERATOR_VERSION = "1"
DEFAULT_CITIZENS = 3000
DEFAULT_SEED = 20261121
#: record type -> (dataset file name, department)
DATASETS: dict[str, tuple[str, str]] = {
    "household": ("household.sqlite", "public_security"),
    "social_security": ("social_security.sqlite", "human_resources_social_security"),
    "property": ("property.sqlite", "natural_resources"),
    "marriage": ("marriage.sqlite", "civil_affairs"),
}

_GENDER = {True: "男", False: "女"}
_META = "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
_SCHEMAS = {
    "household": """
        CREATE TABLE households (
            household_number TEXT PRIMARY KEY, registered_address TEXT NOT NULL,
            registration_authority TEXT NOT NULL, head_resident_id TEXT NOT NULL);
        CREATE TABLE residents (
            resident_id TEXT PRIMARY KEY, name TEXT NOT NULL, gender TEXT NOT NULL,
            birth_date TEXT NOT NULL, ethnicity TEXT NOT NULL,
            household_number TEXT NOT NULL REFERENCES households,
            relation_to_head TEXT NOT NULL, position INTEGER NOT NULL);
        CREATE INDEX residents_by_household ON residents (household_number, position);
    """,
    "social_security": """
        CREATE TABLE insured (
            resident_id TEXT PRIMARY KEY, name TEXT NOT NULL,
            social_security_number TEXT NOT NULL UNIQUE, insured_status TEXT NOT NULL,
            employer TEXT NOT NULL, insured_since TEXT NOT NULL,
            contribution_months INTEGER NOT NULL, pension_status TEXT NOT NULL,
            monthly_pension_fen INTEGER, insured_city TEXT NOT NULL);
    """,
    "property": """
        CREATE TABLE persons (resident_id TEXT PRIMARY KEY, name TEXT NOT NULL);
        CREATE TABLE holdings (
            certificate_number TEXT PRIMARY KEY, address TEXT NOT NULL, usage TEXT NOT NULL,
            area_sqm REAL NOT NULL, ownership TEXT NOT NULL, registered_on TEXT NOT NULL,
            mortgaged INTEGER NOT NULL, seized INTEGER NOT NULL);
        CREATE TABLE owners (
            certificate_number TEXT NOT NULL REFERENCES holdings, resident_id TEXT NOT NULL,
            name TEXT NOT NULL, PRIMARY KEY (certificate_number, resident_id));
        CREATE INDEX owners_by_resident ON owners (resident_id);
    """,
    "marriage": """
        CREATE TABLE persons (
            resident_id TEXT PRIMARY KEY, name TEXT NOT NULL, gender TEXT NOT NULL,
            marital_status TEXT NOT NULL
                CHECK (marital_status IN ('未婚', '已婚', '离婚', '丧偶')));
        CREATE TABLE registrations (
            certificate_number TEXT PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('结婚', '离婚')),
            registered_on TEXT NOT NULL, registration_office TEXT NOT NULL,
            husband_id TEXT NOT NULL, husband_name TEXT NOT NULL,
            wife_id TEXT NOT NULL, wife_name TEXT NOT NULL);
        CREATE INDEX registrations_by_husband ON registrations (husband_id);
        CREATE INDEX registrations_by_wife ON registrations (wife_id);
    """,
}


def generate(
    dataset_dir: Path, *, citizens: int = DEFAULT_CITIZENS, seed: int = DEFAULT_SEED
) -> None:
    """Write the four department datasets into ``dataset_dir`` (created if needed).

    Does nothing when all four are already there for the same seed, size and generator
    version. Each file is written under a temporary name and renamed into place only when
    complete, so a reader (or a concurrent generator) never sees a half-written dataset.
    """
    if citizens < 1:
        raise ValueError("citizens must be positive")
    dataset_dir.mkdir(parents=True, exist_ok=True)
    wanted = {r: _meta(r, citizens, seed) for r in DATASETS}
    if all(_stored_meta(dataset_dir / DATASETS[r][0]) == wanted[r] for r in DATASETS):
        return
    people = population.generate(citizens, seed)
    written: list[tuple[Path, str]] = []
    try:
        for record_type, (name, _) in DATASETS.items():
            written.append((_write(dataset_dir, record_type, wanted[record_type], people), name))
        # Rename only once all four are complete, keeping the window of a mixed set small.
        for temp, name in written:
            os.replace(temp, dataset_dir / name)
    finally:
        for temp, _ in written:
            temp.unlink(missing_ok=True)


def dataset_path(dataset_dir: Path, record_type: str) -> Path:
    """Where a record type's dataset lives in ``dataset_dir``."""
    return dataset_dir / DATASETS[record_type][0]


def _meta(record_type: str, citizens: int, seed: int) -> dict[str, str]:
    return {
        "record_type": record_type,
        "department": DATASETS[record_type][1],
        "citizens": str(citizens),
        "seed": str(seed),
        "generator_version": GENERATOR_VERSION,
        "as_of": AS_OF.isoformat(),
    }


def stored_meta(path: Path) -> dict[str, str] | None:
    """The ``meta`` table of a dataset (seed, citizens, ...), None if it is not one."""
    return _stored_meta(path)


def _stored_meta(path: Path) -> dict[str, str] | None:
    if not path.is_file():
        return None
    try:
        with _read(path) as db:
            return dict(db.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:  # not a dataset (or not one of ours): regenerate
        return None


@contextmanager
def _read(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)) as db:
        yield db


def _write(dataset_dir: Path, record_type: str, meta: dict[str, str], people: Population) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{record_type}.", suffix=".tmp", dir=dataset_dir)
    os.close(fd)
    temp = Path(name)
    try:
        with closing(sqlite3.connect(temp)) as db:
            db.executescript(_META + _SCHEMAS[record_type])
            db.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
            _WRITERS[record_type](db, people)
            db.commit()
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _write_household(db: sqlite3.Connection, people: Population) -> None:
    db.executemany(
        "INSERT INTO households VALUES (?, ?, ?, ?)",
        [(h.number, h.address, h.authority, h.members[0].rid) for h in people.households],
    )
    db.executemany(
        "INSERT INTO residents VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                p.rid,
                p.name,
                _GENDER[p.male],
                p.born.isoformat(),
                p.ethnicity,
                h.number,
                p.relation,
                position,
            )
            for h in people.households
            for position, p in enumerate(h.members)
        ],
    )


def _write_social_security(db: sqlite3.Connection, people: Population) -> None:
    db.executemany(
        "INSERT INTO insured VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            # 社会保障号码 is by law the citizen's resident ID.
            (
                i.person.rid,
                i.person.name,
                i.person.rid,
                i.status,
                i.employer,
                i.since.isoformat(),
                i.months,
                i.pension,
                i.pension_fen,
                i.person.household.place.insured_city,
            )
            for i in people.insured
        ],
    )


def _write_property(db: sqlite3.Connection, people: Population) -> None:
    # The registry answers for anyone in the population base; most have no holdings (无房).
    db.executemany("INSERT INTO persons VALUES (?, ?)", [(p.rid, p.name) for p in people.people])
    db.executemany(
        "INSERT INTO holdings VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                h.certificate,
                h.address,
                h.usage,
                h.area_sqm,
                h.ownership,
                h.registered_on.isoformat(),
                int(h.mortgaged),
                int(h.seized),
            )
            for h in people.holdings
        ],
    )
    db.executemany(
        "INSERT INTO owners VALUES (?, ?, ?)",
        [(h.certificate, p.rid, p.name) for h in people.holdings for p in h.owners],
    )


def _write_marriage(db: sqlite3.Connection, people: Population) -> None:
    # Civil affairs knows adults only; a minor has no marriage record at all.
    db.executemany(
        "INSERT INTO persons VALUES (?, ?, ?, ?)",
        [(p.rid, p.name, _GENDER[p.male], p.marital) for p in people.people if p.age >= 18],
    )
    db.executemany(
        "INSERT INTO registrations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                r.certificate,
                r.kind,
                r.registered_on.isoformat(),
                r.office,
                r.husband.rid,
                r.husband.name,
                r.wife.rid,
                r.wife.name,
            )
            for r in people.registrations
        ],
    )


_WRITERS: dict[str, Callable[[sqlite3.Connection, Population], None]] = {
    "household": _write_household,
    "social_security": _write_social_security,
    "property": _write_property,
    "marriage": _write_marriage,
}


def sample_couple(dataset_dir: Path) -> tuple[str, str]:
    """(husband, wife) resident IDs of a married couple who jointly own their home (for the
    demo); both are insured when the population has such a couple."""
    with _read(dataset_path(dataset_dir, "property")) as prop:
        pairs = prop.execute(
            "SELECT group_concat(o.resident_id) FROM holdings h JOIN owners o USING"
            " (certificate_number) WHERE h.ownership = '共同共有' AND h.usage = '住宅'"
            " AND NOT h.seized GROUP BY h.certificate_number ORDER BY h.rowid"
        ).fetchall()
    with _read(dataset_path(dataset_dir, "marriage")) as marriage:
        married = marriage.execute(
            "SELECT r.husband_id, r.wife_id FROM registrations r"
            " JOIN persons h ON h.resident_id = r.husband_id AND h.marital_status = '已婚'"
            " JOIN persons w ON w.resident_id = r.wife_id AND w.marital_status = '已婚'"
            " WHERE r.kind = '结婚'"
        ).fetchall()
    insured = _ids(dataset_dir, "social_security", "insured")
    couples = {frozenset(pair): (pair[0], pair[1]) for pair in married}
    joint = [couples[key] for (ids,) in pairs if (key := frozenset(ids.split(","))) in couples]
    if not joint:
        raise LookupError("no married couple jointly owns a home in this dataset")
    return next((c for c in joint if set(c) <= insured), joint[0])


def sample_citizens(dataset_dir: Path, n: int) -> list[str]:
    """The first ``n`` resident IDs (household order) of adults every department knows."""
    known = (
        _ids(dataset_dir, "social_security", "insured")
        & _ids(dataset_dir, "property", "persons")
        & _ids(dataset_dir, "marriage", "persons")
    )
    with _read(dataset_path(dataset_dir, "household")) as db:
        rows = db.execute("SELECT resident_id FROM residents ORDER BY rowid").fetchall()
    found = [rid for (rid,) in rows if rid in known][:n]
    if len(found) < n:
        raise LookupError(f"only {len(found)} citizens are known to every department")
    return found


def _ids(dataset_dir: Path, record_type: str, table: str) -> set[str]:
    with _read(dataset_path(dataset_dir, record_type)) as db:
        return {rid for (rid,) in db.execute(f"SELECT resident_id FROM {table}")}  # noqa: S608
