"""Tensor primitives: the few operations merge methods are built from.

Each primitive is a plain function on float tensors and Python numbers, registered with
a declared signature: which arguments are tensors, lists of tensors, numbers (with a
range), or strings (with choices). The compiler checks calls against the signature, so
a bad `density` is reported at the call in the script, before any tensor is loaded.

Merge methods are not here: they are written in the language, in `stdlib/*.merge`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

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
    random: bool = False  # receives a `generator=` made from (seed, tensor name, call site)
    # Calling it with a list where the first parameter takes one tensor maps over the list.
    maps: bool = True


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *params: Param, random: bool = False, maps: bool = True):
    def register(fn: Callable) -> Callable:
        PRIMITIVES[name] = Primitive(name, params, fn, (fn.__doc__ or "").strip(),
                                     random=random, maps=maps)
        return fn
    return register


DENSITY = Param("density", "number", range=(0.0, 1.0))


@primitive("trim", Param("x", "tensor"), DENSITY)
def trim(x: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest magnitude (none when
    density is 0), zero the rest: mergekit 0.1.5's rule.

    Ties in magnitude at the cut-off keep the entries that come first in row-major
    order: the result equals masking with a stable descending argsort of |x|, but is
    found with one k-th value selection instead of a sort.
    """
    return x * magnitude_mask(x, density)


def magnitude_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    """The 0/1 mask `trim` applies (see there)."""
    n = x.numel()
    k = max(1, int(density * n)) if density > 0 else 0
    if k >= n:
        return torch.ones_like(x)
    if k <= 0:
        return torch.zeros_like(x)
    magnitude = x.abs().reshape(-1)
    # the k-th largest magnitude is the (n - k + 1)-th smallest
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    above = magnitude > threshold
    at = magnitude == threshold
    room = k - int(above.sum())
    keep = above | (at & (torch.cumsum(at, 0) <= room))
    return keep.reshape(x.shape).to(x.dtype)


@primitive("drop", Param("x", "tensor"), DENSITY,
           Param("rescale", "string", "density", choices=("density", "l1", "none")),
           random=True)
def drop(x: torch.Tensor, density: float, rescale: str = "density", *,
         generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, then rescale.

    rescale="density" divides the kept entries by density (the DARE paper: the
    expectation is preserved); "l1" scales the result to the L1 norm of the input
    (mergekit's norm-matching rule); "none" leaves them.
    """
    if density >= 1:
        return x
    keep = random_mask(x.shape, density, generator).to(x.device, x.dtype)
    kept = x * keep
    if rescale == "density":
        return kept / density if density > 0 else kept
    if rescale == "l1":
        before, after = x.abs().sum(), kept.abs().sum()
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def random_mask(shape: torch.Size, density: float, generator: torch.Generator) -> torch.Tensor:
    """Bernoulli(density) entries, drawn on the CPU so every device gets the same bits."""
    return torch.rand(shape, generator=generator, dtype=torch.float32) < density


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


def generator_for(seed: int, tensor_name: str, site: str) -> torch.Generator:
    """A CPU generator that depends only on (seed, tensor name, call site)."""
    digest = hashlib.blake2b(f"{seed}\0{tensor_name}\0{site}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)
