"""Compile-time values and the small rules for combining them.

During lowering a value is a Python number, bool, string, none, a tuple (a list of
the language) or an IR node (a tensor, or a per-tensor scalar known only at plan
time). Lists broadcast element by element.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..diagnostics import Span, error
from ..ir import TENSOR, Node, Op
from ..ops import REQUIRED

Value = Any  # int | float | bool | str | None | tuple[Value, ...] | Node


@dataclass(frozen=True)
class ModelRef:
    """A model as the script names it: the path as written, and where."""

    written: str
    span: Span


def is_number(v: Value) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_tensor(v: Value) -> bool:
    return isinstance(v, Node) and v.kind == TENSOR


def is_sliced(node: Node) -> bool:
    """Every model in this tensor expression is seen through a layer slice. (On a stack
    of its own: a sum of 1,500 slices is as deep.)"""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen or n.op in (Op.LAYERS, Op.STACK):
            continue
        seen.add(n)
        tensors = [a for a in n.args if a.kind == TENSOR]
        if not tensors or n.op is Op.MODEL:
            return False
        stack.extend(tensors)
    return True


def map1(value: Value, fn: Callable[[Value], Value]) -> Value:
    if isinstance(value, tuple):
        return tuple(map1(v, fn) for v in value)
    return fn(value)


def broadcast2(a: Value, b: Value, node, fn: Callable[[Value, Value], Value],
               same_length: bool = False) -> Value:
    """Apply fn elementwise over lists: list-list pairs up, list-value repeats the value."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b):
            raise error(f"lists of different lengths: {len(a)} and {len(b)}", node.span,
                        hint="give lists with one entry per model")
        return tuple(broadcast2(x, y, node, fn, same_length) for x, y in zip(a, b, strict=True))
    if same_length and (isinstance(a, tuple) or isinstance(b, tuple)):
        raise error("one branch of this `if` is a list and the other is not", node.span)
    if isinstance(a, tuple):
        return tuple(broadcast2(x, b, node, fn) for x in a)
    if isinstance(b, tuple):
        return tuple(broadcast2(a, y, node, fn) for y in b)
    return fn(a, b)


def describe(v: Value) -> str:
    """A value as an error message names it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'the string "{v}"'
    if is_number(v):
        return f"the number {v:g}" if isinstance(v, float) else f"the number {v}"
    if isinstance(v, tuple):
        return f"a list of {len(v)}"
    if isinstance(v, Node):
        return "a tensor" if v.kind == TENSOR else "a per-tensor value"
    if v is REQUIRED:
        return "missing"
    return type(v).__name__
