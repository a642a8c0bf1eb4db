"""Synthetic datasets of the catalogue-declared demo record types: 征信 (``credit``, the credit
reference center) and 住房公积金 (``housing_fund``, the housing fund center).

These types have no adapter code: they are served by the SQL adapter
(:mod:`certbroker.adapters.sql`), configured by ``certbroker/adapters/sql/examples/credit.toml``
and ``housing_fund.toml``. :func:`generate` writes ``credit.sqlite`` and ``housing_fund.sqlite``
from the same deterministic population as the four demo datasets, and copies those two
configurations beside them, which is what makes the broker's embedded default serve the types
in process (``certbroker.routing.router.declared_source``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import shutil
import sqlite3
import tempfile
from contextlib import closing
from importlib import resources
from pathlib import Path

from certbroker.adapters.demo import population
from certbroker.adapters.demo.population import AS_OF, Population

#: Bump whenever the generated data or schema changes, so stale datasets are regenerated.
GENERATOR_VERSION = "1"
#: record type -> department of the declared demo types.
DECLARED: dict[str, str] = {
    "credit": "credit_reference_center",
    "housing_fund": "housing_fund_center",
}

_SCHEMAS = {
    "housing_fund": """
        CREATE TABLE accounts (
            resident_id TEXT PRIMARY KEY, account_number TEXT NOT NULL UNIQUE,
            account_status TEXT NOT NULL, employer TEXT NOT NULL, opened_on TEXT NOT NULL,
            monthly_deposit TEXT NOT NULL, balance TEXT NOT NULL, fund_loan INTEGER NOT NULL,
            updated_at TEXT NOT NULL);
        CREATE TABLE deposits (
            resident_id TEXT NOT NULL, month TEXT NOT NULL, amount TEXT NOT NULL,
            PRIMARY KEY (resident_id, month));
    """,
    "credit": """
        CREATE TABLE reports (
            resident_id TEXT PRIMARY KEY, report_number TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
            housing_loan_count INTEGER NOT NULL, overdue_accounts INTEGER NOT NULL,
            total_overdue TEXT NOT NULL, reported_at TEXT NOT NULL);
        CREATE TABLE loans (
            resident_id TEXT NOT NULL, position INTEGER NOT NULL, kind TEXT NOT NULL,
            lender TEXT NOT NULL, balance TEXT NOT NULL, overdue INTEGER NOT NULL,
            PRIMARY KEY (resident_id, position));
    """,
}
#: Loan kind -> balance range in fen.
_BALANCES = {
    "住房贷款": (10**7, 2 * 10**8),
    "信用卡": (0, 5 * 10**6),
    "个人消费贷款": (10**6, 10**7),
}
_LENDERS = ("中国工商银行广州分行", "中国建设银行广州分行", "招商银行广州分行", "广州农村商业银行")


def config_path(dataset_dir: Path, record_type: str) -> Path:
    """Where the SQL adapter configuration of a declared demo type lives in ``dataset_dir``."""
    return dataset_dir / f"{record_type}.toml"


def generate(dataset_dir: Path, *, citizens: int, seed: int) -> None:
    """Write ``credit.sqlite`` and ``housing_fund.sqlite`` (and their SQL adapter
    configurations) into ``dataset_dir`` unless they are there for this population already."""
    marker = f"{citizens}:{seed}:{GENERATOR_VERSION}"
    if all(_stored(dataset_dir / f"{rt}.sqlite") == marker for rt in DECLARED) and all(
        config_path(dataset_dir, rt).is_file() for rt in DECLARED
    ):
        return
    people = population.generate(citizens, seed)
    for record_type in DECLARED:
        _write(dataset_dir, record_type, marker, people, seed)
        examples = resources.files("certbroker.adapters.sql") / "examples"
        target = config_path(dataset_dir, record_type)
        temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with resources.as_file(examples / f"{record_type}.toml") as example:
            shutil.copyfile(example, temp)
        os.replace(temp, target)  # a concurrent reader never sees half a configuration


def _stored(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        uri = path.resolve().as_uri() + "?mode=ro"
        with closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'population'").fetchone()
    except sqlite3.DatabaseError:
        return None
    return None if row is None else str(row[0])


def _rng(seed: int, record_type: str, rid: str) -> random.Random:
    # One generator per (type, citizen): a citizen's rows do not depend on anyone else's.
    digest = hashlib.sha256(f"{seed}:{record_type}:{rid}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))  # noqa: S311 - synthetic data


def _write(dataset_dir: Path, record_type: str, marker: str, people: Population, seed: int) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{record_type}.", suffix=".tmp", dir=dataset_dir)
    os.close(fd)
    temp = Path(name)
    try:
        with closing(sqlite3.connect(temp)) as db:
            db.executescript(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
                + _SCHEMAS[record_type]
            )
            db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [("population", marker), ("department", DECLARED[record_type])],
            )
            if record_type == "housing_fund":
                _housing_fund(db, people, seed)
            else:
                _credit(db, people, seed)
            db.commit()
        os.replace(temp, dataset_dir / f"{record_type}.sqlite")
    finally:
        temp.unlink(missing_ok=True)


def _yuan(fen: int) -> str:
    return f"{fen // 100}.{fen % 100:02d}"


def _housing_fund(db: sqlite3.Connection, people: Population, seed: int) -> None:
    # Everyone insured with an employer has an account (缴存); some retired accounts are closed.
    stamp = dt.datetime.combine(AS_OF, dt.time(2, 0), dt.UTC).isoformat()
    for insured in people.insured:
        person = insured.person
        rng = _rng(seed, "housing_fund", person.rid)
        status = "正常" if insured.employer else rng.choice(("封存", "销户"))
        monthly = rng.randrange(30_000, 600_000, 100)  # fen
        opened = max(insured.since, dt.date(1999, 1, 1))
        months = max(1, min(insured.months, 240))
        balance = monthly * months * rng.randrange(30, 90) // 100
        db.execute(
            "INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                person.rid,
                f"4401{person.rid[-8:]}{rng.randrange(1000, 9999)}",
                status,
                insured.employer or "（无）",
                opened.isoformat(),
                _yuan(monthly),
                _yuan(balance),
                int(rng.random() < 0.2),
                stamp,
            ),
        )
        if status == "正常":
            for back in range(6):
                month = dt.date(AS_OF.year, AS_OF.month, 1)
                for _ in range(back):
                    month = (month - dt.timedelta(days=1)).replace(day=1)
                db.execute(
                    "INSERT INTO deposits VALUES (?, ?, ?)",
                    (person.rid, month.isoformat(), _yuan(monthly)),
                )


def _credit(db: sqlite3.Connection, people: Population, seed: int) -> None:
    stamp = dt.datetime.combine(AS_OF, dt.time(9, 30), dt.UTC).isoformat()
    owners = {p.rid: 0 for h in people.holdings for p in h.owners}
    for h in people.holdings:
        for p in h.owners:
            owners[p.rid] += int(h.mortgaged)
    for person in people.people:
        if person.age < 18:
            continue
        rng = _rng(seed, "credit", person.rid)
        loans: list[tuple[str, str, str, int]] = []
        for _ in range(owners.get(person.rid, 0)):
            loans.append(
                ("住房贷款", rng.choice(_LENDERS), _yuan(rng.randrange(10**7, 2 * 10**8)), 0)
            )
        if rng.random() < 0.3:
            loans.append(("信用卡", rng.choice(_LENDERS), _yuan(rng.randrange(0, 5 * 10**6)), 0))
        if rng.random() < 0.1:
            loans.append(
                ("个人消费贷款", rng.choice(_LENDERS), _yuan(rng.randrange(10**6, 10**7)), 0)
            )
        overdue = rng.random() < 0.05 and bool(loans)
        if overdue:
            kind, lender, balance, _ = loans[-1]
            loans[-1] = (kind, lender, balance, 1)
        db.execute(
            "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                person.rid,
                f"{AS_OF:%Y%m%d}{rng.randrange(10**11, 10**12)}",
                person.name,
                sum(1 for k, *_ in loans if k == "住房贷款"),
                int(overdue),
                _yuan(rng.randrange(10_000, 500_000)) if overdue else "0.00",
                stamp,
            ),
        )
        db.executemany(
            "INSERT INTO loans VALUES (?, ?, ?, ?, ?, ?)",
            [(person.rid, i, *loan) for i, loan in enumerate(loans)],
        )
