"""Emission: the converted script as a syntax tree, and its text through `unparse`.

The translation builds expressions with a `Make` (every node carries the span of the YAML
node it was translated from) and hands the statements to a `Script`: settings, one
`model(...)` line per model, named bindings (an equal expression is bound once), and the
`output`. `Script.text` lays them out in that order, in groups parted by blank lines,
with the converter's comments passed to the unparser as statement trivia.
"""

from __future__ import annotations

import math
from typing import Any

from .. import ast
from ..diagnostics import Span, error
from ..unparse import WIDTH, Trivia, unparse

_KEYWORDS = frozenset("fn return output import set param if then else and or not true false none"
                      .split())


class Make:
    """Builds syntax-tree nodes that all carry one span."""

    def __init__(self, span: Span):
        self.span = span

    def name(self, id_: str) -> ast.Name:
        return ast.Name(self.span, id_)

    def lit(self, value: Any) -> ast.Expr:
        """A Python value as a literal: a negative number is `-` applied to a number, as
        the parser reads it."""
        if value is None:
            return ast.NoneLit(self.span)
        if isinstance(value, bool):
            return ast.Bool(self.span, value)
        if isinstance(value, int | float):
            if not math.isfinite(value):
                raise error(f"{value} is not a number mergelang can write")
            if repr(value).startswith("-"):
                return ast.Unary(self.span, "-", ast.Number(self.span, -value))
            return ast.Number(self.span, value)
        if isinstance(value, str):
            return ast.String(self.span, value)
        if isinstance(value, list | tuple):
            return ast.ListExpr(self.span, tuple(self.lit(v) for v in value))
        raise TypeError(value)

    def op(self, left: ast.Expr | str, op: str, right: ast.Expr | str) -> ast.Binary:
        return ast.Binary(self.span, op, self._expr(left), self._expr(right))

    def call(self, fn: str, args: tuple = (), kwargs: tuple[tuple[str, Any], ...] = ()
             ) -> ast.Call:
        """`fn(args..., key=value...)`; a str argument is a name, other values literals."""
        return ast.Call(self.span, self.name(fn), tuple(self._expr(a) for a in args),
                        tuple(ast.Keyword(k, self._expr(v), self.span) for k, v in kwargs))

    def cond(self, test: ast.Expr, then: Any, orelse: Any) -> ast.Cond:
        return ast.Cond(self.span, test, self._expr(then), self._expr(orelse))

    def layers(self, model: str, start: int, stop: int) -> ast.Slice:
        """`model.layers[start:stop]`."""
        return ast.Slice(self.span, ast.Attr(self.span, self.name(model), "layers"),
                         self.lit(start), self.lit(stop))

    def _expr(self, x: Any) -> ast.Expr:
        if isinstance(x, ast.Expr):
            return x
        return self.name(x) if isinstance(x, str) else self.lit(x)


def text_of(expr: ast.Expr) -> str:
    """An expression's text: equal texts are equal expressions, whatever their spans."""
    return unparse(expr, width=1 << 30)


def wrap_comment(text: str, width: int = WIDTH) -> tuple[str, ...]:
    """`text` as comment lines of at most `width` columns, continuations indented."""
    lines, line = [], "#"
    for word in text.split():
        if len(line) + 1 + len(word) > width and line != "#":
            lines.append(line)
            line = "#  "
        line += " " + word
    lines.append(line)
    return tuple(lines)


class Script:
    """The statements of the script being written, with their comments."""

    def __init__(self, reserved: set[str]):
        self.head: list[str] = []   # comment lines at the top
        self.settings: list[tuple[ast.Set, str | None]] = []
        self.models: list[tuple[ast.Assign, str | None]] = []
        self.bindings: list[tuple[ast.Assign, str | None]] = []
        self.taken = set(reserved) | _KEYWORDS
        self._bound: dict[str, str] = {}   # text_of(value) -> name

    def unique(self, name: str) -> str:
        """`name`, or `name_2`, `name_3`, ... when it is taken; now taken."""
        if name in self.taken:
            i = 2
            while f"{name}_{i}" in self.taken:
                i += 1
            name = f"{name}_{i}"
        self.taken.add(name)
        return name

    def set(self, key: str, value: ast.Expr, comment: str | None = None) -> None:
        self.settings.append((ast.Set(value.span, key, value), comment))

    def model(self, name: str, path: str, span: Span, comment: str | None,
              lora: str | None = None, base: str | None = None) -> None:
        """`name = model("path")`, or with mergekit's `path+lora` the adapted model
        `model("path") + lora("adapter")`; with `base` (the name of the plain model
        `path`, where the script has several) `base + lora("adapter", base=base)`, so
        that the adapter is measured against its own model, not the script's first."""
        make = Make(span)
        value: ast.Expr = make.call("model", (make.lit(path),)) if base is None \
            else make.name(base)
        if lora is not None:
            keywords = (("base", base),) if base is not None else ()
            value = make.op(value, "+", make.call("lora", (make.lit(lora),), keywords))
        self.models.append((ast.Assign(span, name, value), comment))

    def bind(self, hint: str, value: ast.Expr, comment: str | None = None) -> ast.Name:
        """A name for `value`: a new one made from `hint`, or the name of an equal binding
        (so a value two parameters share is written once). `comment` goes above it."""
        key = text_of(value)
        if key not in self._bound:
            self._bound[key] = self.unique(hint)
            self.bindings.append((ast.Assign(value.span, self._bound[key], value), comment))
        return ast.Name(value.span, self._bound[key])

    def text(self, output: ast.Expr) -> str:
        """The script: head comments, settings, models, bindings, output; a blank line
        between groups."""
        statements: list[ast.Stmt] = []
        trivia: dict[ast.Stmt, Trivia] = {}
        gap: tuple[str, ...] = (*self.head, "") if self.head else ()

        def add(stmt: ast.Stmt, above: tuple[str, ...] = (), after: str | None = None) -> None:
            nonlocal gap
            trivia[stmt] = Trivia((*gap, *above), f"# {after}" if after else None)
            statements.append(stmt)
            gap = ()

        for group in (self.settings, self.models):
            for stmt, comment in group:
                add(stmt, after=comment)
            gap = ("",) if group else gap
        said: set[str] = set()
        for stmt, comment in self.bindings:   # a comment is said once, above its first use
            first = comment is not None and comment not in said
            if first:
                said.add(comment)
            add(stmt, above=wrap_comment(comment) if first else ())
        gap = ("",) if self.bindings else gap
        add(ast.Output(output.span, output))
        return unparse(ast.Module(output.span.source, tuple(statements)), trivia)
