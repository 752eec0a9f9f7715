"""Specialise: the program for one output tensor, with every per-tensor fact known.

The per-tensor names (`name`, `layer`, `depth`, ...) and the caller's parameters become
constants, so conditions, `|` fallbacks, layer slices and gradients fold away: a branch
not taken loads nothing. What remains is a small DAG of loads, constants and tensor
operations. Each operation of the source phase has one entry in `SPECIALISE`; the
scalar ones are computed by `SCALAR_EVAL`.

An entry that needs an argument's value is a generator: it yields `(node, lookup)` and
is sent the value, and `Specialiser.spec` runs them on a stack of its own, so an
expression thousands of operations deep (a sum of 400 models) needs no Python recursion.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Callable
from types import GeneratorType
from typing import Any

from . import matching
from .bind import Bound, TensorContext, is_before_layers, layer_of, with_layer
from .diagnostics import Diagnostic, Span, error
from .ir import SCALAR, TENSOR, Node, Op, nodes_of


class Missing:
    """The value of a model expression for a name the model does not have."""

    def __init__(self, models: frozenset[str]):
        self.models = models


class Specialiser:
    """Specialises nodes for one output tensor at a time, collecting the errors that
    name tensors (missing names) so that each is reported once."""

    def __init__(self, bound: Bound, params: dict[str, Any] | None = None):
        self.bound = bound
        self.b = bound.lowered.builder
        self.params = params or {}
        # (span, model display) -> names missing there, for one error per place
        self.missing: dict[tuple[Span | None, str, str], list[str]] = defaultdict(list)
        self.reported: set[str] = set()  # tensors with an error already: one error each

    def tensor(self, root: Node, ctx: TensorContext) -> Node | None:
        """The specialised expression for ctx's tensor, or None if a model lacks it."""
        value = self.value(root, ctx)
        return None if isinstance(value, Missing) else value

    def value(self, node: Node, ctx: TensorContext) -> Any:
        """Any node's value for ctx's tensor: a Python value for a scalar, a node for a
        tensor, or Missing."""
        return self.spec(node, ctx, {}, ctx.name)

    def spec(self, node: Node, ctx: TensorContext, memo: dict, lookup: str) -> Any:
        """Specialise `node` for the output tensor `ctx`; models are read at the tensor
        name `lookup` (the output's name, unless a layer slice renumbers it)."""
        key = (node, lookup)
        if key in memo:
            return memo[key]
        # Each entry: [node, lookup, generator or None, the key it waits for]. An
        # operation that needs all its arguments (most) has no generator: it is done
        # once they are in memo; the lazy ones (if, |, slices) are generators.
        stack: list[list] = []
        failed: Exception | None = self._push(stack, node, lookup, ctx, memo)
        while stack:
            entry = stack[-1]
            here, at, gen, waiting = entry
            if gen is None:  # an operation on all its arguments
                if failed is not None:
                    stack.pop()
                    if not stack:
                        raise failed
                    continue
                todo = next((a for a in here.args if (a, at) not in memo), None)
                if todo is not None:
                    failed = self._push(stack, todo, at, ctx, memo)
                    continue
                try:
                    memo[(here, at)] = _computed_value(
                        self, here, [memo[(a, at)] for a in here.args], ctx)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    failed = exc
                    continue
                stack.pop()
                continue
            try:
                if failed is not None:
                    exc, failed = failed, None
                    request = gen.throw(exc)  # into the caller, as recursion would
                else:
                    request = gen.send(memo[waiting] if waiting is not None else None)
            except StopIteration as done:
                stack.pop()
                memo[(here, at)] = done.value
                continue
            except Exception as exc:  # noqa: BLE001 - handed to the caller below
                stack.pop()
                if not stack:
                    raise
                failed = exc
                continue
            entry[3] = (request[0], request[1])
            if entry[3] not in memo:
                failed = self._push(stack, request[0], request[1], ctx, memo)
        return memo[key]

    def _push(self, stack: list[list], node: Node, lookup: str, ctx: TensorContext,
              memo: dict) -> Exception | None:
        """Start on `node`: done at once (a leaf), or an entry on the stack; the error
        its start raised, if any."""
        if node.op in _ON_ARGUMENTS:
            stack.append([node, lookup, None, None])
            return None
        try:
            result = SPECIALISE[node.op](self, node, ctx, memo, lookup)
        except Exception as exc:  # noqa: BLE001 - thrown into the entry that asked
            return exc
        if isinstance(result, GeneratorType):
            stack.append([node, lookup, result, None])
        else:
            memo[(node, lookup)] = result
        return None

    def missing_errors(self) -> list[Diagnostic]:
        errors = []
        for (span, here, there), names in self.missing.items():
            shown = ", ".join(f'"{n}"' for n in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            errors.append(Diagnostic(
                f"the models here have different tensors: {shown}{more} "
                f"{'is' if len(names) == 1 else 'are'} in {here} but not in {there}", span,
                hint="use `a | b` to take b's tensor where a has none, or merge models of "
                     "the same architecture"))
        return errors

    def slice_length(self, node: Node) -> int:
        """The number of layers a sliced expression has (lower checked it is sliced);
        worked out on a stack of its own, arguments first."""
        lengths: dict[Node, int] = {}
        stack = [node]
        while stack:
            here = stack[-1]
            if here in lengths:
                stack.pop()
                continue
            if here.op is Op.LAYERS:
                start, stop = here.attr
                if stop is None:
                    stop = min(self.bound.models[n.attr].num_layers
                               for n in nodes_of(here, Op.MODEL))
                lengths[stack.pop()] = stop - start
                continue
            parts = here.args if here.op is Op.STACK else \
                [a for a in here.args if a.kind == TENSOR]
            todo = [a for a in parts if a not in lengths]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            if here.op is Op.STACK:
                lengths[here] = sum(lengths[a] for a in parts)
                continue
            found = {lengths[a] for a in parts}
            if len(found) != 1:
                raise error(f"these layer slices have different lengths: {sorted(found)}",
                            here.span, hint="combine slices with the same number of layers")
            lengths[here] = found.pop()
        return lengths[node]

    def record_missing(self, node: Node, missing: list[Missing], present: list[Node],
                       name: str) -> None:
        have = next(n for p in present for n in nodes_of(p, Op.LOAD))
        lacking = sorted(k for m in missing for k in m.models)[0]
        here = self.bound.models[have.attr[0]].display
        there = self.bound.models[lacking].display
        if name not in self.reported:  # at the innermost operation only, not at each above it
            self.reported.add(name)
            self.missing[(node.span, here, there)].append(name)


# one entry per operation of the source phase: (specialiser, node, ctx, memo, lookup)


def _const(s: Specialiser, node: Node, ctx, memo, lookup) -> Any:
    return node.attr


def _ctx(s: Specialiser, node: Node, ctx: TensorContext, memo, lookup) -> Any:
    return getattr(ctx, node.attr)


def _param(s: Specialiser, node: Node, ctx, memo, lookup) -> Any:
    return s.params[node.attr]


def _model(s: Specialiser, node: Node, ctx, memo, lookup: str) -> Any:
    model = s.bound.models[node.attr]
    if lookup not in model.source.tensors:
        return Missing(frozenset([node.attr]))
    return s.b.make(Op.LOAD, (), (node.attr, lookup), TENSOR, node.span)


def _cond(s: Specialiser, node: Node, ctx: TensorContext, memo, lookup) -> Any:
    test = yield node.args[0], lookup
    if not isinstance(test, bool):
        raise error(f'an `if` condition must be true or false; for "{ctx.name}" it is '
                    f"{test!r}", node.args[0].span or node.span)
    return (yield node.args[1] if test else node.args[2], lookup)


def _fallback(s: Specialiser, node: Node, ctx, memo, lookup) -> Any:
    first = yield node.args[0], lookup
    return (yield node.args[1], lookup) if isinstance(first, Missing) else first


def _layers(s: Specialiser, node: Node, ctx, memo, lookup: str) -> Any:
    """Layer r of `x.layers[start:stop]` is layer start + r of x; tensors outside the
    layers (embeddings, head) pass through."""
    layer = layer_of(lookup)
    if layer is None:
        return (yield node.args[0], lookup)
    if layer >= s.slice_length(node):
        return Missing(frozenset())
    return (yield node.args[0], with_layer(lookup, node.attr[0] + layer))


def _stack(s: Specialiser, node: Node, ctx, memo, lookup: str) -> Any:
    """Layer l of a stack is layer l - (layers before it) of the slice holding it;
    embeddings come from the first slice, everything else outside the layers from
    the last."""
    layer = layer_of(lookup)
    if layer is None:
        part = node.args[0] if is_before_layers(lookup) else node.args[-1]
        return (yield part, lookup)
    for part in node.args:
        length = s.slice_length(part)
        if layer < length:
            return (yield part, with_layer(lookup, layer))
        layer -= length
    return Missing(frozenset())


def _computed(s: Specialiser, node: Node, ctx: TensorContext, memo, lookup) -> Any:
    """(Specialiser.spec runs these itself, without a generator: see _ON_ARGUMENTS.)"""
    args = []
    for a in node.args:
        args.append((yield a, lookup))
    return _computed_value(s, node, args, ctx)


def _computed_value(s: Specialiser, node: Node, args: list, ctx: TensorContext) -> Any:
    if node.kind == SCALAR:
        return _scalar(node, args, ctx)
    return _tensor_op(s, node, args, ctx)


def _tensor_op(s: Specialiser, node: Node, args: list, ctx: TensorContext) -> Any:
    flat = [a for a in args if isinstance(a, Missing)]
    if flat:
        present = [a for a in args if isinstance(a, Node) and a.kind == TENSOR]
        if present:
            s.record_missing(node, flat, present, ctx.name)
        return Missing(frozenset().union(*(m.models for m in flat)))
    if node.op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG):
        for a in args:
            if not isinstance(a, (Node, int, float)) or isinstance(a, bool):
                raise error(f'cannot use {a!r} in tensor arithmetic (for "{ctx.name}")',
                            node.span, hint="`layer` is none outside the repeated blocks; "
                            "test `layer == none` first")
        if node.op is Op.MUL and _is_one(args[0]):
            return args[1]
        if node.op in (Op.MUL, Op.DIV) and _is_one(args[1]):
            return args[0]
    # a constant argument is its own node again (as interning would give it, but cheaper)
    nodes = tuple(a if isinstance(a, Node) else src if src.op is Op.CONST and src.attr is a
                  else s.b.const(a) for a, src in zip(args, node.args, strict=True))
    if nodes == node.args:
        return node
    return s.b.make(node.op, nodes, node.attr, node.kind, node.span)


def _scalar(node: Node, args: list, ctx: TensorContext) -> Any:
    """A per-tensor scalar operation, now that the context is known."""
    try:
        return SCALAR_EVAL[node.op](node, args, ctx)
    except (TypeError, ZeroDivisionError):
        raise error(f'cannot compute this for "{ctx.name}": operands {args!r}', node.span,
                    hint="`layer` is none outside the repeated blocks; test "
                         "`layer == none` first") from None


SPECIALISE: dict[Op, Callable[..., Any]] = {
    Op.CONST: _const, Op.CTX: _ctx, Op.PARAM: _param, Op.MODEL: _model, Op.COND: _cond,
    Op.FALLBACK: _fallback, Op.LAYERS: _layers, Op.STACK: _stack,
    **{op: _computed for op in (Op.LIST, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.NOT,
                                Op.AND, Op.OR, Op.MATCH, Op.COMPARE, Op.GRADIENT,
                                Op.CHECK_RANGE, Op.PRIM)},
}
_ON_ARGUMENTS = frozenset(op for op, entry in SPECIALISE.items() if entry is _computed)


# scalar evaluation: (node, argument values, ctx) -> value


def _check_range(node: Node, args: list, ctx: TensorContext) -> float:
    param, lo, hi = node.attr
    value = args[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f'{param} must be a number; for "{ctx.name}" it is {value!r}', node.span)
    if lo is not None and not lo <= value <= hi:
        raise error(f'{param} must be in [{lo:g}, {hi:g}]; for "{ctx.name}" it is {value:g}',
                    node.span)
    return float(value)


def _truth(value: Any, node: Node, ctx: TensorContext) -> bool:
    if not isinstance(value, bool):
        raise error(f'expected true or false; for "{ctx.name}" got {value!r}', node.span)
    return value


def _compare(node: Node, args: list, ctx) -> bool:
    """Comparisons; an ordering with `none` (e.g. `layer < 8` on the embeddings) is false."""
    compare, (a, b) = _COMPARISONS[node.attr], args
    if node.attr not in ("==", "!=") and (a is None or b is None):
        return False
    return compare(a, b)


_COMPARISONS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
                ">": operator.gt, ">=": operator.ge}


def interpolate(values: tuple[float, ...], depth: float) -> float:
    """Piecewise-linear interpolation of `values` spread evenly over depth in [0, 1]."""
    if len(values) == 1:
        return values[0]
    scaled = min(max(depth, 0.0), 1.0) * (len(values) - 1)
    i = min(int(scaled), len(values) - 2)
    frac = scaled - i
    return values[i] * (1 - frac) + values[i + 1] * frac


SCALAR_EVAL: dict[Op, Callable[[Node, list, TensorContext], Any]] = {
    Op.ADD: lambda n, a, c: a[0] + a[1],
    Op.SUB: lambda n, a, c: a[0] - a[1],
    Op.MUL: lambda n, a, c: a[0] * a[1],
    Op.DIV: lambda n, a, c: a[0] / a[1],
    Op.NEG: lambda n, a, c: -a[0],
    Op.NOT: lambda n, a, c: not _truth(a[0], n, c),
    Op.AND: lambda n, a, c: _truth(a[0], n, c) and _truth(a[1], n, c),
    Op.OR: lambda n, a, c: _truth(a[0], n, c) or _truth(a[1], n, c),
    Op.MATCH: lambda n, a, c: isinstance(a[0], str) and matching.search(a[1], a[0], n.span),
    Op.COMPARE: _compare,
    Op.GRADIENT: lambda n, a, c: interpolate(n.attr, a[0]),
    Op.CHECK_RANGE: _check_range,
}


def _is_one(value: Any) -> bool:
    """A specialised scalar equal to 1 (x * 1 and x / 1 are x, bit for bit)."""
    if isinstance(value, Node):
        value = value.attr if value.op is Op.CONST else None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1
