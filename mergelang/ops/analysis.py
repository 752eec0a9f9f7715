"""Analysis: numbers about tensors (`norm`, `cosine`, `sparsity`), usable in any script or
REPL line, e.g. `delta / norm(delta)` or `cosine(a - base, b - base)`.

The language's values are tensors (one per output name) and per-tensor scalars known
before anything is loaded; a number computed from tensor data is neither. So, as SCE's
`energy_share` already does, each of these returns its number as a tensor filled with it,
the shape of its argument: it then fits every rule of the IR (shapes, row blocks,
broadcasting in arithmetic) unchanged. The REPL and `:stats` show such a value as the
number it is (see `number_valued`).

Each is a reduction accumulated over the rows of its arguments (per-row sums in float64,
added exactly), so the number does not depend on how the tensor was chunked. With
scope="model" the sums run over every tensor of the output, through the executor's
model-wide reductions (one extra read of the inputs, before the merge): `norm(d,
scope="model")` is the norm of the whole task vector.

`topk_mass` and `sign_conflicts` are written in the language on these and on `trim`
(stdlib/analysis.merge), so they count exactly what a trim keeps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..ir import TENSOR, Node, Op, tensor_args
from ..reduce import Chunk, Reduction, row_sums
from . import Param, primitive
from .common import NON_NEGATIVE, SCOPE, with_stats

NUMBER_VALUED = frozenset({"norm", "cosine", "sparsity", "energy_share"})
# primitives that keep a number a number (applied entry by entry to a filled tensor)
_ENTRYWISE = frozenset({"abs", "nonzero", "sign", "above", "clamp_min"})


class Sums(Reduction):
    """Sums over the whole tensor of what `parts` gives for each chunk, each kept as
    per-row float64 sums and added exactly at the end; `finish` turns them into the
    number."""

    def __init__(self, parts: Callable[..., tuple[torch.Tensor, ...]],
                 finish: Callable[..., float]):
        self.parts, self.finish = parts, finish
        self.sums: list[list[float]] | None = None

    def add(self, *args: torch.Tensor | Chunk) -> None:
        *tensors, _chunk = args
        parts = self.parts(*tensors)
        if self.sums is None:
            self.sums = [[] for _ in parts]
        for acc, part in zip(self.sums, parts, strict=True):
            acc += row_sums(part)

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> float:
        return self.finish(*(math.fsum(s) for s in self.sums or ()))

    def partial(self) -> list[list[float]] | None:
        return self.sums

    def merge(self, partials: Sequence[list[list[float]] | None]) -> None:
        """The per-row sums of other tensors, added exactly at the end like these."""
        for sums in partials:
            if sums is not None:
                self.sums = self.sums or [[] for _ in sums]
                for acc, more in zip(self.sums, sums, strict=True):
                    acc += more


class ModelSums(Sums):
    """The same sums over every tensor of the output: one number for the whole model."""

    model_wide = True

    def result_for(self, tensor: str) -> float:
        return self.result()


def _sums(scope: str, parts: Callable, finish: Callable) -> Sums:
    return (ModelSums if scope == "model" else Sums)(parts, finish)


def _norm_sums(numel: int, p: float, scope: str) -> Sums:
    return _sums(scope, lambda x: (x.abs().pow(p),), lambda total: total ** (1 / p))


@primitive("norm", Param("x", "tensor"), Param("p", "number", 2, range=(1.0, 2.0)), SCOPE,
           reduction=_norm_sums)
def norm(x: torch.Tensor, p: float = 2, scope: str = "tensor", *,
         chunk: Chunk | None = None) -> torch.Tensor:
    """The p-norm (Σ|x|^p)^(1/p) of the tensor taken as one vector (p=2: Euclidean, p=1:
    the L1 mass), or of the whole model's x with scope="model"; a tensor filled with it."""
    chunk = with_stats(chunk, x, [x], lambda: _norm_sums(x.numel(), p, "tensor"))
    return torch.full_like(x, chunk.stats)


def _cosine_sums(numel: int, scope: str) -> Sums:
    return _sums(scope, lambda a, b: (a * b, a * a, b * b),
                 lambda ab, aa, bb: ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else 0.0)


@primitive("cosine", Param("a", "tensor"), Param("b", "tensor"), SCOPE,
           reduction=_cosine_sums)
def cosine(a: torch.Tensor, b: torch.Tensor, scope: str = "tensor", *,
           chunk: Chunk | None = None) -> torch.Tensor:
    """The cosine similarity of a and b, each tensor taken as one vector (or, with
    scope="model", each model's tensors all together: between two task vectors); 0 when
    either is all zeros. A tensor filled with it."""
    chunk = with_stats(chunk, a, [a, b], lambda: _cosine_sums(a.numel(), "tensor"))
    return torch.full_like(a, chunk.stats)


def _sparsity_sums(numel: int, eps: float, scope: str) -> Sums:
    return _sums(scope, lambda x: (x.abs() <= eps,), lambda small: small / numel)


@primitive("sparsity", Param("x", "tensor"), Param("eps", "number", 0.0, range=NON_NEGATIVE),
           SCOPE, reduction=_sparsity_sums)
def sparsity(x: torch.Tensor, eps: float = 0.0, scope: str = "tensor", *,
             chunk: Chunk | None = None) -> torch.Tensor:
    """The fraction of entries with |x| <= eps (eps=0: exact zeros), over the tensor or,
    with scope="model", over the whole model. A tensor filled with it."""
    chunk = with_stats(chunk, x, [x], lambda: _sparsity_sums(x.numel(), eps, "tensor"))
    return torch.full_like(x, chunk.stats)


def number_valued(node: Node) -> bool:
    """Whether a planned tensor is a number per tensor (a filled tensor): an analysis
    primitive, or arithmetic and entrywise primitives on such numbers and constants."""
    if node.kind != TENSOR:
        return True
    if node.op is Op.PRIM:
        if node.attr[0] in NUMBER_VALUED:
            return True
        return node.attr[0] in _ENTRYWISE and all(map(number_valued, tensor_args(node)))
    if node.op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG):
        return all(map(number_valued, tensor_args(node)))
    return False
