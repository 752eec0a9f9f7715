"""What several primitive modules share: declared parameters, ranges, and small tensor
helpers. One home each, so two primitives cannot drift apart on what `density` means."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..reduce import Chunk, Reduction, reduce_whole
from . import Param

FRACTION = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)
DENSITY = Param("density", "number", range=FRACTION)
SCOPE = Param("scope", "string", "tensor", choices=("tensor", "model"))  # or all tensors


def sum_of(xs: list[torch.Tensor]) -> torch.Tensor:
    """xs[0] + xs[1] + ..., added left to right, as a new tensor (never one of xs: the
    executor may later write into a primitive's result)."""
    out = xs[0].clone() if len(xs) == 1 else xs[0] + xs[1]
    for x in xs[2:]:
        out = out + x
    return out


def with_stats(chunk: Chunk | None, like: torch.Tensor, tensors: list,
               reduction: Callable[[], Reduction | None]) -> Chunk:
    """The chunk a primitive with a reduction works in. Called directly (no chunk), or on a
    tensor whose reduction has not run, the reduction runs here on the tensor arguments,
    which then hold the whole tensor (`like` is one of them)."""
    if chunk is None:
        chunk = Chunk.whole(like)
    if chunk.stats is None:
        chunk.stats = reduce_whole(reduction(), tensors, chunk)
    return chunk
