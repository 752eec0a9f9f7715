"""`mergelang fmt`: one canonical layout for `.merge` scripts, comments kept.

The layout is `unparse`'s (the same printer `mergelang convert` writes with): parsing the
script and printing its tree gives text that parses back to the same tree, and printing
that again changes nothing. What the tree does not keep is carried beside it as `Trivia`:
the comment lines and blank lines above each statement (runs of blank lines become one;
none at the top of the file or of a block), and a comment at the end of a statement's last
line.

A comment anywhere else (inside a multi-line expression, on a function's `{` line, after
a block's `return` line) has no place in that layout: moving it would separate it from
the code it explains, so the top-level statement holding it is kept as written instead
(only trailing spaces are removed). Everything else in the file is still formatted, and
formatting stays idempotent.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import ast
from .diagnostics import Diagnostic, MergeError, error
from .syntax import parse
from .unparse import WIDTH, Trivia, unparse

# strings first, so a `#` inside one is not a comment
_TOKENS = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\{')


@dataclass(frozen=True)
class _Comment:
    col: int      # 1-based
    text: str
    alone: bool   # nothing but the comment on its line


class _Lines:
    """The script's lines, with where comments and block-opening braces are."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.comments: dict[int, _Comment] = {}
        self.braces: list[tuple[int, int]] = []  # (line, col) of each `{`
        starts = [0] + [m.end() for m in re.finditer("\n", text)]
        for m in _TOKENS.finditer(text):
            if m.group().startswith('"'):
                continue
            line = _line_of(starts, m.start())
            col = m.start() - starts[line - 1] + 1
            if m.group() == "{":
                self.braces.append((line, col))
            else:
                before = self.lines[line - 1][:col - 1]
                self.comments[line] = _Comment(col, m.group().rstrip(), not before.strip())

    def between(self, first: int, last: int) -> list[str] | None:
        """Lines first..last (1-based, inclusive) as trivia lines: a comment's text or ""
        for a blank line; None if one of them holds code."""
        out = []
        for n in range(first, last + 1):
            comment = self.comments.get(n)
            if comment is not None and comment.alone:
                out.append(comment.text)
            elif self.lines[n - 1].strip():
                return None
            else:
                out.append("")
        return out

    def trailing(self, line: int, after_col: int) -> str | None:
        comment = self.comments.get(line)
        return comment.text if comment is not None and comment.col >= after_col else None

    def inside(self, first: int, last: int) -> bool:
        """Whether a comment sits on one of lines first..last."""
        return any(first <= n <= last for n in self.comments)


def _line_of(starts: list[int], offset: int) -> int:
    lo, hi = 0, len(starts)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid
    return lo + 1


def _tidy(lines: list[str], top: bool) -> tuple[str, ...]:
    """Runs of blank lines as one; none first when `top` (the start of a file or block)."""
    out: list[str] = []
    for line in lines:
        if line == "" and (out and out[-1] == "" or top and not out):
            continue
        out.append(line)
    return tuple(out)


def format_source(text: str, name: str = "<script>", width: int = WIDTH) -> str:
    """The canonical text of a script. Raises MergeError (a located diagnostic) when it
    does not parse, or nests too deeply to lay out (the layout recurses over the tree)."""
    module = parse(text, name)
    try:
        return _layout(module, width)
    except RecursionError:
        for stmt in module.statements:
            try:
                hash(stmt)  # as deep as the statement: what the trivia map does first
            except RecursionError:
                raise error("this statement nests too deeply to lay out", stmt.span,
                            hint="name the inner parts (x = ...)") from None
        raise


def _layout(module: ast.Module, width: int) -> str:
    lines = _Lines(module.source.text)
    out: list[str] = []
    run: list[ast.Stmt] = []
    trivia: dict = {}
    previous = 0  # the last line of the previous statement

    def flush() -> None:
        if run:
            out.extend(unparse(ast.Module(module.source, tuple(run)), trivia,
                               width=width).splitlines())
            run.clear()

    for stmt in module.statements:
        above = lines.between(previous + 1, stmt.span.line - 1) or []
        above = _tidy(above, top=not out and not run)
        placed = _place(stmt, lines)
        if placed is None:  # a comment the layout has no place for: keep it as written
            flush()
            out.extend(above)
            out.extend(line.rstrip() for line in
                       lines.lines[stmt.span.line - 1:stmt.span.end_line])
        else:
            placed[stmt] = Trivia(above, placed.get(stmt, Trivia()).after)
            trivia.update(placed)
            run.append(stmt)
        previous = stmt.span.end_line
    flush()
    end = lines.between(previous + 1, len(lines.lines)) or []
    tail = list(_tidy(end, top=not out))
    while tail and tail[-1] == "":
        tail.pop()
    out.extend(tail)
    return "".join(line + "\n" for line in out)


def _place(stmt: ast.Stmt, lines: _Lines) -> dict | None:
    """The trivia of a statement (and of a block's statements and `return` line) other
    than the lines above it, or None when one of its comments has no place."""
    span = stmt.span
    placed: dict = {}
    after = lines.trailing(span.end_line, span.end_col)
    if after is not None:
        placed[stmt] = Trivia((), after)
    if not (isinstance(stmt, ast.FnDef) and (stmt.body or _is_block(stmt, lines))):
        return None if lines.inside(span.line, span.end_line - 1) else placed
    brace = next(line for line, col in lines.braces
                 if (line, col) > (span.line, span.col))
    if lines.inside(span.line, brace) and not (brace == span.end_line and after):
        return None
    previous = brace
    for element in (*stmt.body, stmt.result):
        e = element.span
        above = lines.between(previous + 1, e.line - 1)
        if above is None or lines.inside(e.line, e.end_line - 1):
            return None
        inner = lines.trailing(e.end_line, e.end_col)
        if e.end_line == span.end_line:  # `return x }`: a comment there is the block's
            inner = None
        trivia = Trivia(_tidy(above, top=previous == brace), inner)
        if trivia != Trivia() or element is stmt.result:  # (a block stays a block)
            placed[element] = trivia
        previous = e.end_line
    closing = lines.between(previous + 1, span.end_line - 1)
    if closing is None or any(closing):
        return None
    return placed


def _is_block(fn: ast.FnDef, lines: _Lines) -> bool:
    """A `fn f() { return x }` with no statements before its `return`."""
    return any((fn.span.line, fn.span.col) < brace < (fn.result.span.line, fn.result.span.col)
               for brace in lines.braces)


@dataclass(frozen=True)
class Formatted:
    path: Path
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def format_file(path: Path, width: int = WIDTH) -> Formatted:
    """Format one file (not written). Raises MergeError or OSError."""
    text = path.read_text(encoding="utf-8")
    return Formatted(path, text, format_source(text, str(path), width))


def run(paths: list[Path], check: bool, show_diff: bool, report: Callable[[MergeError], None],
        say: Callable[[str], None], write_diff: Callable[[str], None]) -> int:
    """`mergelang fmt`: format each file in place (with `check`, change nothing). Returns
    the exit status: 2 if a file could not be read or parsed (the others are still
    done), else 1 if `check` found a file that would change, else 0."""
    status = 0
    for path in paths:
        try:
            result = format_file(path)
        except MergeError as exc:
            report(exc)
            status = 2
            continue
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            report(MergeError(Diagnostic(f"cannot read {path}: {reason}",
                                         hint="fmt takes .merge script files")))
            status = 2
            continue
        if not result.changed:
            continue
        if show_diff:
            write_diff("".join(difflib.unified_diff(
                result.before.splitlines(keepends=True), result.after.splitlines(keepends=True),
                str(path), f"{path} (formatted)")))
        if check:
            say(f"would reformat {path}")
            status = max(status, 1)
        else:
            path.write_text(result.after, encoding="utf-8")
            say(f"reformatted {path}")
    return status
