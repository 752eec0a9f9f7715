"""Sparsification: keep the largest entries (TIES) or a random subset (DARE)."""

from __future__ import annotations

import torch

from ..reduce import Chunk, L1Ratio
from ..selection import KthMagnitude, ModelKthMagnitude, keep_top
from . import Param, primitive
from .common import DENSITY, SCOPE, with_stats


def top_k(numel: int, density: float, scope: str) -> KthMagnitude:
    """trim's selection: the k = max(1, int(density * numel)) largest magnitudes (none at
    density 0), of the tensor or, with scope="model", of the whole model."""
    k = max(1, int(density * numel)) if density > 0 else 0
    return (ModelKthMagnitude if scope == "model" else KthMagnitude)(k, numel)


@primitive("trim", Param("x", "tensor"), DENSITY, SCOPE, reduction=top_k)
def trim(x: torch.Tensor, density: float, scope: str = "tensor", *,
         chunk: Chunk | None = None) -> torch.Tensor:
    """Keep the k = max(1, int(density * numel)) entries of largest magnitude (none when
    density is 0), zero the rest: mergekit 0.1.5's rule.

    scope="tensor" takes the top k of each tensor (mergekit); scope="model" the top k of
    the whole model's x, all tensors together (the TIES paper), which costs two extra
    reads of the inputs.

    Ties in magnitude at the cut-off keep the entries that come first in row-major
    order (and, for scope="model", in earlier tensors of the plan's order): the result
    equals masking with a stable descending argsort of |x|, but is found by an exact
    selection (selection.KthMagnitude) instead of a sort.
    """
    return x * top_mask(x, density, chunk)


def top_mask(x: torch.Tensor, density: float, chunk: Chunk | None = None) -> torch.Tensor:
    """Which entries of this chunk of x `trim` keeps (a bool tensor shaped like x)."""
    chunk = with_stats(chunk, x, [x], lambda: top_k(x.numel(), density, "tensor"))
    return keep_top(x.abs(), *chunk.stats, chunk.state)


def _keep_mask(density: float):
    def keep(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        cached = chunk.state.get("keep")
        if cached is not None and cached[0] == chunk.offset:  # drawn by the L1 reduction
            return cached[1]
        drawn = chunk.random.uniform(chunk.offset, x.numel(), chunk.numel)
        mask = (drawn < density).reshape(x.shape).to(x.device)
        chunk.state["keep"] = (chunk.offset, mask)
        return mask
    return keep


def _drop_l1(density: float) -> L1Ratio:
    """‖x‖₁ / ‖x * keep‖₁, summed in the compute dtype."""
    keep = _keep_mask(density)
    return L1Ratio(lambda x, chunk: (x, keep(x, chunk)), dtype=None)


def _l1_ratio(numel: int, density: float, rescale: str) -> L1Ratio | None:
    return _drop_l1(density) if rescale == "l1" and density < 1 else None


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
        return kept.div_(density) if density > 0 else kept
    if rescale == "l1":
        return kept.mul_(with_stats(chunk, x, [x], lambda: _drop_l1(density)).stats)
    return kept
