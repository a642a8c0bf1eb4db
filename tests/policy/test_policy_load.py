"""Policy loading: validation with file:line, the version hash, and the policy-test runner."""

from __future__ import annotations

import ipaddress
import re
import shutil
import textwrap
from pathlib import Path

import pytest

from certbroker import config, policy

POLICY_DIR = config.DEFAULT_POLICY_DIR
ERROR_SHAPE = re.compile(r"^[^\s:][^:]*:\d+: \S")


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    """A private copy of the shipped policy set (with its tests) to break."""
    target = tmp_path / "policies"
    shutil.copytree(POLICY_DIR, target)
    return target


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), "utf-8")
    return path


def line_of(path: Path, marker: str) -> int:
    """1-based line of the only line of ``path`` containing ``marker``."""
    lines = [i for i, line in enumerate(path.read_text("utf-8").splitlines(), 1) if marker in line]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text("utf-8")
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new), "utf-8")


# ---- check: file and line in every error ----

# (extra file content, marker on the offending line, expected message fragment)
BROKEN_FILES = {
    "unknown-key": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditons: {offices: [gz-*]}
        """,
        "conditons",
        "unknown key 'conditons'",
    ),
    "unknown-top-level-key": (
        """\
        rule:
          - id: extra
        """,
        "rule:",
        "unknown key 'rule'",
    ),
    "bad-field-in-matter": (
        """\
        matters:
          - code: XX-001
            name: 测试事项
            needs:
              household:
                - name
                - nickname
        """,
        "nickname",
        "unknown field 'nickname' of household",
    ),
    "bad-time": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              hours: {days: [mon], from: "08:30", to: "25:00", utc_offset: "+08:00"}
        """,
        "25:00",
        "expected a time HH:MM",
    ),
    "from-after-to": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              hours:
                days: [mon]
                from: "18:00"
                to: "09:00"
                utc_offset: "+08:00"
        """,
        "09:00",
        "'to' must be after 'from'",
    ),
    "bad-offset": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              hours:
                days: [mon]
                from: "08:00"
                to: "09:00"
                utc_offset: UTC+8
        """,
        "UTC+8",
        "expected an offset",
    ),
    "empty-hours": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              hours: []
        """,
        "hours: []",
        "hours: must not be an empty list",
    ),
    "bad-day": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              hours:
                days:
                  - mon
                  - funday
                from: "08:00"
                to: "09:00"
                utc_offset: "+08:00"
        """,
        "funday",
        "unknown day 'funday'",
    ),
    "duplicate-rule-id": (
        """\
        rules:
          - id: window-clerk-hall
            roles: [window_clerk]
            matters: [BDC-ZY-001]
        """,
        "window-clerk-hall",
        "duplicate rule id 'window-clerk-hall' (first defined at ",
    ),
    "reserved-rule-id": (
        """\
        rules:
          - id: default-deny
            roles: [window_clerk]
            matters: [BDC-ZY-001]
        """,
        "default-deny",
        "reserved",
    ),
    "yaml-syntax": (
        """\
        rules:
          - id: extra
            description: a: b
            roles: [window_clerk]
        """,
        "a: b",
        "YAML syntax error",
    ),
    "unknown-mask": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            masks:
              marriage: {spouse_name: first2}
        """,
        "first2",
        "unknown mask 'first2'",
    ),
    "mask-non-string": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            masks:
              property:
                holdings.area_sqm: redact
        """,
        "area_sqm",
        "masks apply to strings only",
    ),
    "mask-whole-message": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [JY-RX-001]
            masks:
              household:
                members: last4
        """,
        "members",
        "masks apply to strings only",
    ),
    "unknown-consent": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              consent:
                - fingerprint
        """,
        "fingerprint",
        "unknown consent method 'fingerprint'",
    ),
    "bad-regex": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            conditions:
              case_number: {pattern: '^GZ(\\d+$'}
        """,
        "pattern",
        "invalid regular expression",
    ),
    "unknown-role": (
        """\
        rules:
          - id: extra
            roles:
              - window_clark
            matters: [BDC-ZY-001]
        """,
        "window_clark",
        "unknown role 'window_clark'",
    ),
    "unknown-matter": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters:
              - BDC-ZY-002
        """,
        "BDC-ZY-002",
        "unknown matter 'BDC-ZY-002'",
    ),
    "narrowing-unneeded-record-type": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [SB-YL-001]
            record_types:
              - marriage
        """,
        "- marriage",
        "none of its matters needs marriage",
    ),
    "wrong-type": (
        """\
        rules:
          - id: extra
            roles: window_clerk
            matters: [BDC-ZY-001]
        """,
        "roles:",
        "expected a list, got a string",
    ),
    "number-for-string": (
        """\
        roles:
          - id: 42
            name: 答案
        """,
        "42",
        "expected a string, got an integer",
    ),
    "duplicate-key": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
            matters: [BDC-ZY-001]
            matters: [SB-YL-001]
        """,
        "SB-YL-001",
        "duplicate key 'matters'",
    ),
    "missing-key": (
        """\
        rules:
          - id: extra
            roles: [window_clerk]
        """,
        "id: extra",
        "missing required key 'matters'",
    ),
    "matter-needs-nothing": (
        """\
        matters:
          - code: XX-001
            name: 测试事项
            needs: {}
        """,
        "XX-001",
        "needs no record type",
    ),
    "unknown-record-type": (
        """\
        record_types:
          - name: vehicle
            department: public_security
            fields: [plate]
        """,
        "vehicle",
        "unknown record type 'vehicle'",
    ),
    "bad-endpoint-host": (
        """\
        departments:
          - id: tax_bureau
            name: 税务局
            endpoints:
              - hosts: ["10.0.0.0/8", "10.0.0.0/33"]
                ports: [443]
        """,
        "10.0.0.0/33",
        "'10.0.0.0/33' is not an IP address, a CIDR range",
    ),
    "endpoint-without-ports": (
        """\
        departments:
          - id: tax_bureau
            name: 税务局
            endpoints:
              - {hosts: ["*.tax.example.cn"]}
        """,
        "tax.example.cn",
        "missing required key 'ports'",
    ),
}


@pytest.mark.parametrize("case", BROKEN_FILES)
def test_check_reports_file_and_line(policy_dir: Path, case: str) -> None:
    text, marker, message = BROKEN_FILES[case]
    broken = write(policy_dir / "zz-extra.yaml", text)
    files = sorted(policy_dir.glob("*.yaml"))
    errors = policy.check(files)
    expected = f"{broken}:{line_of(broken, marker)}: "
    assert [e for e in errors if e.startswith(expected) and message in e], errors
    assert len(errors) == 1, errors  # one mistake, one error: no cascades
    with pytest.raises(policy.PolicyError) as info:
        policy.load(policy_dir)
    assert info.value.errors == [
        e.replace(str(broken), str(policy_dir / "zz-extra.yaml")) for e in errors
    ]


@pytest.mark.parametrize(
    ("file", "old", "new", "marker", "message"),
    [
        (
            "catalogue.yaml",
            "      - ethnicity\n",
            "      - ethnic_group\n",
            "ethnic_group",
            "'ethnic_group' is not a field path of the contract",
        ),
        (
            "catalogue.yaml",
            "department: civil_affairs\n",
            "department: civil_affair\n",
            "department: civil_affair",
            "unknown department 'civil_affair'",
        ),
        (
            "catalogue.yaml",
            "cache_ttl_s: 600",
            "cache_ttl_s: ten",
            "cache_ttl_s: ten",
            "expected an integer",
        ),
        (
            "catalogue.yaml",
            "max_repeated: 500",
            "max_repeated: 0",
            "max_repeated: 0",
            "limits max_repeated: must be 1..100000",
        ),
        (
            "catalogue.yaml",
            "max_repeated: 500",
            "max_record_bytes: 2097152",
            "max_record_bytes: 2097152",
            "limits max_record_bytes: must be 1..1048576",
        ),
        (
            "catalogue.yaml",
            "max_repeated: 500",
            "max_items: 500",
            "max_items: 500",
            "unknown key 'max_items'",
        ),
        (
            "catalogue.yaml",
            '"::1", "localhost"]',
            '"::1", "localhost", "127.0.0.1/8"]',
            "127.0.0.1/8",
            "'127.0.0.1/8' is not an IP address, a CIDR range (host bits zero)",
        ),
        (
            "catalogue.yaml",
            'ports: ["1024-65535"]',
            'ports: ["65535-1024"]',
            "65535-1024",
            "expected a port or a range LOW-HIGH within 1..65535, got '65535-1024'",
        ),
        (
            "catalogue.yaml",
            "- 3306         # MySQL",
            "- 70000        # MySQL",
            "70000",
            "except_ports: expected a port or a range",
        ),
        (
            "matters.yaml",
            "code: SB-YL-001",
            "code: BDC-ZY-001  # again",
            "# again",
            "duplicate matter code 'BDC-ZY-001'",
        ),
        (
            "rules.yaml",
            "    record_types: [property]\n",
            "    record_types: [propery]\n",
            "propery",
            "unknown record type 'propery'",
        ),
        (
            "rules.yaml",
            "property: [holdings.address, holdings.usage,",
            "property: [holdings.adress, holdings.usage,",
            "holdings.adress",
            "unknown field 'holdings.adress' of property",
        ),
    ],
)
def test_check_reports_errors_in_edited_files(
    policy_dir: Path, file: str, old: str, new: str, marker: str, message: str
) -> None:
    path = policy_dir / file
    edit(path, old, new)
    errors = policy.check([policy_dir])  # a directory stands for its *.yaml
    assert errors, "the edit should make the set invalid"
    assert errors[0].startswith(f"{path}:{line_of(path, marker)}: "), errors
    assert message in errors[0], errors


def test_check_reports_every_file(policy_dir: Path) -> None:
    one = write(policy_dir / "one.yaml", "roles:\n  - {id: r1, name: x, colour: red}\n")
    two = write(policy_dir / "two.yaml", "matters: [\n")
    errors = policy.check(sorted(policy_dir.glob("*.yaml")))
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"{one}:2: ")
    assert errors[1].startswith(f"{two}:2: YAML syntax error")
    assert all(ERROR_SHAPE.match(e) for e in errors)


def test_check_shipped_set_is_valid() -> None:
    assert policy.check(sorted(POLICY_DIR.glob("*.yaml"))) == []
    assert policy.check([POLICY_DIR]) == []


# ---- the catalogue's limits and endpoints ----


def test_record_type_limits_default_and_override(policy_dir: Path) -> None:
    shipped = policy.load(POLICY_DIR).record_types
    assert shipped["marriage"].limits == policy.RecordLimits(1024, 65536, 64)
    assert shipped["household"].limits == policy.RecordLimits(1024, 65536, 500)
    edit(
        policy_dir / "catalogue.yaml",
        "    limits:\n      max_repeated: 500",
        "    limits: {max_string_chars: 64, max_record_bytes: 4096}",
    )
    loaded = policy.load(policy_dir).record_types["household"].limits
    assert loaded == policy.RecordLimits(max_string_chars=64, max_record_bytes=4096)


def test_department_endpoints(policy_dir: Path) -> None:
    write(
        policy_dir / "zz-tax.yaml",
        """\
        departments:
          - id: tax_bureau
            name: 税务局
            endpoints:
              - hosts: ["10.20.0.0/16", "2001:db8::/32", "*.Tax.example.cn", "tax-gw"]
                ports: [443, "7000-7999"]
                except_ports: ["7100-7199", 7432]
          - id: archive
            name: 档案馆
        """,
    )
    departments = policy.load(policy_dir).departments
    tax = departments["tax_bureau"]
    allowed = [
        ("10.20.3.4", 443),
        ("10.20.3.4", 7000),
        ("10.20.3.4", 7999),
        ("2001:db8::7", 7200),
        ("::ffff:10.20.0.1", 443),  # the same address, as IPv6
        ("a.tax.example.cn", 443),  # names as the Registry passes them: lowercase
        ("tax-gw", 7000),
    ]
    refused = [
        ("10.21.0.1", 443),  # outside the range
        ("10.20.3.4", 444),  # port outside
        ("10.20.3.4", 7150),  # excepted range
        ("10.20.3.4", 7432),  # excepted port
        ("tax.example.cn", 443),  # "*." needs a label before
        ("a.tax.example.cn.evil.com", 443),
        ("tax-gw.evil.com", 443),
        ("127.0.0.1", 443),
    ]

    def host(text: str) -> policy.model.IPAddress | str:
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            return text

    assert [(h, p) for h, p in allowed if not tax.allows_endpoint(host(h), p)] == []
    assert [(h, p) for h, p in refused if tax.allows_endpoint(host(h), p)] == []
    # No endpoints declared: nowhere.
    assert departments["archive"].endpoints == ()
    assert not departments["archive"].allows_endpoint(ipaddress.ip_address("127.0.0.1"), 7000)


def test_check_unreadable_and_empty_input(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    assert policy.check([missing]) == [f"{missing}:1: cannot read: No such file or directory"]
    assert policy.check([]) == ["-:1: no policy files given"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"roles:\n  - {id: r, name: caf\xe9}\n")
    assert policy.check([latin1]) == [f"{latin1}:2: not UTF-8 text"]


def test_unquoted_times_are_read_as_written(policy_dir: Path) -> None:
    # YAML 1.1 reads 17:30 as the integer 1050; the loader must still see half past five.
    edit(policy_dir / "rules.yaml", 'to: "17:30"', "to: 17:30")
    ps = policy.load(policy_dir)
    hours = ps.rules[0].conditions.hours[0]
    assert (hours.start_min, hours.end_min) == (8 * 60 + 30, 17 * 60 + 30)


def test_load_ignores_tests_and_requires_files(policy_dir: Path, tmp_path: Path) -> None:
    write(policy_dir / "tests" / "zz-broken.yaml", "this: [is not a policy\n")
    assert policy.load(policy_dir).rules  # tests/ is not part of the set
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(policy.PolicyError, match="no policy files"):
        policy.load(empty)
    with pytest.raises(policy.PolicyError, match="not a directory"):
        policy.load(tmp_path / "nowhere")


# ---- version hash ----


def test_version_is_stable_and_location_independent(policy_dir: Path) -> None:
    shipped = policy.load(POLICY_DIR).version
    assert policy.load(policy_dir).version == shipped
    assert policy.load(policy_dir).version == shipped
    assert re.fullmatch(r"[0-9a-f]{64}", shipped)


def test_version_changes_with_content_and_names(policy_dir: Path) -> None:
    original = policy.load(policy_dir).version
    rules = policy_dir / "rules.yaml"
    text = rules.read_text("utf-8")
    rules.write_text(text + "# a comment changes the bytes\n", "utf-8")
    commented = policy.load(policy_dir).version
    assert commented != original
    rules.write_text(text.replace('to: "17:30"', 'to: "17:31"'), "utf-8")  # same length
    assert policy.load(policy_dir).version not in (original, commented)
    rules.write_text(text, "utf-8")
    assert policy.load(policy_dir).version == original
    rules.rename(policy_dir / "rules-renamed.yaml")
    assert policy.load(policy_dir).version not in (original, commented)
    write(policy_dir / "tests" / "more.yaml", "tests: []\n")  # tests are not hashed
    rules_back = policy_dir / "rules-renamed.yaml"
    rules_back.rename(rules)
    assert policy.load(policy_dir).version == original


# ---- run_tests ----


def test_shipped_policy_tests_pass() -> None:
    report = policy.run_tests(POLICY_DIR)
    assert report.failures == []
    assert report.failed == 0
    assert report.passed >= 30
    assert report.ok


WRONG_EXPECTATION = """\
    at: "2025-03-09T10:00:00+08:00"   # a Sunday: staffed halls are closed
    clerks:
      window: {roles: [window_clerk], office: gz-haizhu-hall-01}
    tests:
      - name: passes
        clerk: window
        request: {record_type: marriage, matter: BDC-ZY-001, case_number: GZ20250309-000001,
                  consent: id_card_read}
        expect: {decision: deny, rule: window-clerk-hall, condition: OUTSIDE_HOURS}
      - name: wrong on purpose
        clerk: window
        request: {record_type: marriage, matter: BDC-ZY-001, case_number: GZ20250309-000001,
                  consent: id_card_read}
        expect: {decision: allow, rule: window-clerk-hall}
      - name: wrong fields and masks
        clerk: window
        at: "2025-03-10T10:00:00+08:00"
        request: {record_type: marriage, matter: BDC-ZY-001, case_number: GZ20250310-000001,
                  consent: id_card_read}
        expect: {decision: allow, rule: window-clerk-hall, fields: [marital_status],
                 masks: {}}
      - name: wrong error
        clerk: window
        request: {record_type: marriage, matter: BDC-ZY-001, fields: [nope]}
        expect: {error: UNKNOWN_MATTER}
"""


def test_run_tests_reports_wrong_expectations(policy_dir: Path, tmp_path: Path) -> None:
    path = write(tmp_path / "tests" / "wrong.yaml", WRONG_EXPECTATION)
    report = policy.run_tests(policy_dir, tmp_path / "tests")
    assert report.passed == 1
    assert report.failed == 3
    wrong, fields, error = report.failures
    assert wrong.startswith(
        f"{path}:{line_of(path, 'wrong on purpose')}: test "
        "'wrong on purpose': expected allow, got deny by window-clerk-hall "
        "[OUTSIDE_HOURS]"
    )
    assert fields.startswith(f"{path}:{line_of(path, 'wrong fields')}: ")
    assert "expected fields ['marital_status']" in fields
    assert "expected masks {}, got {'spouse_resident_id': 'last4'}" in fields
    assert error.startswith(f"{path}:{line_of(path, 'wrong error')}: ")
    assert "got InvalidArgument UNKNOWN_FIELD" in error
    assert not report.ok


def test_run_tests_malformed_files_are_failures(policy_dir: Path, tmp_path: Path) -> None:
    tests = tmp_path / "tests"
    syntax = write(tests / "a-syntax.yaml", "tests:\n  - name: [unclosed\n")
    header = write(tests / "b-header.yaml", "at: yesterday\ntests: []\n")
    bad = write(
        tests / "c-bad-test.yaml",
        """\
        at: "2025-03-03T10:00:00+08:00"
        tests:
          - name: unknown clerk
            clerk: nobody
            request: {record_type: marriage, matter: BDC-ZY-001}
            expect: {decision: deny, rule: default-deny}
          - name: bad expectation
            clerk: {roles: [auditor], office: gz-haizhu-hall-01}
            request: {record_type: marriage, matter: BDC-ZY-001}
            expect: {decision: maybe, rule: default-deny, colour: red}
          - name: still runs
            clerk: {roles: [auditor], office: gz-haizhu-hall-01}
            request: {record_type: marriage, matter: BDC-ZY-001}
            expect: {decision: deny, rule: default-deny}
        """,
    )
    report = policy.run_tests(policy_dir, tests)
    assert report.passed == 1
    assert len(report.failures) == 4, report.failures
    first, second, third, fourth = report.failures
    assert first.startswith(f"{syntax}:3: YAML syntax error")
    assert second.startswith(f"{header}:1: at: expected an ISO time")
    assert third.startswith(
        f"{bad}:{line_of(bad, 'unknown clerk')}: test 'unknown clerk': malformed:"
    )
    assert f"{bad}:{line_of(bad, 'clerk: nobody')}: test clerk: unknown clerk 'nobody'" in third
    assert f"{bad}:{line_of(bad, 'maybe')}: expect decision: expected allow or deny" in fourth
    assert "unknown key 'colour'" in fourth


def test_run_tests_without_tests_is_a_failure(policy_dir: Path, tmp_path: Path) -> None:
    report = policy.run_tests(policy_dir, tmp_path / "none")
    assert report.passed == 0
    assert report.failures == [f"{tmp_path / 'none'}:1: no policy test files (*.yaml)"]


def test_run_tests_on_invalid_policy_raises(policy_dir: Path) -> None:
    write(policy_dir / "zz.yaml", "roles: {}\n")
    with pytest.raises(policy.PolicyError) as info:
        policy.run_tests(policy_dir)
    assert info.value.errors == [
        f"{policy_dir / 'zz.yaml'}:1: roles: expected a list, got a mapping"
    ]
