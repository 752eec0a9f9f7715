"""Sign consensus (TIES): elect a sign per entry, mask the entries that agree."""

from __future__ import annotations

import torch

from . import Param, primitive
from .common import sum_of


@primitive("elect_sign", Param("xs", "tensors"),
           Param("method", "string", "sum", choices=("sum", "count")), maps=False,
           entrywise=True)
def elect_sign(xs: list[torch.Tensor], method: str = "sum") -> torch.Tensor:
    """The majority sign per entry, +1 or -1; a tie (or all zero) elects +1.

    method="sum" weighs each vote by its value (TIES, mergekit); "count" counts signs.
    """
    votes = xs if method == "sum" else [x.sign() for x in xs]
    total = sum_of(votes)
    return (total >= 0).to(total.dtype).mul_(2).sub_(1)


@primitive("agrees_with", Param("x", "tensor"), Param("sign", "tensor"), entrywise=True)
def agrees_with(x: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """1 where x is nonzero and has the given sign, else 0."""
    return (x.sign() == sign).to(x.dtype)
