"""JSON the CLI prints (every ``--json``): readable, and harmless to a terminal.

Values in the audit log and in the broker's answers come from callers -- tokens, requests,
older entries -- so a value may hold an escape sequence (ESC, CSI), a bidirectional override
that reorders what the auditor reads (U+202E), a zero-width character or a line separator.
``json.dumps(..., ensure_ascii=False)`` keeps non-ASCII text readable (names in Chinese stay
Chinese) but escapes only C0 controls: DEL, C1 controls and format characters would reach the
terminal raw. :func:`dumps` writes every character of Unicode categories Cc, Cf, Cs, Zl and Zp
as a JSON ``\\uXXXX`` escape (a surrogate pair above U+FFFF), so the text still parses to the
same values and shows nothing a terminal would act on.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

__all__ = ["ESCAPED_CATEGORIES", "dumps", "message", "terminal_safe"]

#: Unicode categories written as escapes: control, format (bidi controls, zero-width, BOM),
#: surrogate, line and paragraph separators.
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Candidates: DEL and everything above ASCII (C0 controls are escaped by json.dumps already,
# and a raw newline in its output is layout, not a value).
_CANDIDATE = re.compile("[\x7f-\U0010ffff]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if unicodedata.category(char) not in ESCAPED_CATEGORIES:
        return char
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # UTF-16 surrogate pair, as JSON spells characters beyond the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def terminal_safe(text: str) -> str:
    """JSON text from ``json.dumps`` with the characters of :data:`ESCAPED_CATEGORIES`
    escaped (they can only be inside its strings, where an escape means the same)."""
    if text.isascii() and "\x7f" not in text:
        return text
    return _CANDIDATE.sub(_escape, text)


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(value, ensure_ascii=False, **kwargs)``, terminal-safe."""
    return terminal_safe(json.dumps(value, ensure_ascii=False, **kwargs))


def message(msg: Message, **kwargs: Any) -> str:
    """A protobuf message as JSON (proto field names), terminal-safe; ``kwargs`` as for
    :func:`dumps` (``indent``, ``sort_keys``)."""
    return dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True), **kwargs)
