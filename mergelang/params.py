"""Script parameters: `param density = 0.2` declares a tunable with its default; `-D
density=0.3` on the command line (or `params={"density": 0.3}` in Python) replaces it.

A parameter is an ordinary compile-time constant once its value is chosen: lowering binds
the name to the override or the default, so `weights=[0.6, 0.4]` folds like any list and
every check of a value (a density in [0, 1], a dtype) fires where the value is used. What
this module adds is the part before that: reading values with the language's own literal
syntax (never Python's `eval`), checking that each override names a declared parameter and
has the default's kind, and writing values back as source text (the script a sweep keeps).

Values given on the command line are located in a `Source` of their own, the `-D` text, so
a mistake in one is shown with a caret like a mistake in a script.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Union

from . import ast
from .diagnostics import Diagnostic, MergeError, Source, Span, did_you_mean, error

Value = Union[int, float, str, bool, None, tuple["Value", ...]]  # noqa: UP007 (a recursive alias)
"""A parameter's value: what a literal evaluates to (lists are tuples, as in lowering)."""

COMMAND_LINE = "<command line>"
"""The name `-D` values are reported under."""

MAX_RANGE_POINTS = 10_000
_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_LITERAL_HINT = "e.g. param density = 0.2, or a list such as param weights = [0.6, 0.4]"


class ParamError(MergeError):
    """An override that does not fit the script: an unknown name, or a value of the wrong
    kind (an error about the override itself, not about where its value is used)."""


@dataclass(frozen=True)
class Override:
    """A value for one parameter from outside the script, and where it was written (the
    spans point into the `-D` text; None when it came from Python)."""

    name: str
    value: Value
    name_span: Span | None = None
    value_span: Span | None = None


@dataclass(frozen=True)
class Axis:
    """One parameter's values in a sweep (`-D NAME=VALUES`): one value, a list or a range;
    `spans[i]` is where `values[i]` was written."""

    name: str
    values: tuple[Value, ...]
    name_span: Span | None = None
    spans: tuple[Span | None, ...] = ()

    def override(self, i: int) -> Override:
        span = self.spans[i] if i < len(self.spans) else None
        return Override(self.name, self.values[i], self.name_span, span)


# literals in scripts


def literal(expr: ast.Expr, bare_names: bool = False) -> Value:
    """The value of a literal: a number (with an optional `-`), a string, true, false,
    none, or a list of literals. With `bare_names` a name reads as a string (on the
    command line, where the shell has eaten the quotes: `-D method=count`)."""
    if isinstance(expr, (ast.Number, ast.String, ast.Bool)):
        return expr.value
    if isinstance(expr, ast.NoneLit):
        return None
    negated = isinstance(expr, ast.Unary) and expr.op == ast.NEGATE
    if negated and isinstance(expr.operand, ast.Number):
        return -expr.operand.value
    if isinstance(expr, ast.ListExpr):
        return tuple(literal(item, bare_names) for item in expr.items)
    if bare_names and isinstance(expr, ast.Name):
        return expr.id
    raise error("a parameter's value must be a literal (a number, a string, true, false, "
                "none or a list of them), not an expression", expr.span, hint=_LITERAL_HINT)


def check_declaration(stmt: ast.ParamDecl) -> None:
    """Resolve's check of `param NAME = literal`: the default is a literal."""
    literal(stmt.value)


def declared(scope_bindings: Mapping[str, ast.Stmt]) -> dict[str, ast.ParamDecl]:
    """The parameters among a script's bindings, in the order they were declared."""
    return {n: s for n, s in scope_bindings.items() if isinstance(s, ast.ParamDecl)}


# values from outside


def overrides_of(params: Mapping[str, object] | Iterable[Override] | None) -> list[Override]:
    """Overrides from what an API caller gives: a mapping of names to Python values (or to
    `Override`s, which keep their place on the command line), or `Override`s."""
    if params is None:
        return []
    if not isinstance(params, Mapping):
        return list(params)
    out = []
    for name, value in params.items():
        if isinstance(value, Override):
            out.append(value)
        else:
            out.append(Override(str(name), from_python(value, f'parameter "{name}"')))
    return out


def from_python(value: object, what: str) -> Value:
    """A Python value as a parameter value (lists become tuples); anything that is not a
    literal's value is a MergeError."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise error(f"{what}: {value} is not a number a script can hold")
        return value
    if isinstance(value, (list, tuple)):
        return tuple(from_python(v, what) for v in value)
    raise error(f"{what}: a {type(value).__name__} is not a parameter value",
                hint="use a number, a string, True/False, None or a list of them")


def bind(bindings: Mapping[str, ast.Stmt], overrides: Iterable[Override]) -> dict[str, Value]:
    """Every declared parameter's value (`bindings`: the script's, parameters among them):
    its override, else its default. An override of an undeclared name, one given twice, or
    one of another kind than the default is a MergeError at the override (at the
    declaration when it came from Python)."""
    params = declared(bindings)
    values = {name: literal(stmt.value) for name, stmt in params.items()}
    seen: dict[str, Override] = {}
    for o in overrides:
        if o.name not in params:
            raise _unknown(o, bindings)
        if o.name in seen:
            first = seen[o.name].name_span
            raise ParamError(Diagnostic(
                f'parameter "{o.name}" is given twice', o.name_span,
                hint="give each parameter one value",
                notes=(f"first given at {first}",) if first is not None else ()))
        seen[o.name] = o
        _check_kind(o, params[o.name], values[o.name])
        values[o.name] = o.value
    return values


def _unknown(o: Override, bindings: Mapping[str, ast.Stmt]) -> MergeError:
    params = declared(bindings)
    listed = ", ".join(params)
    suggestion = did_you_mean(o.name, params)
    if o.name in bindings:
        hint = f'"{o.name}" is an ordinary binding; declare it with `param {o.name} = ...` ' \
               "to set it from outside the script"
    elif suggestion:
        hint = suggestion
    elif params:
        hint = f"the script's parameters are {listed}"
    else:
        hint = "the script declares no parameters; add one, e.g. `param density = 0.2`"
    notes = [f"the script's parameters are {listed}"] if suggestion and o.name not in bindings \
        else []
    return ParamError(Diagnostic(f'unknown parameter "{o.name}"', o.name_span, hint,
                                 tuple(notes)))


def kind(value: Value) -> str:
    """The kind of value an override must match, in words (`a number`, `a list`, ...)."""
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, tuple):
        return "a list"
    return "none"


def _check_kind(o: Override, stmt: ast.ParamDecl, default: Value) -> None:
    """An override has its default's kind; a number and a list stand for each other
    (a scalar weight broadcasts like a list of weights), and a default of none takes any."""
    want, got = kind(default), kind(o.value)
    if want == got or default is None or {want, got} == {"a number", "a list"}:
        return
    raise ParamError(Diagnostic(
        f'parameter "{o.name}" is {want} (its default is {text(default)}), not '
        f"{describe(o.value)}", o.value_span or stmt.value.span,
        hint=f"e.g. -D {o.name}={text(default)}",
        notes=(f'"{o.name}" is declared at {stmt.span}',)))


def describe(value: Value) -> str:
    """A value in words, for messages: `the number 1.5`, `the string "x"`, `true`."""
    if isinstance(value, bool) or value is None:
        return text(value)
    return f"the {kind(value).removeprefix('a ')} {text(value)}"


def text(value: Value) -> str:
    """A value as source text that the parser reads back as the same value."""
    from .unparse import number_text, string_text

    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float)):
        return number_text(value) if value >= 0 else "-" + number_text(-value)
    if isinstance(value, str):
        return string_text(value)
    return "[" + ", ".join(text(v) for v in value) + "]"


def to_json(value: Value) -> object:
    """A value as JSON holds it (tuples as lists)."""
    return [to_json(v) for v in value] if isinstance(value, tuple) else value


def from_json(value: object) -> Value:
    """A value read back from JSON (lists as tuples, as lowering holds them)."""
    return tuple(from_json(v) for v in value) if isinstance(value, list) else value


@contextlib.contextmanager
def with_overrides_noted(overrides: Iterable[Override]) -> Iterator[None]:
    """An error raised inside, at a place in the script, gets a note naming the overrides:
    a density of 1.5 is wrong where it is used, but it was written after `-D`."""
    try:
        yield
    except ParamError:
        raise
    except MergeError as exc:
        given = list(overrides)
        first = exc.diagnostics[0] if exc.diagnostics else None
        if not given or first is None or (first.span and first.span.file == COMMAND_LINE):
            raise
        note = "with parameters set from outside the script: " + ", ".join(
            f"{o.name}={text(o.value)}" for o in given)
        first = dataclasses.replace(first, notes=(*first.notes, note))
        raise MergeError([first, *exc.diagnostics[1:]]) from None


# the command line


def parse_defines(texts: Iterable[str]) -> dict[str, Override]:
    """`-D NAME=VALUE` options, each one value. A name given twice is an error."""
    out: dict[str, Override] = {}
    for t in texts:
        o = parse_define(t)
        if o.name in out:
            raise error(f'parameter "{o.name}" is given twice', o.name_span,
                        hint="give each parameter one -D",
                        notes=[f"first given as -D {out[o.name].name}="
                               f"{text(out[o.name].value)}"])
        out[o.name] = o
    return out


def parse_define(option: str) -> Override:
    """One `-D NAME=VALUE`: VALUE in the language's literal syntax (a bare word is a
    string, since the shell removes quotes)."""
    source, name, name_span, value_text, start = _split(option)
    if _top_level_colons(value_text):
        raise error("a range start:stop:step is for `mergelang sweep`; -D here takes one value",
                    _span(source, start, start + len(value_text)),
                    hint=f"e.g. -D {name}=0.3")
    return Override(name, _value(source, value_text, start), name_span,
                    _span(source, start, start + len(value_text)))


def parse_axis(option: str) -> Axis:
    """One sweep `-D NAME=VALUES`: a range `start:stop:step` (stop included when
    reached), a list `[a, b, c]` (each item one point), or one value."""
    source, name, name_span, value_text, start = _split(option)
    if _top_level_colons(value_text):
        values = _range(source, value_text, start)
        return Axis(name, values, name_span, (_span(source, start, start + len(value_text)),)
                    * len(values))
    expr = _parse_value(source, value_text, start)
    if isinstance(expr, ast.ListExpr):
        if not expr.items:
            raise error(f'-D {name}=[] gives no values to try', expr.span,
                        hint=f"e.g. -D {name}=[0.2, 0.5] or -D {name}=0.1:0.9:0.2")
        return Axis(name, tuple(literal(i, True) for i in expr.items), name_span,
                    tuple(i.span for i in expr.items))
    return Axis(name, (literal(expr, True),), name_span, (expr.span,))


def _split(option: str) -> tuple[Source, str, Span, str, int]:
    """The `-D` text as a source; the name, its span, the value text and its column."""
    source = Source(COMMAND_LINE, f"-D {option}\n")
    name, eq, value_text = option.partition("=")
    if "\n" in option or not eq:
        raise error(f'-D needs NAME=VALUE, not "{option}"', _span(source, 4, 4 + len(option)),
                    hint="e.g. -D density=0.3")
    name_span = _span(source, 4, 4 + len(name))
    if not _NAME.fullmatch(name.strip()):
        raise error(f'"{name}" is not a parameter name', name_span,
                    hint="a name such as density or lambda, then =VALUE")
    if not value_text.strip():
        raise error(f"-D {name}= has no value", _span(source, 4, 5 + len(name)),
                    hint=f"e.g. -D {name}=0.3")
    return source, name.strip(), name_span, value_text, 5 + len(name)


def _span(source: Source, start: int, end: int) -> Span:
    return Span(source, 1, start, 1, max(end, start + 1))


def _value(source: Source, value_text: str, start: int) -> Value:
    return literal(_parse_value(source, value_text, start), bare_names=True)


def _parse_value(source: Source, value_text: str, start: int) -> ast.Expr:
    """The value's syntax tree, its spans placed in the `-D` text."""
    from .syntax import parse_expression

    try:
        module = parse_expression(" " * (start - 1) + value_text, COMMAND_LINE)
    except MergeError as exc:
        raise _moved(exc, source) from None
    expr = module.statements[0].value  # type: ignore[attr-defined]
    try:
        literal(expr, bare_names=True)
    except MergeError as exc:
        raise _moved(exc, source) from None
    return _retarget(expr, source)


def _moved(exc: MergeError, source: Source) -> MergeError:
    """The error's spans shown on the `-D` text rather than on the padded value."""
    return MergeError([dataclasses.replace(d, span=dataclasses.replace(d.span, source=source))
                       if d.span is not None else d for d in exc.diagnostics])


def _retarget(expr: ast.Expr, source: Source) -> ast.Expr:
    span = dataclasses.replace(expr.span, source=source)
    if isinstance(expr, ast.ListExpr):
        return ast.ListExpr(span, tuple(_retarget(i, source) for i in expr.items))
    return dataclasses.replace(expr, span=span)


def _top_level_colons(value_text: str) -> bool:
    depth, quoted = 0, False
    for i, ch in enumerate(value_text):
        if quoted:
            quoted = not (ch == '"' and value_text[i - 1] != "\\")
        elif ch == '"':
            quoted = True
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == ":" and depth == 0:
            return True
    return False


def _range(source: Source, value_text: str, start: int) -> tuple[Value, ...]:
    """`start:stop:step`: start, start + step, ... up to stop, stop included when a step
    lands on it (to 1e-9 of a step, so 0.1:0.9:0.2 ends at 0.9 despite rounding)."""
    parts, bounds, col = value_text.split(":"), [], start
    whole = _span(source, start, start + len(value_text))
    if len(parts) != 3:
        raise error(f'a range is start:stop:step, not "{value_text}"', whole,
                    hint="e.g. 0.1:0.9:0.2 (0.1, 0.3, 0.5, 0.7, 0.9)")
    for part in parts:
        if not part.strip():
            raise error("a range needs start, stop and step", whole,
                        hint="e.g. 0.1:0.9:0.2 (0.1, 0.3, 0.5, 0.7, 0.9)")
        value = _value(source, part, col)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise error(f"a range's bounds and step are numbers, not {describe(value)}",
                        _span(source, col, col + len(part)), hint="e.g. 0.1:0.9:0.2")
        bounds.append(value)
        col += len(part) + 1
    first, stop, step = bounds
    if step <= 0:
        raise error(f"a range's step must be positive, not {text(step)}",
                    _span(source, col - len(parts[2]) - 1, col - 1), hint="e.g. 0.1:0.9:0.2")
    if stop < first:
        raise error(f"the range {value_text} is empty: stop is below start", whole,
                    hint="write start:stop:step with start <= stop")
    count = math.floor((stop - first) / step + 1e-9) + 1
    if count > MAX_RANGE_POINTS:
        raise error(f"the range {value_text} has {count} values; at most "
                    f"{MAX_RANGE_POINTS} are allowed", whole, hint="use a larger step")
    if all(isinstance(b, int) for b in bounds):
        return tuple(first + i * step for i in range(count))
    return tuple(_tidy(first + i * step) for i in range(count))


def _tidy(x: float) -> float:
    """0.30000000000000004 -> 0.3: a range's values as the user would write them."""
    return float(f"{x:.12g}")


__all__ = ["Axis", "Override", "ParamError", "Value", "bind", "check_declaration", "declared",
           "describe", "from_json", "literal", "overrides_of", "parse_axis", "parse_define",
           "parse_defines", "text", "to_json", "with_overrides_noted"]
