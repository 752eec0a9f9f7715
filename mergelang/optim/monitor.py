"""What an online-merging step did, for a callback, Python logging and Trainer's logs.

The statistics cost a read of each update (norms and counts), so they are gathered only
when someone listens: a callback is registered, `stats=True` was asked for, or the
"mergelang.optim" logger is enabled for DEBUG.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..sparse import Sparse

logger = logging.getLogger("mergelang.optim")


@dataclass(frozen=True)
class StepStats:
    """One optimizer step, over all the parameters it updated.

    kept:        the fraction of entries the merged update changes (nonzero entries);
    agreement:   where the update and the kept reference task vector are both nonzero, the
                 fraction of entries where their signs agree (nan when there is none);
    update_norm: the L2 norm of the update before merging (with every=k: of the k
                 accumulated updates);
    merged_norm: the L2 norm of the merged update that was applied;
    ref_norm:    the L2 norm of the kept reference task vector;
    merged:      False on the steps between merges (every=k), when the update is applied
                 as it is and only update_norm is meaningful.
    """

    step: int
    merged: bool
    kept: float
    agreement: float
    update_norm: float
    merged_norm: float
    ref_norm: float

    def as_dict(self, prefix: str = "online/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in asdict(self).items()
                if k not in ("step", "merged")}


class Tally:
    """Sums over the parameters of one step, turned into a StepStats at the end."""

    def __init__(self) -> None:
        self.numel = self.nonzero = self.both = self.agree = 0
        self.update_sq = self.merged_sq = self.ref_sq = 0.0

    def update(self, delta: torch.Tensor) -> None:
        self.update_sq += float(delta.float().square().sum())

    def merged(self, merged: torch.Tensor | Sparse) -> None:
        self.numel += merged.numel()
        if isinstance(merged, Sparse):
            self.nonzero += merged.nonzero_count()
            self.merged_sq += merged.square_sum()
            return
        self.nonzero += int(torch.count_nonzero(merged))
        self.merged_sq += float(merged.float().square().sum())

    def signs(self, update_at_ref: torch.Tensor, ref_values: torch.Tensor) -> None:
        """Sign agreement of the update and the reference at the reference's entries."""
        u, r = update_at_ref.sign(), ref_values.sign()
        both = (u != 0) & (r != 0)
        self.both += int(both.sum())
        self.agree += int((both & (u == r)).sum())
        self.ref_sq += float(ref_values.float().square().sum())

    def result(self, step: int, merged: bool) -> StepStats:
        return StepStats(step, merged, self.nonzero / self.numel if self.numel else 0.0,
                         self.agree / self.both if self.both else math.nan,
                         math.sqrt(self.update_sq), math.sqrt(self.merged_sq),
                         math.sqrt(self.ref_sq))


class Monitor:
    """The listeners of one optimizer."""

    def __init__(self, callback: Callable[[StepStats], None] | None = None,
                 stats: bool = False):
        self.callbacks: list[Callable[[StepStats], None]] = [callback] if callback else []
        self.forced = stats
        self.last: StepStats | None = None

    def add(self, callback: Callable[[StepStats], None]) -> None:
        self.callbacks.append(callback)

    @property
    def enabled(self) -> bool:
        return self.forced or bool(self.callbacks) or logger.isEnabledFor(logging.DEBUG)

    def tally(self) -> Tally | None:
        return Tally() if self.enabled else None

    def emit(self, tally: Tally | None, step: int, merged: bool) -> None:
        if tally is None:
            return
        stats = self.last = tally.result(step, merged)
        logger.debug("step %d%s: kept %.4g, sign agreement %.4g, |update| %.4g, "
                     "|merged| %.4g, |ref| %.4g", step, "" if merged else " (not merged)",
                     stats.kept, stats.agreement, stats.update_norm, stats.merged_norm,
                     stats.ref_norm)
        for callback in self.callbacks:
            callback(stats)
