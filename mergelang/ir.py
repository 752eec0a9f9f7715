"""The IR: a closed set of operations, and interned nodes owned by one program.

Every operation is declared once, in `SPECS`: its kind rule, the type of its attribute,
the phase it lives in and how it is labelled. The stages dispatch through tables keyed
by `Op` (specialise and scalar evaluation in plan, the execution steps in execute), and
a test checks that every table covers exactly the operations of its phase, so adding an
operation fails at once where a stage forgets it.

A `Builder` hash-conses: asking it twice for `sub(model(math), model(base))` returns the
same node, so a shared subexpression is computed once without any extra pass (as in
tinygrad's UOp). Each program has its own builder, so two programs in one process never
share a node: the span on a node is where it was first written *in that program*.
Kinds: a node is a "tensor" (one tensor per output name) or a "scalar" (a number, bool
or string known per tensor before anything is loaded, like `depth`).
"""

from __future__ import annotations

import enum
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .diagnostics import Span

TENSOR = "tensor"
SCALAR = "scalar"


class Phase(enum.Enum):
    """Where an operation can appear: written by lower, and gone after plan (SOURCE);
    made by plan, and run by execute (PLANNED); or both (BOTH)."""

    SOURCE = "source"
    PLANNED = "planned"
    BOTH = "both"


class Op(enum.Enum):
    CONST = "const"
    CTX = "ctx"                  # a per-tensor name: name, layer, num_layers, depth
    PARAM = "param"              # a value the caller gives at each evaluation
    MODEL = "model"
    LOAD = "load"
    LIST = "list"
    COND = "cond"
    FALLBACK = "fallback"
    LAYERS = "layers"
    STACK = "stack"
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    NEG = "neg"
    NOT = "not"
    AND = "and"
    OR = "or"
    MATCH = "match"
    COMPARE = "compare"
    GRADIENT = "gradient"
    CHECK_RANGE = "check_range"
    PRIM = "prim"
    COPY_AGREEING = "copy_agreeing"


ARITHMETIC = (Op.ADD, Op.SUB, Op.MUL, Op.DIV)


@dataclass(frozen=True)
class OpSpec:
    """kind: TENSOR, SCALAR, or "operands" (a tensor when any operand is one).
    attr: the attribute's type(s). label: a short description for graphs and errors."""

    kind: str
    attr: type | tuple[type, ...]
    phase: Phase
    label: Callable[[Node], str]


def _name(node: Node) -> str:
    return node.op.value


def _model_label(node: Node) -> str:
    return f"model {Path(node.attr).name}"


def _load_label(node: Node) -> str:
    return f"load {Path(node.attr[0]).name}[{node.attr[1]}]"


_NONE = type(None)
_SCALAR_VALUE = (int, float, bool, str, _NONE)
SPECS: dict[Op, OpSpec] = {
    Op.CONST: OpSpec(SCALAR, _SCALAR_VALUE, Phase.BOTH, lambda n: repr(n.attr)),
    Op.CTX: OpSpec(SCALAR, str, Phase.SOURCE, lambda n: n.attr),
    Op.PARAM: OpSpec(SCALAR, str, Phase.SOURCE, lambda n: f"param {n.attr}"),
    Op.MODEL: OpSpec(TENSOR, str, Phase.SOURCE, _model_label),
    Op.LOAD: OpSpec(TENSOR, tuple, Phase.PLANNED, _load_label),        # (model key, name)
    Op.LIST: OpSpec(TENSOR, _NONE, Phase.BOTH, _name),
    Op.COND: OpSpec("operands", _NONE, Phase.SOURCE, _name),
    Op.FALLBACK: OpSpec(TENSOR, _NONE, Phase.SOURCE, _name),
    Op.LAYERS: OpSpec(TENSOR, tuple, Phase.SOURCE, _name),             # (start, stop | None)
    Op.STACK: OpSpec(TENSOR, _NONE, Phase.SOURCE, _name),
    Op.ADD: OpSpec("operands", _NONE, Phase.BOTH, _name),
    Op.SUB: OpSpec("operands", _NONE, Phase.BOTH, _name),
    Op.MUL: OpSpec("operands", _NONE, Phase.BOTH, _name),
    Op.DIV: OpSpec("operands", _NONE, Phase.BOTH, _name),
    Op.NEG: OpSpec("operands", _NONE, Phase.BOTH, _name),
    Op.NOT: OpSpec(SCALAR, _NONE, Phase.SOURCE, _name),
    Op.AND: OpSpec(SCALAR, _NONE, Phase.SOURCE, _name),
    Op.OR: OpSpec(SCALAR, _NONE, Phase.SOURCE, _name),
    Op.MATCH: OpSpec(SCALAR, _NONE, Phase.SOURCE, _name),
    Op.COMPARE: OpSpec(SCALAR, str, Phase.SOURCE, lambda n: n.attr),   # "==", "<", ...
    Op.GRADIENT: OpSpec(SCALAR, tuple, Phase.SOURCE, _name),           # the values
    Op.CHECK_RANGE: OpSpec(SCALAR, tuple, Phase.SOURCE, _name),        # (param, lo, hi)
    Op.PRIM: OpSpec(TENSOR, tuple, Phase.BOTH, lambda n: n.attr[0]),   # (name, call site)
    Op.COPY_AGREEING: OpSpec(TENSOR, _NONE, Phase.PLANNED, _name),
}


Shapes = dict  # Node -> tuple[int, ...]


def _same_shape(operands: tuple[Node, ...], shapes: Shapes) -> tuple[tuple, tuple | None]:
    """Every tensor operand has one shape, and so has the result (elementwise operations,
    lists, and every primitive: each is declared shape-preserving). Returns the shape
    and the first pair of operands that disagree, if any."""
    tensors = [a for a in operands if a in shapes]
    first = tensors[0]
    for other in tensors[1:]:
        if shapes[other] != shapes[first]:
            return shapes[first], (first, other)
    return shapes[first], None


# how each planned tensor operation's shape follows from its operands' (LOAD's comes
# from the file header, and the source-only operations are gone by then)
SHAPE_RULES: dict[Op, Callable[[tuple[Node, ...], Shapes], tuple[tuple, tuple | None]]] = {
    Op.LIST: _same_shape, Op.ADD: _same_shape, Op.SUB: _same_shape, Op.MUL: _same_shape,
    Op.DIV: _same_shape, Op.NEG: _same_shape, Op.PRIM: _same_shape,
    Op.COPY_AGREEING: _same_shape,
}


def ops_in(phase: Phase, kind: str | None = None) -> frozenset[Op]:
    """The operations that can appear in a phase (BOTH counts in each), optionally only
    those that can have `kind`: the set each stage's dispatch table must cover."""
    return frozenset(op for op, spec in SPECS.items()
                     if spec.phase in (phase, Phase.BOTH)
                     and (kind is None or spec.kind in (kind, "operands")))


def _key(value: Any) -> Any:
    """A hash key that keeps 1, 1.0 and True apart (Python hashes them equal)."""
    if isinstance(value, tuple):
        return tuple(_key(v) for v in value)
    return (type(value).__name__, value)


class Node:
    """An interned IR node: `op` applied to `args` (nodes) with a static `attr`. Made
    only by a `Builder`; equal nodes of one builder are one object."""

    __slots__ = ("op", "args", "attr", "kind", "span", "__weakref__")

    op: Op
    args: tuple[Node, ...]
    attr: Any
    kind: str
    span: Span | None

    def __repr__(self) -> str:
        return f"Node({self.op.value}, attr={self.attr!r}, {len(self.args)} args)"

    @property
    def label(self) -> str:
        """A short human-readable description, used by `graph` and error messages."""
        return SPECS[self.op].label(self)

    @property
    def is_const(self) -> bool:
        return self.op is Op.CONST


class Builder:
    """The interning table of one program. Thread-safe; nodes nobody refers to any more
    leave the table, and the table goes with the program."""

    def __init__(self) -> None:
        self._nodes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def make(self, op: Op, args: tuple[Node, ...] = (), attr: Any = None,
             kind: str | None = None, span: Span | None = None) -> Node:
        spec = SPECS[op]
        if kind is None:
            kind = _kind_of(spec, args)
        if not isinstance(attr, spec.attr):
            raise TypeError(f"{op.value}: attribute {attr!r} is not {spec.attr}")
        key = (op, _key(attr), args, kind)
        with self._lock:
            node = self._nodes.get(key)
            if node is None:
                node = object.__new__(Node)
                node.op, node.args, node.attr, node.kind, node.span = op, args, attr, kind, span
                self._nodes[key] = node
        return node

    def const(self, value: Any) -> Node:
        return self.make(Op.CONST, (), value, SCALAR)

    def __len__(self) -> int:
        return len(self._nodes)


def _kind_of(spec: OpSpec, args: tuple[Node, ...]) -> str:
    if spec.kind != "operands":
        return spec.kind
    return TENSOR if any(a.kind == TENSOR for a in args) else SCALAR


def is_const(node: Any) -> bool:
    return isinstance(node, Node) and node.op is Op.CONST


def walk(root: Node) -> list[Node]:
    """Every node reachable from root, each once, arguments before their users."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((arg, False) for arg in reversed(node.args) if id(arg) not in seen)
    return order


def nodes_of(root: Node, op: Op) -> Iterator[Node]:
    """The nodes under root (root included) that apply `op`, arguments first."""
    return (n for n in walk(root) if n.op is op)


def tensor_args(node: Node) -> tuple[Node, ...]:
    """A node's non-constant arguments (a list counts as one)."""
    return tuple(a for a in node.args if a.op is not Op.CONST)


def static_args(node: Node) -> tuple:
    """A node's constant arguments' values: a primitive call's numbers and strings."""
    return tuple(a.attr for a in node.args if a.op is Op.CONST)
