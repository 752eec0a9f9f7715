"""Tensor primitives: the few operations merge methods are built from.

Each primitive is a plain function on float tensors and Python numbers, registered with
a declared signature: which arguments are tensors, lists of tensors, numbers (with a
range), or strings (with choices). The compiler checks calls against the signature, so
a bad `density` is reported at the call in the script, before any tensor is loaded.

Merge methods are not here: they are written in the language, in `stdlib/*.merge`.
This package holds the registry; the primitives are in its modules, by kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One declared argument. kind: tensor | tensors | number | string | bool."""

    name: str
    kind: str
    default: object = REQUIRED
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Primitive:
    name: str
    params: tuple[Param, ...]
    fn: Callable = field(compare=False)
    doc: str
    # Draws random numbers: fn gets a `chunk=` whose RandomStream is keyed by
    # (seed, tensor name, call site).
    random: bool = False
    # A per-tensor reduction over the tensor arguments, computed before the elementwise
    # pass: reduction(numel, *number and string args) -> Reduction | None (None: not
    # needed with these arguments). fn then gets `chunk=` with the result in chunk.stats.
    # See reduce.py; the reduction's add() receives the tensor arguments in order.
    reduction: Callable | None = field(default=None, compare=False)
    # Needs the whole tensor at once (e.g. a decomposition): never computed in row blocks.
    whole: bool = False
    # Calling it with a list where the first parameter takes one tensor maps over the list.
    maps: bool = True

    @property
    def takes_chunk(self) -> bool:
        return self.random or self.reduction is not None

    def make_reduction(self, numel: int, statics: tuple):
        """The reduction one call needs on a tensor of `numel` elements, given the call's
        number and string arguments in declaration order (None: not needed)."""
        return self.reduction(numel, *statics) if self.reduction is not None else None


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *params: Param, random: bool = False, maps: bool = True,
              reduction: Callable | None = None, whole: bool = False):
    def register(fn: Callable) -> Callable:
        if name in PRIMITIVES:
            raise ValueError(f"primitive {name!r} is registered twice")
        PRIMITIVES[name] = Primitive(name, params, fn, (fn.__doc__ or "").strip(),
                                     random=random, reduction=reduction, maps=maps, whole=whole)
        return fn
    return register


BINARY: dict[str, Callable] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


# the primitives register themselves on import
from . import consensus, elementwise, geometry, pruning, sparsify, subspace  # noqa: E402, F401
from . import online  # noqa: E402, F401
