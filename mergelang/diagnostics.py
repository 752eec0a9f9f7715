"""Diagnostics: every user-facing error carries a source span, words and a likely fix.

Errors are values, not tracebacks. A `Span` points into a `Source` (the file's text is
kept so the offending line can be shown with a caret). `MergeError` carries one or more
`Diagnostic`s and renders them like a compiler would:

    error: unknown function "tie"
      --> ties.merge:7:15
       |
     7 | output base + tie(math - base)
       |               ^^^
       = help: did you mean "ties"?
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, eq=False)
class Source:
    """A script's text and the name it is reported under."""

    name: str
    text: str
    path: Path | None = None  # the file, when there is one: relative paths resolve against it

    def line(self, number: int) -> str:
        """Line `number` as the parser counts lines (only \\n ends one; str.splitlines
        would also split at form feeds and other separators the lexer reads as spaces)."""
        lines = self.text.split("\n")
        return lines[number - 1] if 0 < number <= len(lines) else ""


@dataclass(frozen=True)
class Span:
    """A 1-based line/column range in a `Source`; `end_col` is exclusive."""

    source: Source = field(compare=False, hash=False, repr=False)
    line: int
    col: int
    end_line: int
    end_col: int

    @property
    def file(self) -> str:
        return self.source.name

    def __str__(self) -> str:
        return f"{self.source.name}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None
    notes: tuple[str, ...] = ()
    severity: str = "error"

    def render(self) -> str:
        out = [f"{self.severity}: {self.message}"]
        if self.span is not None:
            out.append(f"  --> {self.span}")
            text = _visible(self.span.source.line(self.span.line))
            if text:
                number = str(self.span.line)
                pad = " " * len(number)
                last = self.span.end_col if self.span.end_line == self.span.line else len(text) + 1
                width = max(1, min(last, len(text) + 1) - self.span.col)
                out.append(f" {pad} |")
                out.append(f" {number} | {text}")
                out.append(f" {pad} | {' ' * (self.span.col - 1)}{'^' * width}")
        for note in self.notes:
            out.append(f"   = note: {note}")
        if self.hint:
            out.append(f"   = help: {self.hint}")
        return "\n".join(out)


def _visible(line: str) -> str:
    """A source line safe to print: each control character (a NUL, an escape sequence
    that would drive the terminal) shown as one replacement character, so carets stay
    under the same columns."""
    if line.isprintable():
        return line
    return "".join(c if c.isprintable() or c == "\t" else "\ufffd" for c in line)


class MergeError(Exception):
    """A script or input error. Carries diagnostics; never shown as a traceback."""

    def __init__(self, diagnostics: Diagnostic | Iterable[Diagnostic]):
        if isinstance(diagnostics, Diagnostic):
            diagnostics = [diagnostics]
        self.diagnostics: list[Diagnostic] = list(diagnostics)
        super().__init__(self.render())

    def render(self) -> str:
        return "\n\n".join(d.render() for d in self.diagnostics)


def error(message: str, span: Span | None = None, hint: str | None = None,
          notes: Iterable[str] = ()) -> MergeError:
    """Shorthand: `raise error("...", span, hint="...")`."""
    return MergeError(Diagnostic(message, span, hint, tuple(notes)))


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """A 'did you mean ...?' hint for a misspelled name, or None."""
    close = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else None


STDLIB_PREFIX = "stdlib/"  # how resolve names the standard library's files


def in_stdlib(span: Span) -> bool:
    return span.file.startswith(STDLIB_PREFIX)


def move_to_script(diagnostics: Iterable[Diagnostic], span: Span | None,
                   where: str = "found") -> list[Diagnostic]:
    """Diagnostics found inside the standard library, or at no place, shown at `span` in
    the user's script (the call that led there, or the `output`) with a note saying
    where in the library; the repeats this makes are dropped. The one place that
    decides how a library error reaches the user."""
    shown: dict[tuple, Diagnostic] = {}
    for d in diagnostics:
        if span is not None and (d.span is None or in_stdlib(d.span)):
            notes = d.notes + ((f"{where} at {d.span}",) if d.span is not None else ())
            d = dataclasses.replace(d, span=span, notes=notes)
        shown.setdefault((d.message, d.span), d)
    return list(shown.values())
