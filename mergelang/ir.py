"""The IR: one interned node type, so structurally equal expressions are one object.

`Node.make` hash-conses: asking twice for `sub(model(math), model(base))` returns the
same node, so a shared subexpression is computed once without any extra pass (as in
tinygrad's UOp). The span is where a node was first written and is not part of its
identity; it exists only so that later stages can point at the source.

Kinds: a node is a "tensor" (one tensor per output name) or a "scalar" (a number,
bool or string that is known per tensor before anything is loaded, like `depth`).
"""

from __future__ import annotations

import weakref
from typing import Any

from .diagnostics import Span

TENSOR = "tensor"
SCALAR = "scalar"

_interned: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _key(value: Any) -> Any:
    """A hash key that keeps 1, 1.0 and True apart (Python hashes them equal)."""
    if isinstance(value, tuple):
        return tuple(_key(v) for v in value)
    return (type(value).__name__, value)


class Node:
    """An interned IR node: `op` applied to `args` (nodes) with a static `attr`."""

    __slots__ = ("op", "args", "attr", "kind", "span", "__weakref__")

    op: str
    args: tuple[Node, ...]
    attr: Any
    kind: str
    span: Span | None

    @staticmethod
    def make(op: str, args: tuple[Node, ...] = (), attr: Any = None, kind: str = TENSOR,
             span: Span | None = None) -> Node:
        key = (op, _key(attr), args, kind)
        node = _interned.get(key)
        if node is None:
            node = object.__new__(Node)
            node.op, node.args, node.attr, node.kind, node.span = op, args, attr, kind, span
            _interned[key] = node
        return node

    def __repr__(self) -> str:
        return f"Node({self.op}, attr={self.attr!r}, {len(self.args)} args)"

    @property
    def label(self) -> str:
        """A short human-readable description, used by `graph` and error messages."""
        if self.op == "const":
            return repr(self.attr)
        if self.op == "load":
            return f"load {self.attr[0]}[{self.attr[1]}]"
        if self.op == "model":
            return f"model {self.attr}"
        if self.op == "prim":
            return self.attr[0]
        if self.op == "ctx":
            return str(self.attr)
        return self.op


def const(value: Any) -> Node:
    return Node.make("const", (), value, SCALAR)


def is_const(node: Any) -> bool:
    return isinstance(node, Node) and node.op == "const"


def walk(root: Node):
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
