"""Plan: specialise the program for every output tensor and lay it out as one graph.

For each tensor name, the per-tensor names (`name`, `layer`, `depth`, ...) become
constants, so conditions, `|` fallbacks and gradients fold away: a branch not taken
loads nothing. What remains per tensor is a small DAG of loads and tensor operations
whose shapes are known from the headers. All of them go into one `networkx.DiGraph`
(tensor nodes and an `("output", name)` sink per tensor), which `execute` walks.

Errors found here still come before any tensor is read: models whose tensor names
differ, shapes that differ, a per-tensor parameter out of range.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from . import ir
from .bind import Bound, TensorContext, is_before_layers, layer_of, with_layer
from .diagnostics import Diagnostic, MergeError, Span, error
from .ir import SCALAR, TENSOR, Node

if TYPE_CHECKING:
    import networkx as nx

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class _Missing:
    """The value of a model expression for a name the model does not have."""

    def __init__(self, models: frozenset[str]):
        self.models = models


@dataclass
class TensorPlan:
    name: str
    root: Node                     # specialised expression: loads, constants, tensor ops
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    copy_only: bool                # a non-float tensor copied when all inputs agree

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.out_dtype)


@dataclass
class Plan:
    bound: Bound
    tensors: list[TensorPlan]
    compute_dtype: torch.dtype
    seed: int
    num_layers: int = 0  # of the output model (a stack changes it)
    warnings: list[Diagnostic] = field(default_factory=list)

    @cached_property
    def graph(self) -> nx.DiGraph:
        """The plan as one networkx.DiGraph (made when first asked for)."""
        return build_graph(self.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(self.bound.models[n.attr[0]].source.tensors[n.attr[1]].nbytes
                   for t in self.tensors for n in ir.walk(t.root) if n.op == "load")


def plan(bound: Bound) -> Plan:
    """Specialise per tensor, check names and shapes, build the graph. Raises MergeError."""
    lowered = bound.lowered
    compute = _DTYPES[lowered.dtype]
    out_dtype = _DTYPES[lowered.out_dtype] if lowered.out_dtype else None
    planner = _Planner(bound)
    num_layers = planner.output_layers(lowered.output)
    tensors = []
    for name in bound.names(num_layers):
        root = planner.specialise_tensor(lowered.output, bound.context(name, num_layers))
        if root is None:
            continue
        tensors.append(planner.finish(name, root, out_dtype))
    planner.raise_errors()
    if not tensors:
        raise error("the output has no tensors: no tensor name is in every model it uses",
                    lowered.output.span if lowered.output is not None else None)
    return Plan(bound, tensors, compute, lowered.seed, num_layers)


def build_graph(tensors: list[TensorPlan]) -> nx.DiGraph:
    """One DiGraph for the whole merge. Constants are attributes of their users, not nodes.
    (networkx is imported here: a merge itself runs from the kernels, and the import
    costs 0.1 s of every run's start-up.)"""
    import networkx as nx

    graph = nx.DiGraph()
    for t in tensors:
        for node in ir.walk(t.root):
            if node.op == "const":
                continue
            graph.add_node(node, op=node.op, label=node.label, tensor=t.name)
            for arg in node.args:
                if arg.op != "const":
                    graph.add_edge(arg, node)
        sink = ("output", t.name)
        graph.add_node(sink, op="output", label=f"write {t.name}", tensor=t.name,
                       shape=t.shape, dtype=str(t.out_dtype).removeprefix("torch."))
        graph.add_edge(t.root, sink)
    return graph


class _Planner:
    def __init__(self, bound: Bound):
        self.bound = bound
        # (span, model display) -> names missing there, for one error per place
        self.missing: dict[tuple[Span | None, str, str], list[str]] = defaultdict(list)
        self.errors: list[Diagnostic] = []
        self.reported: set[str] = set()  # tensors with an error already: one error each

    def specialise_tensor(self, root: Node, ctx: TensorContext) -> Node | None:
        value = self._spec(root, ctx, {}, ctx.name)
        return None if isinstance(value, _Missing) else value

    def value_for(self, node: Node, ctx: TensorContext) -> Any:
        """A per-tensor value (e.g. `depth`, a gradient) for one output tensor."""
        return self._spec(node, ctx, {}, ctx.name)

    def output_layers(self, root: Node) -> int:
        """The output's number of layers: a stack's total, else the donor's. Checks every
        layer slice against its models first."""
        for node in ir.walk(root):
            if node.op == "layers":
                self._check_slice(node)
        stacks = [n for n in ir.walk(root) if n.op == "stack"]
        totals = {sum(self._slice_length(s) for s in n.args) for n in stacks}
        if len(totals) > 1:
            raise error(f"the stacks in this output have different numbers of layers: "
                        f"{sorted(totals)}", root.span, hint="stack the same layer count")
        if totals:
            return totals.pop()
        return self.bound.donor.num_layers if self.bound.donor is not None else 0

    def _check_slice(self, node: Node) -> None:
        start, stop = node.attr
        for leaf in (n for n in ir.walk(node) if n.op == "model"):
            model = self.bound.models[leaf.attr]
            if model.num_layers == 0:
                raise error(f"{model.display} has no layers that mergelang can find", node.span,
                            hint="layers are found from names like model.layers.N. and "
                                 "config.json's num_hidden_layers")
            if (stop if stop is not None else start + 1) > model.num_layers:
                raise error(f"layers {start}:{stop if stop is not None else start + 1} are "
                            f"beyond the {model.num_layers} layers of {model.display}",
                            node.span, hint=f"use layers between 0 and {model.num_layers}")

    def _slice_length(self, node: Node) -> int:
        """The number of layers a sliced expression has (lower checked it is sliced)."""
        if node.op == "layers":
            start, stop = node.attr
            if stop is None:
                stop = min(self.bound.models[n.attr].num_layers
                           for n in ir.walk(node) if n.op == "model")
            return stop - start
        if node.op == "stack":
            return sum(self._slice_length(a) for a in node.args)
        lengths = {self._slice_length(a) for a in node.args if a.kind == TENSOR}
        if len(lengths) != 1:
            raise error(f"these layer slices have different lengths: {sorted(lengths)}",
                        node.span, hint="combine slices with the same number of layers")
        return lengths.pop()

    def raise_errors(self) -> None:
        for (span, here, there), names in self.missing.items():
            shown = ", ".join(f'"{n}"' for n in names[:3])
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            self.errors.append(Diagnostic(
                f"the models here have different tensors: {shown}{more} "
                f"{'is' if len(names) == 1 else 'are'} in {here} but not in {there}", span,
                hint="use `a | b` to take b's tensor where a has none, or merge models of "
                     "the same architecture"))
        if self.errors:
            raise MergeError(self.errors)

    # specialisation: returns a Python value for scalars, a Node for tensors, or _Missing

    def _spec(self, node: Node, ctx: TensorContext, memo: dict, lookup: str) -> Any:
        """Specialise `node` for the output tensor `ctx`; models are read at the tensor
        name `lookup` (the output's name, unless a layer slice renumbers it)."""
        key = (node, lookup)
        if key not in memo:
            memo[key] = self._spec_uncached(node, ctx, memo, lookup)
        return memo[key]

    def _spec_uncached(self, node: Node, ctx: TensorContext, memo: dict, lookup: str) -> Any:
        op = node.op
        if op == "const":
            return node.attr
        if op == "ctx":
            return getattr(ctx, node.attr)
        if op == "model":
            model = self.bound.models[node.attr]
            if lookup not in model.source.tensors:
                return _Missing(frozenset([node.attr]))
            return Node.make("load", (), (node.attr, lookup), TENSOR, node.span)
        if op == "cond":
            test = self._spec(node.args[0], ctx, memo, lookup)
            if not isinstance(test, bool):
                raise error(f"an `if` condition must be true or false; for "
                            f'"{ctx.name}" it is {test!r}', node.args[0].span or node.span)
            return self._spec(node.args[1] if test else node.args[2], ctx, memo, lookup)
        if op == "fallback":
            first = self._spec(node.args[0], ctx, memo, lookup)
            return (self._spec(node.args[1], ctx, memo, lookup)
                    if isinstance(first, _Missing) else first)
        if op == "layers":
            return self._spec_slice(node, ctx, memo, lookup)
        if op == "stack":
            return self._spec_stack(node, ctx, memo, lookup)
        args = [self._spec(a, ctx, memo, lookup) for a in node.args]
        if node.kind == SCALAR:
            return _scalar(node, args, ctx)
        return self._tensor_op(node, args, ctx)

    def _spec_slice(self, node: Node, ctx: TensorContext, memo: dict, lookup: str) -> Any:
        """Layer r of `x.layers[start:stop]` is layer start + r of x; tensors outside the
        layers (embeddings, head) pass through."""
        layer = layer_of(lookup)
        if layer is None:
            return self._spec(node.args[0], ctx, memo, lookup)
        start = node.attr[0]
        if layer >= self._slice_length(node):
            return _Missing(frozenset())
        return self._spec(node.args[0], ctx, memo, with_layer(lookup, start + layer))

    def _spec_stack(self, node: Node, ctx: TensorContext, memo: dict, lookup: str) -> Any:
        """Layer l of a stack is layer l - (layers before it) of the slice holding it;
        embeddings come from the first slice, everything else outside the layers from
        the last."""
        layer = layer_of(lookup)
        if layer is None:
            part = node.args[0] if is_before_layers(lookup) else node.args[-1]
            return self._spec(part, ctx, memo, lookup)
        for part in node.args:
            length = self._slice_length(part)
            if layer < length:
                return self._spec(part, ctx, memo, with_layer(lookup, layer))
            layer -= length
        return _Missing(frozenset())

    def _tensor_op(self, node: Node, args: list, ctx: TensorContext) -> Any:
        flat = [a for a in args if isinstance(a, _Missing)]
        if flat:
            present = [a for a in args if isinstance(a, Node) and a.kind == TENSOR]
            if present:
                self._record_missing(node, flat, present, ctx.name)
            return _Missing(frozenset().union(*(m.models for m in flat)))
        for a in args if node.op in ("+", "-", "*", "/", "neg") else ():
            if not isinstance(a, (Node, int, float)) or isinstance(a, bool):
                raise error(f'cannot use {a!r} in tensor arithmetic (for "{ctx.name}")',
                            node.span, hint="`layer` is none outside the repeated blocks; "
                            "test `layer == none` first")
        if node.op == "*" and _is_one(args[0]):
            return args[1]
        if node.op in ("*", "/") and _is_one(args[1]):
            return args[0]
        return Node.make(node.op, tuple(_as_node(a) for a in args), node.attr, node.kind, node.span)

    def _record_missing(self, node: Node, missing: list[_Missing], present: list[Node],
                        name: str) -> None:
        have = next(n for p in present for n in ir.walk(p) if n.op == "load")
        lacking = sorted(k for m in missing for k in m.models)[0]
        here = self.bound.models[have.attr[0]].display
        there = self.bound.models[lacking].display
        if name not in self.reported:  # at the innermost operation only, not at each above it
            self.reported.add(name)
            self.missing[(node.span, here, there)].append(name)

    # after specialisation

    def finish(self, name: str, root: Node, out_dtype: torch.dtype | None) -> TensorPlan:
        loads = [n for n in ir.walk(root) if n.op == "load"]
        infos = {n: self.bound.models[n.attr[0]].source.tensors[n.attr[1]] for n in loads}
        shapes: dict[Node, tuple[int, ...]] = {}
        for node in ir.walk(root):
            if node.op == "load":
                shapes[node] = infos[node].shape
            elif node.kind == TENSOR:
                shapes[node] = self._shape(node, shapes, name)
        floats = [n for n in loads if infos[n].dtype.is_floating_point]
        copy_only = len(floats) < len(loads)
        if copy_only and floats:
            mixed = ", ".join(f"{self.bound.models[n.attr[0]].display}: "
                              f"{str(infos[n].dtype).removeprefix('torch.')}" for n in loads)
            self.errors.append(Diagnostic(
                f'tensor "{name}" is a float tensor in some models and not in others ({mixed})',
                root.span))
        if copy_only:
            root = Node.make("copy_agreeing", tuple(loads), None, TENSOR, root.span)
            shapes[root] = infos[loads[0]].shape
        dtype = out_dtype or self._donor_dtype(name, loads, infos)
        if copy_only:
            dtype = infos[loads[0]].dtype
        return TensorPlan(name, root, shapes[root], dtype, copy_only)

    def _donor_dtype(self, name: str, loads: list[Node], infos: dict) -> torch.dtype:
        donor = self.bound.donor
        if donor is not None and name in donor.source.tensors:
            return donor.source.tensors[name].dtype
        return infos[loads[0]].dtype

    def _shape(self, node: Node, shapes: dict, name: str) -> tuple[int, ...]:
        tensors = [a for a in node.args if a.kind == TENSOR]
        if node.op == "list":
            tensors = list(node.args)
        elif node.op == "prim":
            tensors = [t for a in tensors for t in (a.args if a.op == "list" else (a,))]
        first = tensors[0]
        for other in tensors[1:]:
            if shapes[other] != shapes[first] and name not in self.reported:
                self.reported.add(name)
                a, b = _a_load(first), _a_load(other)
                self.errors.append(Diagnostic(
                    f'tensor "{name}" has shape {list(shapes[first])} in '
                    f"{self._where(a)} but {list(shapes[other])} in {self._where(b)}",
                    node.span, hint="these models have different architectures; merge "
                    "models with the same shapes, or exclude this tensor with `if name ~ ...`"))
                break
        return shapes[first]

    def _where(self, load: Node | None) -> str:
        return self.bound.models[load.attr[0]].display if load is not None else "a computed value"


def _a_load(node: Node) -> Node | None:
    return next((n for n in ir.walk(node) if n.op == "load"), None)


def _scalar(node: Node, args: list, ctx: TensorContext) -> Any:
    """Evaluate a per-tensor scalar operation now that the context is known."""
    op = node.op
    try:
        if op == "gradient":
            return _interpolate(node.attr, args[0])
        if op == "check_range":
            param, lo, hi = node.attr
            value = args[0]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise error(f'{param} must be a number; for "{ctx.name}" it is {value!r}',
                            node.span)
            if lo is not None and not lo <= value <= hi:
                raise error(f'{param} must be in [{lo:g}, {hi:g}]; for "{ctx.name}" it is '
                            f"{value:g}", node.span)
            return float(value)
        if op == "match":
            return isinstance(args[0], str) and re.search(args[1], args[0]) is not None
        if op == "compare":
            return _compare(node.attr, args[0], args[1])
        if op == "not":
            return not _truth(args[0], node, ctx)
        if op == "and":
            return _truth(args[0], node, ctx) and _truth(args[1], node, ctx)
        if op == "or":
            return _truth(args[0], node, ctx) or _truth(args[1], node, ctx)
        if op == "neg":
            return -args[0]
        a, b = args
        return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a / b
    except (TypeError, ZeroDivisionError):
        raise error(f'cannot compute this for "{ctx.name}": operands {args!r}', node.span,
                    hint="`layer` is none outside the repeated blocks; test "
                         "`layer == none` first") from None


def _truth(value: Any, node: Node, ctx: TensorContext) -> bool:
    if not isinstance(value, bool):
        raise error(f'expected true or false; for "{ctx.name}" got {value!r}', node.span)
    return value


def _compare(op: str, a: Any, b: Any) -> bool:
    """Comparisons; an ordering with `none` (e.g. `layer < 8` on the embeddings) is false."""
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if a is None or b is None:
        return False
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _interpolate(values: tuple[float, ...], depth: float) -> float:
    """Piecewise-linear interpolation of `values` spread evenly over depth in [0, 1]."""
    if len(values) == 1:
        return values[0]
    scaled = min(max(depth, 0.0), 1.0) * (len(values) - 1)
    i = min(int(scaled), len(values) - 2)
    frac = scaled - i
    return values[i] * (1 - frac) + values[i + 1] * frac


def _is_one(value: Any) -> bool:
    """A specialised scalar equal to 1 (x * 1 and x / 1 are x, bit for bit)."""
    if isinstance(value, Node):
        value = value.attr if value.op == "const" else None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 1


def _as_node(value: Any) -> Node:
    return value if isinstance(value, Node) else ir.const(value)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
