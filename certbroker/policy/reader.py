"""Typed reading of composed YAML nodes with ``path:line`` errors (policy files, policy tests).

Nodes come from ``yaml.compose`` with ``SafeLoader`` (libyaml's ``CSafeLoader`` if present):
nothing is constructed from tags, and every value keeps the line it was written on, so each
complaint can say where.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

#: (value, "path:line") — a name kept with where it was written, for reference errors.
Located = tuple[str, str]

#: libyaml's parser when PyYAML was built with it (same nodes, tags and marks as SafeLoader's,
#: about ten times faster: a city's policy set is hundreds of kilobytes), else the pure-Python one.
_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)
_STR = "tag:yaml.org,2002:str"
_TAG_NAMES = {
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
    _STR: "a string",
}


class Reader:
    """Typed access to composed YAML nodes of one file, recording ``path:line: message``."""

    def __init__(self, display: str, errors: list[str]) -> None:
        self.display = display
        self.errors = errors

    def at(self, node: yaml.Node) -> str:
        return f"{self.display}:{node.start_mark.line + 1}"

    def error(self, node: yaml.Node, message: str) -> None:
        self.errors.append(f"{self.at(node)}: {message}")

    def compose(self, data: bytes) -> yaml.Node | None:
        """Parse one YAML document; syntax errors are recorded and give None."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            self.errors.append(f"{self.display}:{line}: not UTF-8 text")
            return None
        try:
            return yaml.compose(text, Loader=_LOADER)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            self.errors.append(f"{self.display}:{line}: YAML syntax error: {exc.problem or exc}")
        except yaml.YAMLError as exc:
            self.errors.append(f"{self.display}:1: YAML error: {exc}")
        return None

    def mapping(
        self, node: yaml.Node, what: str, required: Sequence[str] = (), optional: Sequence[str] = ()
    ) -> dict[str, yaml.Node] | None:
        """A mapping with known keys; unknown, duplicate and missing keys are errors."""
        pairs = self.pairs(node, what)
        if pairs is None:
            return None
        allowed = (*required, *optional)
        out: dict[str, yaml.Node] = {}
        for key, key_node, value in pairs:
            if key not in allowed:
                self.error(key_node, f"{what}: unknown key {key!r} (allowed: {', '.join(allowed)})")
            else:
                out[key] = value
        for key in required:
            if key not in out:
                self.error(node, f"{what}: missing required key {key!r}")
        return out

    def pairs(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """A mapping with free string keys (record type → ...), rejecting duplicate keys."""
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what}: expected a mapping, got {describe(node)}")
            return None
        out: list[tuple[str, yaml.Node, yaml.Node]] = []
        seen: set[str] = set()
        for key_node, value in node.value:
            key = self.string(key_node, f"{what} key")
            if key is None:
                continue
            if key in seen:
                self.error(key_node, f"{what}: duplicate key {key!r}")
                continue
            seen.add(key)
            out.append((key, key_node, value))
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what}: expected a list, got {describe(node)}")
            return None
        return list(node.value)

    def string(self, node: yaml.Node, what: str, *, as_written: bool = False) -> str | None:
        """A non-empty string. ``as_written`` takes any plain scalar's text (times, offsets)."""
        plain = isinstance(node, yaml.ScalarNode) and node.tag != "tag:yaml.org,2002:null"
        if not (plain and (as_written or node.tag == _STR)):
            self.error(node, f"{what}: expected a string, got {describe(node)}")
            return None
        value = str(node.value)
        if not value.strip():
            self.error(node, f"{what}: must not be empty")
            return None
        return value

    def strings(
        self, node: yaml.Node, what: str, *, allow_empty: bool = False
    ) -> list[Located] | None:
        """A list of distinct non-empty strings, each with its location."""
        items = self.sequence(node, what)
        if items is None:
            return None
        if not items and not allow_empty:
            self.error(node, f"{what}: must not be an empty list")
        out: list[Located] = []
        for item in items:
            value = self.string(item, f"{what} entry")
            if value is None:
                continue
            if any(value == v for v, _ in out):
                self.error(item, f"{what}: {value!r} listed twice")
                continue
            out.append((value, self.at(item)))
        return out

    def integer(self, node: yaml.Node, what: str) -> int | None:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int"):
            self.error(node, f"{what}: expected an integer, got {describe(node)}")
            return None
        return int(yaml.constructor.SafeConstructor().construct_yaml_int(node))

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        if not (isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool"):
            self.error(node, f"{what}: expected true or false, got {describe(node)}")
            return None
        return bool(yaml.constructor.SafeConstructor().construct_yaml_bool(node))


def describe(node: yaml.Node) -> str:
    """What a node holds, for "expected X, got Y" messages."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"{_TAG_NAMES.get(node.tag, node.tag)} ({node.value!r})"
