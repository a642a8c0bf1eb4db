"""The in-memory synthetic population behind :mod:`certbroker.adapters.demo.synthetic` (no I/O
here).

Every draw comes from one ``random.Random`` in a fixed order, and every date is relative to the
fixed :data:`AS_OF`, so a seed always yields the same people. Households are generated whole so
that what the four departments later hold about a person agrees (see
:mod:`certbroker.adapters.demo.synthetic`).
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, field

from certbroker.adapters.demo.places import (
    FIRMS,
    GIVEN_MID,
    GIVEN_NEW,
    GIVEN_OLD,
    PLACE_WEIGHTS,
    PLACES,
    PUBLIC_UNITS,
    SURNAME_WEIGHTS,
    SURNAMES,
    TRADES,
    Place,
)
from certbroker.contract import resident_id

#: The population's "today": ages, statuses and registration dates are relative to it.
AS_OF = dt.date(2026, 6, 30)
#: 不动产统一登记 started in March 2015; property certificates are not older.
_PROPERTY_REGISTRY_START = dt.date(2015, 3, 1)


@dataclass
class Household:
    """A registered household (户), members in order, head first."""

    number: str  # 户号
    place: Place
    address: str
    authority: str  # 登记机关 (police station)
    members: list[Person] = field(default_factory=list)  # head first


@dataclass
class Person:
    """A living citizen."""

    rid: str
    name: str
    male: bool
    born: dt.date
    ethnicity: str
    household: Household
    relation: str  # 与户主关系
    marital: str = "未婚"  # 未婚 / 已婚 / 离婚 / 丧偶 (meaningful for adults)

    @property
    def age(self) -> int:
        return age_on(self.born, AS_OF)


@dataclass(frozen=True)
class Party:
    """One side of a marriage registration (may be a deceased spouse, not a citizen)."""

    rid: str
    name: str

    @classmethod
    def of(cls, person: Person) -> Party:
        return cls(person.rid, person.name)


@dataclass(frozen=True)
class Registration:
    """A marriage or divorce registration at a civil affairs office."""

    certificate: str  # 结婚证/离婚证字号
    kind: str  # 结婚 / 离婚
    registered_on: dt.date
    office: str
    husband: Party
    wife: Party


@dataclass
class Holding:
    """A registered real property right (不动产权) and its owners."""

    certificate: str
    address: str
    usage: str
    area_sqm: float
    registered_on: dt.date
    owners: list[Person]
    mortgaged: bool
    seized: bool

    @property
    def ownership(self) -> str:
        return "共同共有" if len(self.owners) > 1 else "单独所有"


@dataclass(frozen=True)
class Insurance:
    """A social security account (社会保障号码 is the resident ID, by law)."""

    person: Person
    status: str  # 参保缴费 / 暂停缴费 / 终止缴费 (retired)
    employer: str  # "" while between jobs
    since: dt.date
    months: int  # 累计缴费月数
    pension: str  # 未领取 / 领取中
    pension_fen: int | None  # monthly pension once retired


@dataclass
class Population:
    """The generated citizens and what the departments record about them."""

    people: list[Person] = field(default_factory=list)
    households: list[Household] = field(default_factory=list)
    registrations: list[Registration] = field(default_factory=list)
    holdings: list[Holding] = field(default_factory=list)
    insured: list[Insurance] = field(default_factory=list)


def age_on(born: dt.date, on: dt.date) -> int:
    """Completed years of age on a date."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def add_years(day: dt.date, years: int) -> dt.date:
    """The same calendar day ``years`` later (29 Feb becomes 28 Feb)."""
    try:
        return day.replace(year=day.year + years)
    except ValueError:
        return day.replace(year=day.year + years, day=28)


def generate(citizens: int, seed: int) -> Population:
    """Exactly ``citizens`` people in whole households (with a 1-person household at the end
    when a family would not fit)."""
    gen = _Generator(random.Random(seed))  # noqa: S311 - reproducible, not secret
    while len(gen.pop.people) < citizens:
        gen.household(citizens - len(gen.pop.people))
    gen.social_security()
    return gen.pop


class _Generator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.pop = Population()
        self._ids: set[str] = set()
        self._numbers: set[str] = set()
        self._serials: dict[str, int] = {}

    # -- small draws -------------------------------------------------------------------------
    def _date_between(self, start: dt.date, end: dt.date) -> dt.date:
        if end <= start:
            return end
        return start + dt.timedelta(days=self.rng.randint(0, (end - start).days))

    def _near(self, day: dt.date, low: int, high: int) -> dt.date:
        """A day between ``low`` and ``high`` years after ``day`` (not after AS_OF)."""
        return min(self._date_between(add_years(day, low), add_years(day, high)), AS_OF)

    def _born(self, low: int, high: int) -> dt.date:
        """A birthday for an age between ``low`` and ``high`` on :data:`AS_OF`."""
        latest = add_years(AS_OF, -low)
        return self._date_between(add_years(latest, low - high - 1) + dt.timedelta(1), latest)

    def _rid(self, area: str, born: dt.date, male: bool) -> str:
        while True:  # the sequence is random; its parity is the gender (odd = male)
            value = resident_id.make(area, born, self.rng.randrange(499) * 2 + 1 + (not male))
            if value not in self._ids:
                self._ids.add(value)
                return value

    def _name(self, male: bool, born: dt.date, surname: str | None = None) -> str:
        surname = surname or self.rng.choices(SURNAMES, SURNAME_WEIGHTS)[0]
        if born.year >= 2000:
            return surname + self.rng.choice(GIVEN_NEW[not male])
        chars = (GIVEN_OLD if born.year < 1970 else GIVEN_MID)[not male]
        return surname + "".join(self.rng.sample(chars, self.rng.choice((1, 2, 2))))

    def _ethnicity(self, place: Place) -> str:
        draw = self.rng.random()
        for ethnicity, share in place.minorities:
            if draw < share:
                return ethnicity
            draw -= share
        return "汉族"

    def _serial(self, key: str, most: int) -> int:
        # Increasing per key, so certificate numbers are unique without a lookup table.
        self._serials[key] = self._serials.get(key, self.rng.randint(100, 2000))
        self._serials[key] += self.rng.randint(1, most)
        return self._serials[key]

    def _address(self, place: Place) -> tuple[str, str]:
        """A (town, full address) in a place: a village plot, a flat in a 小区, or on a road."""
        town, streets = self.rng.choice(place.towns)
        street, rng = self.rng.choice(streets), self.rng
        flat = f"{rng.randint(1, 4)}单元{rng.randint(1, 18) * 100 + rng.randint(1, 4)}室"
        if street.endswith("村"):
            where = f"{street}{rng.randint(1, 9)}组{rng.randint(1, 120)}号"
        elif street.endswith("小区"):
            where = f"{street}{rng.randint(1, 30)}号楼{flat}"
        else:
            where = f"{street}{rng.randint(1, 300)}号{rng.randint(1, 12)}栋{flat}"
        return town, place.prefix + town + where

    # -- people and households ---------------------------------------------------------------
    def _household(self, place: Place) -> Household:
        town, address = self._address(place)
        number = str(self.rng.randrange(10**8, 10**9))
        while number in self._numbers:
            number = str(self.rng.randrange(10**8, 10**9))
        self._numbers.add(number)
        station = town.removesuffix("街道").removesuffix("镇")
        household = Household(number, place, address, f"{place.police}{station}派出所")
        self.pop.households.append(household)
        return household

    def _person(self, home: Household, relation: str, male: bool, born: dt.date, *,
                marital: str = "未婚", family_name: str | None = None,
                ethnicity: str | None = None) -> Person:  # fmt: skip
        area = home.place.area
        if relation in ("户主", "配偶", "父亲", "母亲") and self.rng.random() < 0.2:
            area = self.rng.choice(PLACES).area  # adults were often born elsewhere
        rid, name = self._rid(area, born, male), self._name(male, born, family_name)
        ethnicity = ethnicity or self._ethnicity(home.place)
        person = Person(rid, name, male, born, ethnicity, home, relation, marital)
        home.members.append(person)
        self.pop.people.append(person)
        return person

    def household(self, room: int) -> None:
        """Add one household (or, for a divorced pair, two) of at most ``room`` people."""
        place = self.rng.choices(PLACES, PLACE_WEIGHTS)[0]
        kind = self.rng.choices(("family", "single", "divorced", "widowed"), (58, 16, 10, 16))[0]
        if kind == "family" and self._family(place, room):
            return
        if kind == "divorced" and room >= 3:
            self._divorced(place)
        elif kind == "widowed":
            male, born = self.rng.random() < 0.35, self._born(62, 92)
            widow = self._person(self._household(place), "户主", male, born, marital="丧偶")
            self._late_spouse(widow, place)
            self._property(widow.household, [widow], add_years(born, 40))
        else:
            male, born = self.rng.random() < 0.55, self._born(22, 45)
            single = self._person(self._household(place), "户主", male, born)
            self._property(single.household, [single], born)

    def _marriage(self, husband: Party, wife: Party, on: dt.date, place: Place, kind: str) -> None:
        prefix = f"{'J' if kind == '结婚' else 'L'}{place.area}-{on.year}-"  # J330825-2015-
        certificate = f"{prefix}{self._serial(prefix, 9):06d}"
        office = f"{place.local}民政局婚姻登记处"
        self.pop.registrations.append(Registration(certificate, kind, on, office, husband, wife))

    def _wedding_day(self, husband_born: dt.date, wife_born: dt.date, latest: dt.date) -> dt.date:
        # Legal age is 22 for men and 20 for women; most marry within a few years of it.
        earliest = max(add_years(husband_born, 22), add_years(wife_born, 20))
        return self._date_between(earliest, min(add_years(earliest, 8), latest))

    def _couple(self, low: int, high: int, latest: dt.date) -> tuple[dt.date, dt.date, dt.date]:
        """Birthdays of a husband aged ``low``-``high`` and his wife, and their wedding day."""
        h_born = self._born(low, high)
        w_born = min(self._near(h_born, -2, 5), add_years(AS_OF, -(low - 3)))
        return h_born, w_born, self._wedding_day(h_born, w_born, latest)

    def _children(self, married: dt.date, mother_born: dt.date) -> list[tuple[bool, dt.date]]:
        first, last = married + dt.timedelta(days=300), min(add_years(mother_born, 42), AS_OF)
        weights = (10, 55, 30, 5) if 1982 <= first.year <= 2012 else (10, 30, 40, 20)
        count = self.rng.choices((0, 1, 2, 3), weights)[0]  # fewer during one-child policy
        if first > last:
            return []
        births = sorted(self._date_between(first, last) for _ in range(count))
        # Children over 25 have left to form households of their own.
        return [(self.rng.random() < 0.52, b) for b in births if age_on(b, AS_OF) < 26]

    def _family(self, place: Place, room: int) -> bool:
        """A married couple (户主 + 配偶), their children under 26, maybe a widowed parent."""
        h_born, w_born, married = self._couple(24, 82, AS_OF)
        children = self._children(married, w_born)
        with_parent = age_on(h_born, AS_OF) < 52 and self.rng.random() < 0.2
        if 2 + len(children) + with_parent > room:
            return False
        home, husband_heads = self._household(place), self.rng.random() < 0.85
        eth = self._ethnicity(place)  # the children's too
        role = {True: "户主", False: "配偶"}
        husband = self._person(
            home, role[husband_heads], True, h_born, marital="已婚", ethnicity=eth
        )
        wife = self._person(home, role[not husband_heads], False, w_born, marital="已婚")
        if not husband_heads:  # the head is listed first
            home.members.reverse()
        self._marriage(Party.of(husband), Party.of(wife), married, place, "结婚")
        counts = {True: 0, False: 0}
        for male, born in children:
            relation = "长次三"[counts[male]] + ("子" if male else "女")
            counts[male] += 1
            self._person(home, relation, male, born, family_name=surname(husband), ethnicity=eth)
        if with_parent:
            head, male = home.members[0], self.rng.random() < 0.3
            born = self._near(head.born, -32, -24)
            name = surname(head) if male else None
            relation = "父亲" if male else "母亲"
            parent = self._person(home, relation, male, born, marital="丧偶", family_name=name)
            self._late_spouse(parent, place, surname(head) if not male else None)
        self._property(home, [husband, wife], married)
        return True

    def _divorced(self, place: Place) -> None:
        """A divorced pair, each heading a household; a child may live with the mother."""
        h_born, w_born, married = self._couple(28, 62, add_years(AS_OF, -2))
        divorced = self._date_between(married + dt.timedelta(days=365), AS_OF)
        his, hers = self._household(place), self._household(place)
        husband = self._person(his, "户主", True, h_born, marital="离婚")
        wife = self._person(hers, "户主", False, w_born, marital="离婚")
        self._marriage(Party.of(husband), Party.of(wife), married, place, "结婚")
        self._marriage(Party.of(husband), Party.of(wife), divorced, place, "离婚")
        for male, born in self._children(married, w_born)[:1]:
            if born < divorced:  # carries the father's surname
                relation, name = "长子" if male else "长女", surname(husband)
                self._person(hers, relation, male, born, family_name=name)
        self._property(his, [husband], divorced)
        self._property(hers, [wife], divorced)

    def _late_spouse(self, widow: Person, place: Place, family_name: str | None = None) -> None:
        """The marriage of a widowed citizen to a deceased spouse (who is not a citizen)."""
        late_born = self._near(widow.born, *((0, 5) if widow.male else (-5, 0)))
        late_rid = self._rid(self.rng.choice(PLACES).area, late_born, not widow.male)
        late = Party(late_rid, self._name(not widow.male, late_born, family_name))
        if widow.male:
            day = self._wedding_day(widow.born, late_born, AS_OF)
            self._marriage(Party.of(widow), late, day, place, "结婚")
        else:
            day = self._wedding_day(late_born, widow.born, AS_OF)
            self._marriage(late, Party.of(widow), day, place, "结婚")

    # -- property ----------------------------------------------------------------------------
    def _property(self, home: Household, owners: list[Person], since: dt.date) -> None:
        """Maybe a home at the registered address, sometimes more; couples own jointly."""
        couple, draw = len(owners) == 2, self.rng.random()
        if couple and draw < 0.12:  # bought before marriage: one spouse's alone
            owners = [self.rng.choice(owners)]
        elif draw > (0.77 if couple else 0.5):
            return
        start = max(since, _PROPERTY_REGISTRY_START, *(add_years(p.born, 22) for p in owners))
        self._holding(home.place, home.address, "住宅", owners, start)
        if len(owners) == 2 and self.rng.random() < 0.25:
            usage = self.rng.choice(("车位", "商业", "住宅"))
            self._holding(home.place, self._address(home.place)[1], usage, owners, start)

    def _holding(self, place: Place, address: str, usage: str, owners: list[Person],
                 start: dt.date) -> None:  # fmt: skip
        low, high = {"车位": (12, 16), "商业": (20, 120), "住宅": (48, 145)}[usage]
        registered = self._date_between(min(start, AS_OF), AS_OF)
        serial = self._serial(place.area, 40)
        # e.g. 浙(2019)龙游县不动产权第0012345号
        certificate = f"{place.abbr}({registered.year}){place.county}不动产权第{serial:07d}号"
        mortgaged = registered.year >= 2018 and self.rng.random() < 0.4
        seized, area = self.rng.random() < 0.04, round(self.rng.uniform(low, high), 2)
        self.pop.holdings.append(
            Holding(certificate, address, usage, area, registered, owners, mortgaged, seized)
        )

    # -- social security ---------------------------------------------------------------------
    def social_security(self) -> None:
        """Insurance for most working-age adults and pensions for most people past retirement."""
        for person in self.pop.people:
            age, place = person.age, person.household.place
            retire_at = 60 if person.male else 55
            retired = age >= retire_at
            if age < 18 or self.rng.random() > (0.92 if retired else 0.88 if age >= 22 else 0.3):
                continue
            since = add_years(person.born, self.rng.randint(18, min(age, 24)))
            until = add_years(person.born, retire_at) if retired else AS_OF
            months = (until.year - since.year) * 12 + until.month - since.month
            months = max(1, months - self.rng.randint(0, 36))  # gaps between jobs
            employer, fen = self._employer(place), None
            if retired:
                status, pension = "终止缴费", "领取中"
                factor = (0.45 + months / 900) * self.rng.uniform(0.8, 1.2)
                fen = round(place.pension_yuan * factor * 100)
            elif self.rng.random() < 0.12:  # between jobs
                status, pension, employer = "暂停缴费", "未领取", ""
            else:
                status, pension = "参保缴费", "未领取"
            insurance = Insurance(person, status, employer, since, months, pension, fen)
            self.pop.insured.append(insurance)

    def _employer(self, place: Place) -> str:
        if self.rng.random() < 0.25:
            return place.local + self.rng.choice(PUBLIC_UNITS)
        city = place.insured_city.removesuffix("市")
        return f"{city}{self.rng.choice(FIRMS)}{self.rng.choice(TRADES)}有限公司"


def surname(person: Person) -> str:
    """A person's surname (one character, or a compound such as 欧阳)."""
    return person.name[:2] if person.name.startswith("欧阳") else person.name[0]
