"""Syntax tree -> source text: the inverse of `syntax.parse`, shared by `mergelang convert`
and `mergelang fmt`.

`parse(unparse(tree))` is `tree` again (spans aside), and the text is laid out one way
whatever the input looked like, so unparsing is idempotent. Parentheses are written only
where the precedence of LANGUAGE.md §3 needs them, plus around an `if` that is the test or
the `then` branch of another `if` (legal without, but hard to read).

Layout: a line that would pass `width` columns is broken inside brackets, one item per
line aligned after the opening bracket (lists of plain literals and parameter lists are
filled instead: as many items a line as fit), and an `if ... else` is broken before each
`else`, aligned under its `if`. A statement whose whole value is an `else if` chain is
always broken so, one branch a line. An operand that does not fit even so starts a new
line after its operator, under the first operand, if it fits there. These are places where a newline
continues a statement (syntax.py), so the text parses back. A line can still pass `width`
where no bracket is left to break (a long name or string).

The tree keeps no comments or blank lines. Who has them (the formatter reading a script,
the converter writing one) passes them as `Trivia`, keyed by the statement they go with.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from . import ast
from .diagnostics import error

WIDTH = 100
INDENT = "    "


@dataclass(frozen=True)
class Trivia:
    """The lines around a statement that the syntax tree does not keep.

    `above`: the lines written before the statement, each a comment (its text, starting
    with `#`) or "" for a blank line. `after`: a comment at the end of the statement's last
    line. Trailing comments of neighbouring one-line statements (no line between them) are
    aligned to one column.
    """

    above: tuple[str, ...] = ()
    after: str | None = None


# A statement, or the `result` of a block function (its `return` line), -> its trivia.
# Keys compare by value, spans included: the parser and the converter give each statement
# its own span.
TriviaMap = Mapping[ast.Stmt | ast.Expr, Trivia]


def unparse(node: ast.Module | ast.Stmt | ast.Expr, trivia: TriviaMap | None = None,
            end: Iterable[str] = (), width: int = WIDTH) -> str:
    """The source text of a module (ending in a newline, `end` being the lines after its
    last statement), of one statement or of one expression (no final newline)."""
    printer = _Printer(trivia or {}, width)
    try:
        if isinstance(node, ast.Module):
            lines = printer.block(node.statements, "") + [_checked(line) for line in end]
            return "".join(line + "\n" for line in lines)
        if isinstance(node, ast.Stmt):
            return "\n".join(printer.block((node,), ""))
        return printer.render(_doc(node), 0, 0)
    except RecursionError:  # the layout recurses over the tree: name the statement
        for stmt in node.statements if isinstance(node, ast.Module) else ():
            unparse(stmt, width=width)  # the one too deep raises, located
        raise error("this expression nests too deeply to lay out", node.span,
                    hint="name the inner parts (x = ...)") from None


def number_text(value: int | float) -> str:
    """A number as the grammar spells it (a negative one as the `-` operator would)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value} cannot be written as a mergelang number")
    return re.sub(r"e([+-])0+(?=\d)", r"e\1", repr(value))  # 1e-05 as 1e-5


def string_text(value: str) -> str:
    """A string literal that `syntax.parse` reads back as `value`."""
    out = []
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _checked(line: str) -> str:
    if "\n" in line or (line and not line.startswith("#")):
        raise ValueError(f"not a comment line: {line!r}")
    return line


# --------------------------------------------------------------------------------------
# precedence: the tree -> a document of fixed text and breakable groups

# lowest first, as in LANGUAGE.md §3
_COND, _OR, _AND, _NOT, _COMPARE, _FALLBACK, _SUM, _PRODUCT, _NEG, _POSTFIX, _ATOM = range(11)
_BINARY = {"or": _OR, "and": _AND, "|": _FALLBACK, "+": _SUM, "-": _SUM, "*": _PRODUCT,
           "/": _PRODUCT, **dict.fromkeys(("==", "!=", "<", "<=", ">", ">=", "~"), _COMPARE)}


def _level(e: ast.Expr) -> int:
    if isinstance(e, ast.Cond):
        return _COND
    if isinstance(e, ast.Binary):
        return _BINARY[e.op]
    if isinstance(e, ast.Unary):
        return _NOT if e.op == ast.NOT else _NEG
    if isinstance(e, ast.Call | ast.Index | ast.Slice | ast.Attr):
        return _POSTFIX
    if isinstance(e, ast.Number) and number_text(e.value).startswith("-"):
        return _NEG
    return _ATOM


@dataclass(eq=False)
class _Doc:
    """Text to lay out: fixed `parts` (strings and other docs) in a row, or, with `items`,
    a bracketed comma-separated group that may break one item per line."""

    parts: tuple = ()
    items: tuple[_Doc, ...] | None = None
    open: str = ""
    close: str = ""
    fill: bool = False
    flat: str = field(init=False)

    def __post_init__(self) -> None:
        if self.items is None:
            self.flat = "".join(p if isinstance(p, str) else p.flat for p in self.parts)
        else:
            self.flat = self.open + ", ".join(i.flat for i in self.items) + self.close


@dataclass(eq=False)
class _Chain(_Doc):
    """`if t1 then v1 else if t2 then v2 ... else v`: broken before each `else`."""

    branches: tuple[tuple[_Doc, _Doc], ...] = ()
    orelse: _Doc | None = None
    always: bool = False  # broken even when it fits

    def __post_init__(self) -> None:
        assert self.orelse is not None
        self.flat = "".join(f"if {t.flat} then {v.flat} else " for t, v in self.branches) + \
            self.orelse.flat


@dataclass(eq=False)
class _Ops(_Doc):
    """`a + b - c`: operators of one level; a line may break after an operator."""

    operands: tuple[_Doc, ...] = ()
    ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.flat = self.operands[0].flat + "".join(
            f" {op} {d.flat}" for op, d in zip(self.ops, self.operands[1:], strict=True))


def _row(*parts) -> _Doc:
    return _Doc(parts)


def _group(open_: str, items: Iterable[_Doc], close: str, fill: bool = False) -> _Doc:
    return _Doc(items=tuple(items), open=open_, close=close, fill=fill)


def _operand(e: ast.Expr, least: int) -> _Doc:
    """`e` as an operand that must bind at least as tightly as `least`."""
    doc = _doc(e)
    return _row("(", doc, ")") if _level(e) < least else doc


def _doc(e: ast.Expr, statement: bool = False) -> _Doc:
    """`statement`: `e` is a statement's whole value (an `else if` chain is then broken)."""
    if isinstance(e, ast.Cond):
        branches = []
        while isinstance(e, ast.Cond):
            branches.append((_operand(e.test, _OR), _operand(e.then, _OR)))
            e = e.orelse
        return _Chain(branches=tuple(branches), orelse=_doc(e),
                      always=statement and len(branches) > 1)
    if isinstance(e, ast.Binary):
        level = _BINARY[e.op]
        if level == _COMPARE:  # not associative
            return _Ops(operands=(_operand(e.left, level + 1), _operand(e.right, level + 1)),
                        ops=(e.op,))
        operands, ops = [_operand(e.right, level + 1)], [e.op]
        e = e.left
        while isinstance(e, ast.Binary) and _BINARY[e.op] == level:
            operands.append(_operand(e.right, level + 1))
            ops.append(e.op)
            e = e.left
        operands.append(_operand(e, level))
        return _Ops(operands=tuple(reversed(operands)), ops=tuple(reversed(ops)))
    if isinstance(e, ast.Unary):
        if e.op == ast.NOT:
            return _row("not ", _operand(e.operand, _NOT))
        operand = _operand(e.operand, _NEG)
        return _row("- " if operand.flat.startswith("-") else "-", operand)
    if isinstance(e, ast.Call):
        items = [*map(_doc, e.args), *(_keyword(k.name, k.value) for k in e.kwargs)]
        return _row(_operand(e.func, _POSTFIX), _group("(", items, ")"))
    if isinstance(e, ast.Index):
        return _row(_operand(e.value, _POSTFIX), "[", _doc(e.index), "]")
    if isinstance(e, ast.Slice):
        bounds = [_doc(b) if b is not None else "" for b in (e.start, e.stop)]
        return _row(_operand(e.value, _POSTFIX), "[", bounds[0], ":", bounds[1], "]")
    if isinstance(e, ast.Attr):
        # `1.x` would read as the number `1.` and a name
        value = _operand(e.value, _ATOM + 1 if isinstance(e.value, ast.Number) else _POSTFIX)
        return _row(value, "." + e.name)
    if isinstance(e, ast.ListExpr):
        return _group("[", map(_doc, e.items), "]", fill=all(map(_is_literal, e.items)))
    return _row(_atom(e))


def _is_literal(e: ast.Expr) -> bool:
    """A plain value, as in `[0.1, -0.5, "x", none]`: a list of them is filled."""
    if isinstance(e, ast.Unary) and e.op == ast.NEGATE:
        e = e.operand
    return isinstance(e, ast.Number | ast.String | ast.Bool | ast.NoneLit | ast.Name)


def _atom(e: ast.Expr) -> str:
    if isinstance(e, ast.Number):
        return number_text(e.value)
    if isinstance(e, ast.String):
        return string_text(e.value)
    if isinstance(e, ast.Bool):
        return "true" if e.value else "false"
    if isinstance(e, ast.NoneLit):
        return "none"
    if isinstance(e, ast.Name):
        return e.id
    raise TypeError(f"cannot unparse {type(e).__name__}")


def _keyword(name: str, value: ast.Expr) -> _Doc:
    return _row(f"{name}=", _doc(value))


def _param(p: ast.Param) -> _Doc:
    if p.rest:
        return _row("*" + p.name)
    return _keyword(p.name, p.default) if p.default is not None else _row(p.name)


# --------------------------------------------------------------------------------------
# layout: a document -> lines no wider than `width` where brackets allow


class _Printer:
    def __init__(self, trivia: TriviaMap, width: int):
        self.trivia = trivia
        self.width = width

    def render(self, doc: _Doc, col: int, tail: int) -> str:
        """`doc` starting at column `col`, followed on its last line by `tail` columns."""
        always = isinstance(doc, _Chain) and doc.always
        if not always and col + len(doc.flat) + tail <= self.width:
            return doc.flat
        if isinstance(doc, _Chain):
            return self._chain(doc, col, tail)
        if isinstance(doc, _Ops):
            return self._ops(doc, col, tail)
        if doc.items is not None:
            return self._items(doc, col, tail)
        out = ""
        for i, part in enumerate(doc.parts):
            if isinstance(part, str):
                out += part
                continue
            follow = 0
            for after in doc.parts[i + 1:]:
                if not isinstance(after, str):
                    break
                follow += len(after)
            else:
                follow += tail
            out += self.render(part, _column(out, col), follow)
        return out

    def _chain(self, doc: _Chain, col: int, tail: int) -> str:
        pad = "\n" + " " * col
        out = ""
        for i, (test, then) in enumerate(doc.branches):
            out += ("if " if i == 0 else pad + "else if ")
            out += self.render(test, _column(out, col), len(" then "))
            out += " then "
            out += self.render(then, _column(out, col), 0)
        out += pad + "else "
        return out + self.render(doc.orelse, _column(out, col), tail)

    def _ops(self, doc: _Ops, col: int, tail: int) -> str:
        """Each operand on the line so far if it fits there (broken inside its brackets if
        need be), else on a new line under the first operand if it fits there and the line
        it leaves fits too: breaking a line that is too long anyway only makes a staircase."""
        last = len(doc.ops) - 1
        out = self.render(doc.operands[0], col, len(doc.ops[0]) + 1)
        for i, (op, operand) in enumerate(zip(doc.ops, doc.operands[1:], strict=True)):
            room = tail if i == last else len(doc.ops[i + 1]) + 1
            here = _column(out, col) + len(op) + 2
            text = self.render(operand, here, room)
            below = self.render(operand, col, room)
            if (self._fits(text, here, room) or not self._fits(below, col, room)
                    or here - 1 > self.width):   # the line is too long already
                out += f" {op} {text}"
            else:
                out += f" {op}\n{' ' * col}{below}"
        return out

    def _fits(self, text: str, col: int, tail: int) -> bool:
        lines = text.split("\n")
        return (col + len(lines[0]) <= self.width
                and all(len(line) <= self.width for line in lines[1:])
                and _column(text, col) + tail <= self.width)

    def _items(self, doc: _Doc, col: int, tail: int) -> str:
        inner = col + len(doc.open)
        pad = " " * inner
        last = len(doc.items) - 1
        if not doc.fill:
            texts = [self.render(item, inner, len(doc.close) + tail if i == last else 1)
                     for i, item in enumerate(doc.items)]
            return doc.open + f",\n{pad}".join(texts) + doc.close
        out = doc.open
        for i, item in enumerate(doc.items):
            room = len(doc.close) + tail if i == last else 1
            if i > 0:
                fits = _column(out, col) + 1 + len(item.flat) + room <= self.width
                out += " " if fits else "\n" + pad
            out += self.render(item, _column(out, col), room) + ("," if i < last else "")
        return out + doc.close

    # statements

    def statement(self, s: ast.Stmt, indent: str) -> str:
        col = len(indent)
        if isinstance(s, ast.Assign):
            head = f"{s.name} = "
            return head + self.render(_doc(s.value, True), col + len(head), 0)
        if isinstance(s, ast.Set | ast.ParamDecl):
            head = f"set {s.key} = " if isinstance(s, ast.Set) else f"param {s.name} = "
            return head + self.render(_doc(s.value, True), col + len(head), 0)
        if isinstance(s, ast.Output):
            return "output " + self.render(_doc(s.value, True), col + 7, 0)
        if isinstance(s, ast.Import):
            return "import " + string_text(s.path)
        if isinstance(s, ast.FnDef):
            params = _group("(", map(_param, s.params), ")", fill=True)
            if not s.body and s.result not in self.trivia:
                return self.render(_row(f"fn {s.name}", params, " = ", _doc(s.result, True)),
                                   col, 0)
            head = self.render(_row(f"fn {s.name}", params, " {"), col, 0)
            body = self.block((*s.body, s.result), indent + INDENT)
            return "\n".join([head, *body, indent + "}"])
        raise TypeError(f"cannot unparse {type(s).__name__}")

    def block(self, statements: Iterable[ast.Stmt | ast.Expr], indent: str) -> list[str]:
        """Statements at `indent` (an expression is a `return` line), with their trivia."""
        out: list[str] = []
        run: list[tuple[int, str | None]] = []  # one-line statements: index in out, comment

        def align() -> None:
            if any(comment for _, comment in run):
                width = max(len(out[i]) for i, _ in run)
                for i, comment in run:
                    if comment:
                        out[i] = f"{out[i]:<{width}}  {comment}"
            run.clear()

        for s in statements:
            trivia = self.trivia.get(s, Trivia())
            if trivia.above:
                align()
                out.extend(indent + line if line else "" for line in map(_checked, trivia.above))
            if isinstance(s, ast.Expr):
                text = "return " + self.render(_doc(s, True), len(indent) + 7, 0)
            else:
                text = self.statement(s, indent)
            lines = [indent + line if i == 0 else line
                     for i, line in enumerate(text.split("\n"))]
            after = _checked(trivia.after) if trivia.after else None
            if len(lines) == 1:
                run.append((len(out), after))
                out.append(lines[0])
            else:
                align()
                out.extend(lines)
                if after:
                    out[-1] += "  " + after
        align()
        return out


def _column(text: str, start: int) -> int:
    """The column after `text` when it starts at column `start`."""
    newline = text.rfind("\n")
    return start + len(text) if newline < 0 else len(text) - newline - 1
