"""Plan: specialise the program for every output tensor, check it, lay it out as a graph.

For each tensor name `specialise` folds the per-tensor names away; what remains per
tensor is a small DAG of loads and tensor operations whose shapes are known from the
headers. Every check that needs the models but no tensor data is made here, so `check`,
`graph`, `plan` and `run` agree: models whose tensor names differ, shapes that differ,
a per-tensor parameter out of range, a whole-model reduction fed by another reduction.
All the tensors go into one `networkx.DiGraph` when it is asked for.

A `Plan` holds the models open (file maps); close it, or use it in a `with`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .bind import Bound
from .builtins import COMPUTE_DTYPES
from .diagnostics import Diagnostic, MergeError, error
from .ir import SHAPE_RULES, TENSOR, Node, Op, nodes_of, static_args, tensor_args, walk
from .ops import PRIMITIVES
from .specialise import Specialiser

if TYPE_CHECKING:
    import networkx as nx


@dataclass
class TensorPlan:
    name: str
    root: Node                     # specialised expression: loads, constants, tensor ops
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    copy_only: bool                # a non-float tensor copied when all inputs agree

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.out_dtype.itemsize

    @cached_property
    def nodes(self) -> tuple[Node, ...]:
        """Every node of `root`, arguments first (walked once: plan, schedule and the
        summary all need it)."""
        return tuple(walk(self.root))

    @cached_property
    def loads(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.op is Op.LOAD)


@dataclass
class Plan:
    bound: Bound
    tensors: list[TensorPlan]
    compute_dtype: torch.dtype
    seed: int
    num_layers: int = 0  # of the output model (a stack changes it)
    warnings: list[Diagnostic] = field(default_factory=list)

    def __enter__(self) -> Plan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the models' files (a plan of in-memory models holds nothing)."""
        self.bound.close()

    def only(self, names: Iterable[str]) -> Plan:
        """The same plan restricted to some output tensors (sharing the open models)."""
        wanted = set(names)
        return dataclasses.replace(self, tensors=[t for t in self.tensors if t.name in wanted])

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
                   for t in self.tensors for n in t.loads)


def plan(bound: Bound, params: dict[str, Any] | None = None,
         names: Iterable[str] | None = None) -> Plan:
    """Specialise per tensor, check names, shapes and reductions. Raises MergeError.

    `params` gives the values of the program's `param` nodes; `names` plans only those
    output tensors (the REPL looks at one)."""
    lowered = bound.lowered
    if lowered.output is None:
        raise error("there is no model expression to plan", lowered.output_span)
    out_dtype = COMPUTE_DTYPES[lowered.out_dtype] if lowered.out_dtype else None
    specialiser = Specialiser(bound, params)
    checker = _Checker(bound)
    num_layers = _output_layers(specialiser, lowered.output)
    wanted = set(names) if names is not None else None
    tensors = []
    for name in bound.names(num_layers):
        if wanted is not None and name not in wanted:
            continue
        root = specialiser.tensor(lowered.output, bound.context(name, num_layers))
        if root is not None:
            tensors.append(checker.finish(name, root, out_dtype, specialiser.reported))
    errors = specialiser.missing_errors() + checker.errors
    if errors:
        raise MergeError(errors)
    if not tensors:
        raise error("the output has no tensors: no tensor name is in every model it uses",
                    lowered.output.span)
    return Plan(bound, tensors, COMPUTE_DTYPES[lowered.dtype], lowered.seed, num_layers,
                list(bound.warnings))


def scalar_for(bound: Bound, node: Node, name: str, params: dict[str, Any] | None = None
               ) -> Any:
    """A per-tensor value (e.g. `depth`, a gradient) for the tensor `name`."""
    return Specialiser(bound, params).value(node, bound.context(name))


def build_graph(tensors: list[TensorPlan]) -> nx.DiGraph:
    """One DiGraph for the whole merge. Constants are attributes of their users, not nodes.
    (networkx is imported here: a merge itself runs from the kernels, and the import
    costs 0.1 s of every run's start-up.)"""
    import networkx as nx

    graph = nx.DiGraph()
    for t in tensors:
        for node in walk(t.root):
            if node.is_const:
                continue
            graph.add_node(node, op=node.op.value, label=node.label, tensor=t.name)
            for arg in tensor_args(node):
                graph.add_edge(arg, node)
        sink = ("output", t.name)
        graph.add_node(sink, op="output", label=f"write {t.name}", tensor=t.name,
                       shape=t.shape, dtype=str(t.out_dtype).removeprefix("torch."))
        graph.add_edge(t.root, sink)
    return graph


def _output_layers(s: Specialiser, root: Node) -> int:
    """The output's number of layers: a stack's total, else Bound.num_layers. Checks every
    layer slice against its models first."""
    for node in nodes_of(root, Op.LAYERS):
        _check_slice(s.bound, node)
    totals = {sum(s.slice_length(part) for part in n.args) for n in nodes_of(root, Op.STACK)}
    if len(totals) > 1:
        raise error(f"the stacks in this output have different numbers of layers: "
                    f"{sorted(totals)}", root.span, hint="stack the same layer count")
    if totals:
        return totals.pop()
    return s.bound.num_layers


def _check_slice(bound: Bound, node: Node) -> None:
    start, stop = node.attr
    for leaf in nodes_of(node, Op.MODEL):
        model = bound.models[leaf.attr]
        if model.num_layers == 0:
            raise error(f"{model.display} has no layers that mergelang can find", node.span,
                        hint="layers are found from names like model.layers.N. and "
                             "config.json's num_hidden_layers")
        if (stop if stop is not None else start + 1) > model.num_layers:
            raise error(f"layers {start}:{stop if stop is not None else start + 1} are "
                        f"beyond the {model.num_layers} layers of {model.display}",
                        node.span, hint=f"use layers between 0 and {model.num_layers}")


class _Checker:
    """The checks on one specialised tensor: shapes, dtypes, reductions."""

    def __init__(self, bound: Bound):
        self.bound = bound
        self.b = bound.lowered.builder
        self.errors: list[Diagnostic] = []

    def finish(self, name: str, root: Node, out_dtype: torch.dtype | None,
               reported: set[str]) -> TensorPlan:
        order = walk(root)
        loads = [n for n in order if n.op is Op.LOAD]
        infos = {n: self.bound.models[n.attr[0]].source.tensors[n.attr[1]] for n in loads}
        shapes = self._shapes(name, order, infos, reported)
        floats = [n for n in loads if infos[n].dtype.is_floating_point]
        copy_only = len(floats) < len(loads)
        if copy_only and floats:
            mixed = ", ".join(f"{self.bound.models[n.attr[0]].display}: "
                              f"{str(infos[n].dtype).removeprefix('torch.')}" for n in loads)
            self.errors.append(Diagnostic(
                f'tensor "{name}" is a float tensor in some models and not in others ({mixed})',
                root.span))
        if copy_only:
            root = self.b.make(Op.COPY_AGREEING, tuple(loads), None, TENSOR, root.span)
            shapes[root] = infos[loads[0]].shape
            dtype = infos[loads[0]].dtype
        else:
            self._check_reductions(order, _numel(shapes[root]))
            dtype = out_dtype or self._donor_dtype(name, loads, infos)
        done = TensorPlan(name, root, shapes[root], dtype, copy_only)
        if not copy_only:
            done.nodes = tuple(order)  # what the cached property would walk again
        return done

    def _shapes(self, name: str, order: list[Node], infos: dict, reported: set[str]
                ) -> dict:
        shapes: dict[Node, tuple[int, ...]] = {}
        for node in order:
            if node.kind != TENSOR:
                continue
            if node.op is Op.LOAD:
                shapes[node] = infos[node].shape
                continue
            operands = tensor_args(node)
            shapes[node], clash = SHAPE_RULES[node.op](operands, shapes)
            if clash is not None and name not in reported:
                reported.add(name)
                a, b = (next(nodes_of(n, Op.LOAD), None) for n in clash)
                self.errors.append(Diagnostic(
                    f'tensor "{name}" has shape {list(shapes[clash[0]])} in '
                    f"{self._where(a)} but {list(shapes[clash[1]])} in {self._where(b)}",
                    node.span, hint="these models have different architectures; merge "
                    "models with the same shapes, or exclude this tensor with `if name ~ ...`"))
        return shapes

    def _check_reductions(self, order: list[Node], numel: int) -> None:
        """A whole-model reduction sweeps the model before any tensor is computed, so
        it cannot take a value that needs a per-tensor reduction first."""
        reducing = {n for n in order if n.op is Op.PRIM
                    if PRIMITIVES[n.attr[0]].make_reduction(numel, static_args(n)) is not None}
        for node in reducing:
            reduction = PRIMITIVES[node.attr[0]].make_reduction(numel, static_args(node))
            if not reduction.model_wide:
                continue
            if any(n in reducing for a in tensor_args(node) for n in walk(a)):
                raise error("a whole-model reduction cannot take the result of another "
                            "reduction (e.g. a trim of a trim)", node.span,
                            hint="compute the inner step per tensor, or apply the whole-model "
                                 "step to plain deltas")

    def _donor_dtype(self, name: str, loads: list[Node], infos: dict) -> torch.dtype:
        donor = self.bound.donor
        if donor is not None and name in donor.source.tensors:
            return donor.source.tensors[name].dtype
        return infos[loads[0]].dtype

    def _where(self, load: Node | None) -> str:
        return self.bound.models[load.attr[0]].display if load is not None else "a computed value"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
