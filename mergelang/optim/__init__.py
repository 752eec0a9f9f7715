"""Online merging optimizers (Lu et al. 2024, "Online Merging Optimizers for Boosting
Rewards and Mitigating Tax in Alignment"): a merge rule applied at every training step.

- `OnDAREAdamW`, `OnTIESAdamW`: drop-in torch optimizers, AdamW whose update is merged with
  the reference task vector tau = reference - base at every step (stdlib/online.merge's
  `ondare` and `onties`, computed on the sparse tau without the compiler);
- `OnlineMerging`: wraps any torch optimizer and replaces its update by a mergelang
  expression, compiled once (`"onties(update, ref, keep=0.1, alpha=0.3)"`, or a rule of
  your own);
- `StepStats` and `OnlineMergingCallback`: per-step statistics for a callback, logging
  ("mergelang.optim" at DEBUG) and transformers.Trainer's logs.

See docs/online.md.
"""

from __future__ import annotations

from typing import Any

from .adamw import OnlineAdamW
from .monitor import StepStats
from .rules import OnDAREAdamW, OnTIESAdamW
from .wrapper import OnlineMerging

__all__ = ["OnDAREAdamW", "OnTIESAdamW", "OnlineMerging", "OnlineAdamW", "StepStats",
           "OnlineMergingCallback"]


def __getattr__(name: str) -> Any:
    # the Trainer callback imports transformers: only when asked for
    if name == "OnlineMergingCallback":
        from .trainer import OnlineMergingCallback
        return OnlineMergingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
