"""Regenerate the README's configuration reference from certbroker.config, or check it.

python scripts/docgen.py          # rewrite README.md between the config markers
python scripts/docgen.py --check  # exit 1 if README.md differs from a fresh generation

Everything between ``<!-- config:begin -->`` and ``<!-- config:end -->`` comes from the fields'
declarations (:data:`certbroker.config.SETTINGS`): a TOML file with every key, its default and
a comment, then the table of environment variables. The prose around the markers is written by
hand.
"""

from __future__ import annotations

import difflib
import json
import sys
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from certbroker.config import RECORD_TYPE_PLACEHOLDER, SECTIONS, SETTINGS, Key, Setting, key_of

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN = "<!-- config:begin -->"
END = "<!-- config:end -->"
NOTICE = "<!-- generated from certbroker/config.py by `make docs`: edit there, not here -->"

#: The README's line width, for the prose we generate.
WIDTH = 96

#: The column comments start at in the TOML block (a longer line gets two spaces).
COMMENT_COLUMN = 31

_KIND_NAMES: Mapping[type, str] = {
    str: "text",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}


def toml(value: Any) -> str:
    """``value`` as a TOML literal (the kinds a setting or an example may have)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # a float keeps its ".0": the reader sees the key takes fractions
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml(item) for item in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _line(code: str, comment: str) -> str:
    if not comment:
        return code
    return f"{code}{' ' * max(COMMENT_COLUMN - len(code), 2)}# {comment}"


def _comment(key: Key) -> str:
    """The key's help, what its unset default means, then what it may be, in brackets."""
    text = f"{key.help}; default: {key.unset}" if key.unset else key.help
    allowed = key.bounds or " | ".join(key.choices) or key.pattern_help
    return f"{text} [{allowed}]" if allowed else text


def _value_line(setting: Setting) -> str:
    key = setting.key
    if key.unset:  # the default is computed or absent: show an example, commented out
        return _line(f"# {key.name} = {toml(key.example)}", _comment(key))
    return _line(f"{key.name} = {toml(setting.default)}", _comment(key))


def _table_lines(header: str, comment: str, example: Any) -> Iterator[str]:
    """One example table of a structure, each of its keys commented from its own declaration."""
    if not is_dataclass(example):
        raise TypeError(f"{header}: the example must be an instance of the table's dataclass")
    yield _line(header, comment)
    for f in fields(example):
        value = getattr(example, f.name)
        if value is not None and value != ():
            yield _line(f"{f.name} = {toml(value)}", _comment(key_of(f)))


def _structure_lines(setting: Setting) -> Iterator[str]:
    key = setting.key
    comment = f"{key.help} (example)"
    if setting.shape == "tables":
        for item in key.example:
            yield from _table_lines(f"[[{key.dotted}]]", comment, item)
    else:
        for name, item in key.example.items():
            yield from _table_lines(f"[{key.section}.{name}]", comment, item)


def toml_block(settings: Iterable[Setting] = SETTINGS) -> list[str]:
    """Every key with its default, section by section, in declaration order."""
    lines: list[str] = []
    section = None
    for setting in settings:
        if setting.shape != "value":
            lines += ["", *_structure_lines(setting)]
            continue
        if setting.key.section != section:
            section = setting.key.section
            lines += ["", _line(f"[{section}]", SECTIONS[section])]
        lines.append(_value_line(setting))
    return lines[1:]


def _value_text(setting: Setting) -> str:
    key = setting.key
    if key.env_value:
        return key.env_value
    text = _KIND_NAMES[setting.kind]
    details = [key.bounds, ", ".join(f"`{c}`" for c in key.choices), key.pattern_help]
    return ", ".join([text, *(d for d in details if d)])


def _setting_name(key: Key) -> str:
    if key.name.startswith("<"):  # one table per name: [adapters.<record_type>]
        return f"`[{key.section}.{key.name}]`"
    return f"`[{key.section}] {key.name}`"


def env_table(settings: Iterable[Setting] = SETTINGS) -> list[str]:
    """The environment variables, one row each, and the keys only the file sets."""
    rows = ["| variable | setting | value |", "| --- | --- | --- |"]
    file_only = []
    for setting in settings:
        key = setting.key
        if key.env:
            rows.append(f"| `{key.env}` | {_setting_name(key)} | {_value_text(setting)} |")
        else:
            file_only.append(_setting_name(key))
    return [
        "Environment variables override the file; an empty one counts as unset. Booleans are",
        "`true`/`false`, `1`/`0` or `yes`/`no`; a relative path is relative to the working",
        f"directory; `{RECORD_TYPE_PLACEHOLDER}` is a record type in capitals.",
        "",
        *rows,
        "",
        *_wrap("Set in the file only: " + ", ".join(file_only) + "."),
    ]


def _wrap(text: str) -> list[str]:
    """``text`` wrapped as the README is, never inside a code span (they hold one space)."""
    unbroken = text.replace("] ", "]\u00a0")
    return [line.replace("\u00a0", " ") for line in textwrap.wrap(unbroken, WIDTH)]


def reference() -> str:
    """The generated text between the markers (without them)."""
    examples = [
        f"`{line.split()[0]}`"
        for line in toml_block()
        if line.startswith("[") and "(example)" in line
    ]
    lines = [
        NOTICE,
        *_wrap(
            "Every key, with its default and, in brackets, the values it takes. A key whose"
            " default is computed or absent is commented out, with an example value;"
            f" {' and '.join(examples)} are examples."
        ),
        "",
        "```toml",
        *toml_block(),
        "```",
        "",
        *env_table(),
    ]
    return "\n".join(lines) + "\n"


def splice(text: str, generated: str) -> str:
    """``text`` (the README) with ``generated`` between its markers."""
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 or end < begin or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(f"README.md needs one {BEGIN} line, then one {END} line")
    return text[: begin + len(BEGIN)] + "\n" + generated + text[end:]


def main(argv: list[str], readme: Path = README) -> int:
    """Rewrite ``readme``'s reference; with ``--check``, only say (exit 1) whether it drifted."""
    current = readme.read_text(encoding="utf-8")
    try:
        fresh = splice(current, reference())
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if "--check" not in argv:
        if fresh != current:
            readme.write_text(fresh, encoding="utf-8")
        return 0
    if fresh != current:
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            fresh.splitlines(keepends=True),
            "README.md",
            "README.md (generated)",
        )
        sys.stdout.writelines(diff)
        print("README configuration reference drifted from certbroker/config.py (run `make docs`)")
        return 1
    print("README configuration reference matches certbroker/config.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
