"""Tensor primitives: the few operations merge methods are built from.

Each primitive is a plain function on float tensors and Python numbers, registered with
a declared signature: which arguments are tensors, lists of tensors, numbers (with a
range), or strings (with choices). The compiler checks calls against the signature, so
a bad `density` is reported at the call in the script, before any tensor is loaded.

Merge methods are not here: they are written in the language, in `stdlib/*.merge`.
This package holds the registry; the primitives are in its modules, by kind.
"""

from __future__ import annotations

import functools
import inspect
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
    """A registered primitive. Its parameters are declared once, by `params`: the Python
    function's positional parameters must be exactly those, in order, with the same
    defaults, and the reduction factory names the number and string parameters it needs.
    A primitive whose declarations disagree cannot be made (see `declaration_errors`)."""

    name: str
    params: tuple[Param, ...]
    fn: Callable = field(compare=False)
    doc: str
    # Draws random numbers: fn gets a `chunk=` whose RandomStream is keyed by
    # (seed, tensor name, call site).
    random: bool = False
    # A per-tensor reduction over the tensor arguments, computed before the elementwise
    # pass: reduction(numel, **the number and string arguments it names) -> Reduction |
    # None (None: not needed with these arguments). fn then gets `chunk=` with the result
    # in chunk.stats. See reduce.py; the reduction's add() receives the tensor arguments
    # in order.
    reduction: Callable | None = field(default=None, compare=False)
    # Needs the whole tensor at once (e.g. a decomposition): never computed in row blocks.
    whole: bool = False
    # Calling it with a list where the first parameter takes one tensor maps over the list.
    maps: bool = True
    # Each entry of the result depends on the same entry of the tensor arguments only (and
    # the numbers): on Sparse values (mergelang.sparse) it runs at their positions only.
    entrywise: bool = False
    # The same values as fn, returned as a mergelang.sparse.Sparse where few entries are
    # kept; takes fn's arguments, each tensor dense or Sparse (the executor uses it).
    sparse: Callable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        errors = declaration_errors(self)
        if errors:
            raise TypeError(f"primitive {self.name!r}: " + "; ".join(errors))

    @property
    def takes_chunk(self) -> bool:
        return self.random or self.reduction is not None

    @property
    def statics(self) -> tuple[str, ...]:
        """The names of the number and string parameters, in declaration order."""
        return tuple(p.name for p in self.params if p.kind not in TENSOR_KINDS)

    def make_reduction(self, numel: int, statics: tuple):
        """The reduction one call needs on a tensor of `numel` elements, given the call's
        number and string arguments in declaration order (None: not needed)."""
        if self.reduction is None:
            return None
        named = dict(zip(self.statics, statics, strict=True))
        return self.reduction(numel, **{n: named[n] for n in _factory_names(self.reduction)})


TENSOR_KINDS = ("tensor", "tensors")


def declaration_errors(prim: Primitive) -> list[str]:
    """Where a primitive's function and reduction factory disagree with its `params`."""
    errors = []
    signature = inspect.signature(prim.fn)
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [p.name for p in prim.params]
    if [p.name for p in positional] != names:
        errors.append(f"the function's parameters {[p.name for p in positional]} are not the "
                      f"declared {names}")
    for declared, actual in zip(prim.params, positional, strict=False):
        default = REQUIRED if actual.default is actual.empty else actual.default
        if declared.name == actual.name and default != declared.default:
            errors.append(f"{declared.name} defaults to {_shown(default)} in the function "
                          f"but to {_shown(declared.default)} in the declaration")
    keywords = [p.name for p in signature.parameters.values() if p.kind == p.KEYWORD_ONLY]
    if keywords != (["chunk"] if prim.takes_chunk else []):
        errors.append(f"the function's keyword-only parameters are {keywords}; "
                      + ("a random or reducing primitive takes exactly `chunk`"
                         if prim.takes_chunk else "it takes none"))
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        errors.append("the function takes *args or **kwargs")
    if prim.sparse is not None and _shape(inspect.signature(prim.sparse)) != _shape(signature):
        errors.append("the sparse form's parameters are not the function's")
    if prim.entrywise and prim.takes_chunk:
        errors.append("an entrywise primitive draws nothing and reduces nothing")
    if prim.reduction is not None:
        factory = list(inspect.signature(prim.reduction).parameters.values())
        if not factory or factory[0].name != "numel":
            errors.append("the reduction factory's first parameter is not `numel`")
        for p in factory[1:]:
            if p.name not in prim.statics:
                errors.append(f"the reduction factory takes {p.name!r}, which is not a "
                              f"declared number or string parameter {list(prim.statics)}")
            if p.default is not p.empty or p.kind not in (p.POSITIONAL_OR_KEYWORD,
                                                          p.KEYWORD_ONLY):
                errors.append(f"the reduction factory's {p.name!r} has a default or is not "
                              "passed by name (the declaration gives every value)")
    return errors


def _shape(signature: inspect.Signature) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@functools.cache
def _factory_names(factory: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(factory).parameters)[1:]


def _shown(default: object) -> str:
    return "nothing (required)" if default is REQUIRED else repr(default)


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *params: Param, random: bool = False, maps: bool = True,
              reduction: Callable | None = None, whole: bool = False,
              entrywise: bool = False, sparse: Callable | None = None):
    def register(fn: Callable) -> Callable:
        if name in PRIMITIVES:
            raise ValueError(f"primitive {name!r} is registered twice")
        PRIMITIVES[name] = Primitive(name, params, fn, (fn.__doc__ or "").strip(),
                                     random=random, reduction=reduction, maps=maps, whole=whole,
                                     entrywise=entrywise, sparse=sparse)
        return fn
    return register


BINARY: dict[str, Callable] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}


# the primitives register themselves on import
from . import (  # noqa: E402, F401
    analysis,
    consensus,
    elementwise,
    geometry,
    online,
    pruning,
    sparsify,
    subspace,
)
