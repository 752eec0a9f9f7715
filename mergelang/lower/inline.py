"""What lets an inlined call be reused: whether a function's result can depend on where
it is called, and the key of one call's arguments.

Functions are inlined, so `fn e(x) = d(x) + d(x)` evaluates d's body twice and a chain
of such functions doubles per level. Two calls of one function with equal arguments
give equal results, and are made once, unless the body draws random numbers or takes
a reduction: those are keyed by their call site (DESIGN.md: randomness is a pure
function of seed, tensor name and call site), so such a function's calls stay apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import ast
from ..ir import Node
from ..ops import PRIMITIVES

if TYPE_CHECKING:
    from ..resolve import Scope


def children(expr: ast.Expr) -> list[ast.Expr]:
    """An expression's direct sub-expressions (keyword values included)."""
    if isinstance(expr, ast.Unary):
        return [expr.operand]
    if isinstance(expr, ast.Binary):
        return [expr.left, expr.right]
    if isinstance(expr, ast.Cond):
        return [expr.test, expr.then, expr.orelse]
    if isinstance(expr, ast.ListExpr):
        return list(expr.items)
    if isinstance(expr, ast.Call):
        return [*expr.args, *(kw.value for kw in expr.kwargs)]
    if isinstance(expr, (ast.Index, ast.Slice, ast.Attr)):
        parts = [expr.value, getattr(expr, "index", None), getattr(expr, "start", None),
                 getattr(expr, "stop", None)]
        return [p for p in parts if p is not None]
    return []


def depth(expr: ast.Expr) -> int:
    """How deeply an expression nests (a leaf is 1), without recursing."""
    deepest, stack = 0, [(expr, 1)]
    while stack:
        e, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children(e))
    return deepest


class CallSites:
    """Which functions' results depend on their call site, decided once per function."""

    def __init__(self) -> None:
        self._keyed: dict[tuple[int, int], bool] = {}

    def keyed(self, fn: ast.FnDef, scope: Scope) -> bool:
        """Whether a call of fn reaches a random or reducing primitive (through the
        functions it calls, as its scope resolves them)."""
        start = (id(fn), id(scope))
        if start in self._keyed:
            return self._keyed[start]
        seen = {start}
        todo = [(fn, scope)]
        found = False
        while todo and not found:
            f, s = todo.pop()
            exprs = [stmt.value for stmt in f.body] + [f.result]
            exprs += [p.default for p in f.params if p.default is not None]
            while exprs and not found:
                e = exprs.pop()
                exprs.extend(children(e))
                if not (isinstance(e, ast.Call) and isinstance(e.func, ast.Name)):
                    continue
                inner = s.lookup_function(e.func.id)
                if inner is not None:
                    key = (id(inner[0]), id(inner[1]))
                    if self._keyed.get(key):
                        found = True
                    elif key not in seen and key not in self._keyed:
                        seen.add(key)
                        todo.append(inner)
                elif e.func.id in PRIMITIVES and PRIMITIVES[e.func.id].takes_chunk:
                    found = True
        for key in seen if not found else (start,):  # a search that found none clears all
            self._keyed[key] = found
        return found


def value_key(value: Any) -> Any:
    """A hash key for a compile-time value that keeps 1, 1.0 and True apart; nodes are
    interned, so a node is its own key."""
    if isinstance(value, tuple):
        return ("list", tuple(value_key(v) for v in value))
    if isinstance(value, Node):
        return value
    if isinstance(value, float):
        return ("float", repr(value))  # keeps 0.0 and -0.0 apart
    return (type(value).__name__, value)
