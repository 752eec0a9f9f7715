"""Literal values: the text of a string or number in a script -> its value, or a
located diagnostic.

Escapes follow Python's rules, so every string that worked before keeps its value
(`\\n`, `\\t`, `\\"`, `\\\\`, `\\xHH`, `\\uHHHH`, `\\UHHHHHHHH`, `\\N{name}`, octal), and an
unknown escape such as `\\.` or `\\d` stays as written, for regular expressions. A bad
escape (`"C:\\users"`: `\\u` wants four hex digits) is a diagnostic at the escape, as are
a lone surrogate (no UTF-8 file, so no output, can hold one), an integer beyond 64 bits
and a float beyond float range. A path (`check_path`) cannot hold a NUL character either.
"""

from __future__ import annotations

import math
import re
import unicodedata

from .diagnostics import MergeError, Span, error

MAX_INT = 2**63 - 1
"""The largest integer literal: every integer a merge uses (seeds, counts, layer
numbers) is a 64-bit integer in the end."""

_SIMPLE = {"\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n",
           "r": "\r", "t": "\t", "v": "\v"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_NAMED = re.compile(r"\{([^}]*)\}")
_ESCAPE_HINT = ('to write a backslash, double it ("\\\\"); in a Windows path, / works too '
                '(e.g. "C:/users/me/base")')


def string_value(text: str, span: Span) -> str:
    """The value of a string token `text` (quotes included) that starts at `span`."""
    body = text[1:-1]
    if "\\" not in body and not _has_surrogate(body):
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            _check_char(c, span, i, 1)
            out.append(c)
            i += 1
            continue
        value, length = _escape(body, i, span)
        _check_char(value, span, i, length)
        out.append(value)
        i += length
    return "".join(out)


def _escape(body: str, i: int, span: Span) -> tuple[str, int]:
    """The value of the escape at body[i] (a backslash) and how many characters it uses."""
    e = body[i + 1] if i + 1 < len(body) else ""
    if e in _SIMPLE:
        return _SIMPLE[e], 2
    if e and e in "01234567":
        digits = re.match(r"[0-7]{1,3}", body[i + 1:]).group()
        return chr(int(digits, 8)), 1 + len(digits)
    if e in _HEX_DIGITS:
        want = _HEX_DIGITS[e]
        digits = re.match(r"[0-9A-Fa-f]*", body[i + 2:i + 2 + want]).group()
        if len(digits) < want:
            raise _bad(span, i, 2 + len(digits),
                       f'invalid escape "\\{e}{digits}" in a string: \\{e} takes {want} '
                       "hex digits")
        code = int(digits, 16)
        if code > 0x10FFFF:
            raise _bad(span, i, 2 + want,
                       f'invalid escape "\\{e}{digits}": there is no character U+{code:X}')
        return chr(code), 2 + want
    if e == "N":
        match = _NAMED.match(body, i + 2)
        try:
            return unicodedata.lookup(match.group(1)), 3 + len(match.group(1)) + 1
        except (AttributeError, KeyError):
            shown = match.group() if match else ""
            raise _bad(span, i, 2 + len(shown),
                       f'invalid escape "\\N{shown}" in a string: \\N takes a character '
                       "name in braces, e.g. \\N{BULLET}") from None
    return "\\" + e, 2  # not an escape: kept as written (regular expressions need these)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def check_path(value: str, span: Span) -> None:
    """A string used as a file path: no NUL character (no file system allows one)."""
    if "\0" in value:
        raise error("a path cannot hold a NUL character", span,
                    hint="remove it (it may come from a \\0 or \\x00 escape)")


def _check_char(c: str, span: Span, i: int, length: int) -> None:
    if "\ud800" <= c <= "\udfff":
        raise _bad(span, i, length, f"a string cannot hold a lone surrogate (U+{ord(c):04X})",
                   hint="write the character itself, or both halves of its pair as one "
                   "\\U escape")


def _bad(span: Span, i: int, length: int, message: str,
         hint: str = _ESCAPE_HINT) -> MergeError:
    """An error under body[i:i + length]; the string is on one line, after its quote."""
    col = span.col + 1 + i
    return error(message, Span(span.source, span.line, col, span.line, col + max(length, 1)),
                 hint=hint)


def number_value(text: str, span: Span) -> int | float:
    """The value of a number token; integers up to MAX_INT, floats up to float range."""
    if text.isdigit():
        if len(text.lstrip("0")) > len(str(MAX_INT)) or int(text) > MAX_INT:
            raise error(f"the integer {_short(text)} is too large (at most {MAX_INT}, "
                        "2**63 - 1)", span,
                        hint="a float is written with a point or an exponent, e.g. 1e30")
        return int(text)
    value = float(text)
    if math.isinf(value):
        raise error(f"the number {_short(text)} is too large (a float is at most about "
                    "1.8e308)", span, hint="check the exponent")
    return value


def _short(text: str) -> str:
    return text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"
