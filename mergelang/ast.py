"""The syntax tree: frozen dataclasses, each with the source span it came from.

Expressions are few on purpose: every operator (arithmetic, comparison, `~`, `|`,
`and`, `or`) is a `Binary` with its operator spelled as in the source.
"""

from __future__ import annotations

from dataclasses import dataclass

from .diagnostics import Source, Span


@dataclass(frozen=True)
class Expr:
    span: Span


@dataclass(frozen=True)
class Number(Expr):
    value: int | float


@dataclass(frozen=True)
class String(Expr):
    value: str


@dataclass(frozen=True)
class Bool(Expr):
    value: bool


@dataclass(frozen=True)
class NoneLit(Expr):
    pass


@dataclass(frozen=True)
class Name(Expr):
    id: str


@dataclass(frozen=True)
class ListExpr(Expr):
    items: tuple[Expr, ...]


NEGATE = "-"  # the two unary operators, as Unary.op holds them
NOT = "not"


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # NEGATE or NOT
    operand: Expr


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # + - * / == != < <= > >= ~ | and or
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Cond(Expr):
    test: Expr
    then: Expr
    orelse: Expr


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span  # of `name=value`


@dataclass(frozen=True)
class Call(Expr):
    func: Expr
    args: tuple[Expr, ...]
    kwargs: tuple[Keyword, ...]


@dataclass(frozen=True)
class Index(Expr):
    value: Expr
    index: Expr


@dataclass(frozen=True)
class Slice(Expr):
    """`value[start:stop]`; either bound may be omitted."""

    value: Expr
    start: Expr | None
    stop: Expr | None


@dataclass(frozen=True)
class Attr(Expr):
    value: Expr
    name: str


# statements


@dataclass(frozen=True)
class Stmt:
    span: Span


@dataclass(frozen=True)
class Assign(Stmt):
    name: str
    value: Expr


@dataclass(frozen=True)
class Output(Stmt):
    value: Expr


@dataclass(frozen=True)
class Import(Stmt):
    path: str


@dataclass(frozen=True)
class Set(Stmt):
    key: str
    value: Expr


@dataclass(frozen=True)
class ParamDecl(Stmt):
    """`param NAME = literal`: a binding whose value `-D NAME=VALUE` (or `params=` in
    Python) may replace; the literal is its default (see mergelang/params.py)."""

    name: str
    value: Expr


@dataclass(frozen=True)
class Param:
    name: str
    default: Expr | None
    rest: bool
    span: Span


@dataclass(frozen=True)
class FnDef(Stmt):
    name: str
    params: tuple[Param, ...]
    body: tuple[Assign, ...]
    result: Expr


@dataclass(frozen=True)
class Module:
    source: Source
    statements: tuple[Stmt, ...]
