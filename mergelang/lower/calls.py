"""Calls that lowering evaluates itself: primitives (their arguments checked against the
declaration, mapped over lists) and the built-ins (`model`, `sum`, `stack`, ...), which
act on compile-time values: `model` opens nothing, it names a model; `sum` unrolls a
list into additions."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import ast
from ..diagnostics import MergeError, Span, error, in_stdlib
from ..extraction.form import elsewhere as extract_lora_elsewhere
from ..io.delta import KIND as DELTA
from ..io.lora import KIND as LORA
from ..io.sources import MODEL, source_key, split_key
from ..ir import SCALAR, TENSOR, Node, Op
from ..ops import REQUIRED, Param, Primitive
from .values import ModelRef, Value, broadcast2, describe, is_number, is_sliced, is_tensor

if TYPE_CHECKING:
    from .evaluate import Frame, Lowerer


def primitive(lo: Lowerer, prim: Primitive, node: ast.Call, args: list, kwargs: dict,
              frame: Frame) -> Value:
    """A primitive call as an IR node, or a tuple of them when a list is given where the
    first parameter takes one tensor."""
    exprs: dict[str, ast.Expr] = {}
    values: dict[str, Value] = {}
    for param, value, expr in zip(prim.params, args, node.args, strict=False):
        values[param.name], exprs[param.name] = value, expr
    for kw in node.kwargs:
        values[kw.name], exprs[kw.name] = kwargs[kw.name], kw.value
    for param in prim.params:
        values.setdefault(param.name, param.default)
    first = prim.params[0]
    if not (prim.maps and first.kind == "tensor" and isinstance(values[first.name], tuple)):
        return _primitive_node(lo, prim, values, exprs, node, frame, "")
    items = values[first.name]
    calls = []
    for i, item in enumerate(items):
        one = dict(values)
        one[first.name] = item
        for p in prim.params[1:]:
            if isinstance(values[p.name], tuple) and p.kind != "tensors":
                if len(values[p.name]) != len(items):
                    raise error(f"{p.name} has {len(values[p.name])} values but "
                                f"{first.name} has {len(items)}",
                                lo.user_span(exprs.get(p.name), node, frame),
                                hint="give one value per element, or one value for all")
                one[p.name] = values[p.name][i]
        calls.append(_primitive_node(lo, prim, one, exprs, node, frame, f"#{i}"))
    return tuple(calls)


def _primitive_node(lo: Lowerer, prim: Primitive, values: dict, exprs: dict, node: ast.Call,
                    frame: Frame, suffix: str) -> Node:
    args = []
    for param in prim.params:
        where = lo.user_span(exprs.get(param.name), node, frame)
        args.append(_argument(lo, prim, param, values[param.name], where, frame))
    # random draws and reductions that may span the model are keyed by the call site
    keyed = prim.random or prim.reduction is not None
    site = lo.call_site(node, frame) + suffix if keyed else None
    return lo.b.make(Op.PRIM, tuple(args), (prim.name, site), TENSOR, node.span)


def _argument(lo: Lowerer, prim: Primitive, param: Param, value: Value, where: Span,
              frame: Frame) -> Node:
    """One argument checked against its declaration, as a node."""
    def bad(what: str, hint: str | None = None) -> MergeError:
        caller = user_facing_call(frame) or prim.name
        return error(f"{caller}(): {param.name} {what}, not {describe(value)}", where, hint=hint)
    if value is REQUIRED:
        raise bad("is required")
    if param.kind == "tensor":
        if not is_tensor(value):
            raise bad("must be a tensor (a model expression)")
        return value
    if param.kind == "tensors":
        if not (isinstance(value, tuple) and value and all(is_tensor(v) for v in value)):
            raise bad("must be a non-empty list of tensors")
        return lo.b.make(Op.LIST, value, None, TENSOR)
    if param.kind == "number":
        if isinstance(value, Node) and value.kind == SCALAR:
            lo_, hi = param.range or (None, None)
            return lo.b.make(Op.CHECK_RANGE, (value,), (param.name, lo_, hi), SCALAR, where)
        if not is_number(value):
            raise bad("must be a number")
        if param.range and not param.range[0] <= value <= param.range[1]:
            lo_, hi = param.range
            raise bad(f"must be in [{lo_:g}, {hi:g}]",
                      hint=f"{param.name}={min(max(value, lo_), hi):g} is the nearest value")
        return lo.b.const(float(value))
    if param.kind == "string":
        if not isinstance(value, str) or (param.choices and value not in param.choices):
            choices = ", ".join(f'"{c}"' for c in param.choices or ())
            raise bad(f"must be one of {choices}")
        return lo.b.const(value)
    raise AssertionError(param.kind)


def user_facing_call(frame: Frame) -> str | None:
    """The function the user called that led to this frame (e.g. `ties` for a `trim`)."""
    name = None
    f: Frame | None = frame
    while f is not None:
        if f.call is not None and not in_stdlib(f.call.span):
            name = f.fn.name
        f = f.parent
    return name


# built-ins: (lowerer, call, frame, *argument values) -> value


def input_builtin(kind: str, example: str) -> Callable[..., Value]:
    """The built-in that names an input of `kind` (io/sources.py): `model("x")`,
    `lora("x")`, ... The path is relative to the script's folder. `base=` (only `lora`
    declares it) names the plain model the input is measured against: its key goes
    into the input's key."""
    def named(lo: Lowerer, node: ast.Call, frame: Frame, path: Value,
              base: Value = None) -> Value:
        if not isinstance(path, str):
            raise error(f"{kind}() takes a path string, not {describe(path)}",
                        node.args[0].span, hint=f'e.g. {kind}("{example}")')
        source_path = node.span.source.path
        folder = source_path.parent if source_path is not None else Path.cwd()
        options = {"base": _base_key(lo, node, frame, kind, base)} if base is not None else None
        key = source_key(kind, _model_key(folder / path), options)
        lo.models.setdefault(key, ModelRef(path, node.args[0].span))
        return lo.b.make(Op.MODEL, (), key, TENSOR, node.span)
    return named


def _base_key(lo: Lowerer, node: ast.Call, frame: Frame, kind: str, base: Value) -> str:
    """The key of the plain model `base=` names; anything else is a located error."""
    if isinstance(base, Node) and base.op is Op.MODEL and split_key(base.attr)[0] == MODEL:
        return base.attr
    if isinstance(base, Node) and base.op is Op.MODEL:
        what = f"{split_key(base.attr)[0]}(...), which is itself a change to a model"
    elif is_tensor(base):
        what = "a tensor computed from models"
    else:
        what = describe(base)
    expr = next(kw.value for kw in node.kwargs if kw.name == "base")
    example = f'model("{base}")' if isinstance(base, str) else "b, where b = model(\"b\")"
    raise error(f"{kind}(): base must be a model(...) of the script, not {what}",
                lo.user_span(expr, node, frame),
                hint=f"name the one model the adapter was trained on: base={example}")


def _model_key(path: Path) -> str:
    """A model's identity: its resolved path. A path that cannot be resolved (a loop of
    symbolic links) keeps its absolute spelling; bind reports why it cannot be opened."""
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):
        return os.path.abspath(path)


def _sum(lo: Lowerer, node: ast.Call, frame: Frame, xs: Value) -> Value:
    if not isinstance(xs, tuple) or not xs:
        raise error(f"sum() takes a non-empty list, not {describe(xs)}",
                    lo.user_span(node.args[0], node, frame))
    total = xs[0]
    for x in xs[1:]:
        total = broadcast2(total, x, node, lambda a, b: lo.arithmetic("+", a, b, node.span))
    return total


def _broadcast(lo: Lowerer, node: ast.Call, frame: Frame, x: Value, like: Value) -> Value:
    if not isinstance(like, tuple):
        raise error(f"broadcast(): `like` must be a list, not {describe(like)}",
                    lo.user_span(node.args[1], node, frame))
    if not isinstance(x, tuple):
        return (x,) * len(like)
    if len(x) != len(like):
        xname, likename = (f"`{e.id}`" if isinstance(e, ast.Name) else "the list"
                           for e in node.args[:2])
        raise error(f"{xname} has {len(x)} values but there are {len(like)} {likename}",
                    lo.user_span(node.args[0], node, frame),
                    hint=f"give one value per element of {likename}, or a single value")
    return x


def _len(lo: Lowerer, node: ast.Call, frame: Frame, xs: Value) -> Value:
    if not isinstance(xs, tuple):
        raise error(f"len() takes a list, not {describe(xs)}",
                    lo.user_span(node.args[0], node, frame))
    return len(xs)


def _stack(lo: Lowerer, node: ast.Call, frame: Frame, *slices: Value) -> Value:
    for value, expr in zip(slices, node.args, strict=True):
        if not (is_tensor(value) and is_sliced(value)):
            raise error(f"stack() takes layer slices such as a.layers[0:8], not "
                        f"{describe(value) if not is_tensor(value) else 'a whole model'}",
                        lo.user_span(expr, node, frame),
                        hint="slice every model you stack: a.layers[0:24]")
    return lo.b.make(Op.STACK, tuple(slices), None, TENSOR, node.span)


def _gradient(lo: Lowerer, node: ast.Call, frame: Frame, values: Value) -> Value:
    if not (isinstance(values, tuple) and values and all(is_number(v) for v in values)):
        raise error(f"gradient() takes a list of numbers, not {describe(values)}",
                    lo.user_span(node.args[0], node, frame), hint="e.g. gradient([0, 0.5, 1])")
    depth = lo.b.make(Op.CTX, (), "depth", SCALAR)
    return lo.b.make(Op.GRADIENT, (depth,), tuple(float(v) for v in values), SCALAR, node.span)


BUILTINS: dict[str, Callable[..., Value]] = {
    "model": input_builtin("model", "models/base"), "sum": _sum, "broadcast": _broadcast,
    LORA: input_builtin(LORA, "adapters/math"),
    DELTA: input_builtin(DELTA, "math.delta"),
    "len": _len, "stack": _stack, "gradient": _gradient, "extract_lora": extract_lora_elsewhere,
}
