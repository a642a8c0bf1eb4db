from __future__ import annotations

import pytest

from certbroker import validation
from certbroker.contract import resident_id
from certbroker.errors import InvalidArgument


def reason(exc: pytest.ExceptionInfo[InvalidArgument]) -> str:
    return exc.value.reason


def test_valid_resident_ids_pass() -> None:
    # The example from GB 11643-1999 itself, with an X check character.
    assert validation.subject_id("11010519491231002X") == "11010519491231002X"
    generated = resident_id.make("330825", __import__("datetime").date(1990, 3, 7), 12)
    assert validation.subject_id(generated) == generated


@pytest.mark.parametrize(
    "value",
    [
        "110105194912310021",  # wrong check digit
        "11010519491331002X",  # month 13
        "11010519490230002X",  # 30 February
        "1101051949123100",  # too short
        "11010519491231002XX",  # too long
        "11010519491231002x",  # lower-case x
        "1101051949123100AX",  # letters
        "440524188001010014",  # born before 1900
    ],
)
def test_bad_resident_ids_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validation.subject_id(value)
    assert reason(exc) in {"BAD_SUBJECT_ID", "ARGUMENT_TOO_LONG"}
    assert value not in exc.value.message  # personal data stays out of messages


def test_empty_required_argument() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validation.text("matter_code", "", required=True)
    assert reason(exc) == "MISSING_ARGUMENT"
    assert validation.text("case_number", "", required=False) == ""


@pytest.mark.parametrize("bad", ["a\nb", "a\x00b", "a\u202eb", "x\u2028y"])
def test_control_characters(bad: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validation.text("case_number", bad, required=True)
    assert reason(exc) == "CONTROL_CHARACTERS"


def test_oversized() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validation.text("case_number", "9" * 65, required=True)
    assert reason(exc) == "ARGUMENT_TOO_LONG"
    assert validation.text("case_number", "9" * 64, required=True)


def test_duplicate_fields() -> None:
    with pytest.raises(InvalidArgument) as exc:
        validation.field_names(["name", "name"])
    assert reason(exc) == "DUPLICATE_FIELD"


def test_the_printable_fast_path_agrees_with_the_categories() -> None:
    """has_control_characters answers from str.isprintable() first: same answer for every
    character of the Basic Multilingual Plane and a sample beyond it."""
    import sys
    import unicodedata

    for code in [*range(0x10000), *range(0x10000, sys.maxunicode + 1, 97)]:
        char = chr(code)
        expected = unicodedata.category(char) in validation.CONTROL_CATEGORIES
        assert validation.has_control_characters(f"ab{char}cd") == expected, hex(code)


def test_only_valid_resident_ids_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validation, "_VALID_IDS", {})
    monkeypatch.setattr(validation, "_VALID_IDS_MAX", 3)
    bad = "110105194912310021"  # wrong check digit
    for _ in range(2):  # a refused ID is checked again every time
        with pytest.raises(InvalidArgument):
            validation.subject_id(bad)
    assert bad not in validation._VALID_IDS
    born = __import__("datetime").date(1990, 3, 7)
    valid = [resident_id.make("330825", born, n) for n in range(1, 6)]
    for value in valid:
        assert validation.subject_id(value) == value
        assert validation.subject_id(value) == value  # the remembered answer is the same
    assert 0 < len(validation._VALID_IDS) <= 3  # bounded: emptied when full
