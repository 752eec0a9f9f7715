"""Tensor primitives: the few operations merge methods are built from.

Each primitive is a plain function on float tensors and Python numbers, registered with
a declared signature: which arguments are tensors, lists of tensors, numbers (with a
range), or strings (with choices). The compiler checks calls against the signature, so
a bad `density` is reported at the call in the script, before any tensor is loaded.

Merge methods are not here: they are written in the language, in `stdlib/*.merge`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .reduce import Chunk, KthMagnitude, L1Ratio, Reduction

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


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *params: Param, random: bool = False, maps: bool = True,
              reduction: Callable | None = None, whole: bool = False):
    def register(fn: Callable) -> Callable:
        PRIMITIVES[name] = Primitive(name, params, fn, (fn.__doc__ or "").strip(),
                                     random=random, reduction=reduction, maps=maps, whole=whole)
        return fn
    return register


DENSITY = Param("density", "number", range=(0.0, 1.0))


def _top_k(numel: int, density: float, random=None) -> KthMagnitude:
    return KthMagnitude(max(1, int(density * numel)) if density > 0 else 0, numel)


@primitive("trim", Param("x", "tensor"), DENSITY, reduction=_top_k)
def trim(x: torch.Tensor, density: float, *, chunk: Chunk | None = None) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest magnitude (none when
    density is 0), zero the rest: mergekit 0.1.5's rule.

    Ties in magnitude at the cut-off keep the entries that come first in row-major
    order: the result equals masking with a stable descending argsort of |x|, but is
    found by a k-th value selection (reduce.KthMagnitude) instead of a sort.
    """
    if chunk is None:
        chunk = Chunk.whole(x)
        chunk.stats = _reduce_whole(_top_k(x.numel(), density), x, chunk)
    threshold, room = chunk.stats
    magnitude = x.abs()
    keep = magnitude > threshold
    if room > 0:
        at = (magnitude == threshold).reshape(-1).nonzero().squeeze(1)
        taken = chunk.state.get("ties", 0)
        keep.view(-1)[at[:max(0, room - taken)]] = True
        chunk.state["ties"] = taken + at.numel()
    return x * keep


def _keep_mask(density: float):
    def keep(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        drawn = chunk.random.uniform(chunk.offset, x.numel(), chunk.numel)
        return (drawn < density).reshape(x.shape).to(x.device)
    return keep


def _l1_ratio(numel: int, density: float, rescale: str = "density") -> L1Ratio | None:
    return L1Ratio(_keep_mask(density)) if rescale == "l1" and density < 1 else None


@primitive("drop", Param("x", "tensor"), DENSITY,
           Param("rescale", "string", "density", choices=("density", "l1", "none")),
           random=True, reduction=_l1_ratio)
def drop(x: torch.Tensor, density: float, rescale: str = "density", *,
         chunk: Chunk) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, then rescale.

    rescale="density" divides the kept entries by density (the DARE paper: the
    expectation is preserved); "l1" scales the result to the L1 norm of the input
    (mergekit 0.1.5's norm-matching rule); "none" leaves them.
    """
    if density >= 1:
        return x
    kept = x * _keep_mask(density)(x, chunk)
    if rescale == "density":
        return kept / density if density > 0 else kept
    if rescale == "l1":
        if chunk.stats is None:
            chunk.stats = _reduce_whole(L1Ratio(_keep_mask(density)), x, chunk)
        return kept * chunk.stats
    return kept


def _reduce_whole(reduction: Reduction, x: torch.Tensor, chunk: Chunk):
    """A reduction over a tensor held whole (one chunk)."""
    while True:
        reduction.add(x, chunk)
        if reduction.finish_sweep():
            return reduction.result()


@primitive("elect_sign", Param("xs", "tensors"),
           Param("method", "string", "sum", choices=("sum", "count")), maps=False)
def elect_sign(xs: list[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """The majority sign per entry, +1 or -1; a tie (or all zero) elects +1.

    method="sum" weighs each vote by its value (TIES, mergekit); "count" counts signs.
    """
    votes = xs if method == "sum" else [x.sign() for x in xs]
    total = _sum(votes)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


@primitive("agrees_with", Param("x", "tensor"), Param("sign", "tensor"))
def agrees_with(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1 where x is nonzero and has the given sign, else 0."""
    return (x.sign() == sign).to(x.dtype)


def _sum(xs: list) -> torch.Tensor:
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


@primitive("nonzero", Param("x", "tensor"))
def nonzero(x: torch.Tensor) -> torch.Tensor:
    """x, with zeros replaced by ones: a divisor that leaves empty entries alone."""
    return torch.where(x == 0, torch.ones_like(x), x)


@primitive("abs", Param("x", "tensor"))
def abs_(x: torch.Tensor) -> torch.Tensor:
    """|x|."""
    return x.abs()


@primitive("sign", Param("x", "tensor"))
def sign(x: torch.Tensor) -> torch.Tensor:
    """-1, 0 or +1 per entry."""
    return x.sign()


BINARY: dict[str, Callable] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
}
