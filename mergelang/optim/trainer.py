"""The online-merging statistics in transformers.Trainer's logs.

    opt = OnDAREAdamW(model.named_parameters(), lr=1e-5, reference=sft, base=pretrained)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    OnlineMergingCallback.attach(trainer, opt)

Each training log (every `logging_steps`) then carries "online/kept", "online/agreement",
"online/update_norm", "online/merged_norm" and "online/ref_norm": the means over the merging
steps since the previous log. `attach` puts the callback first, so the printer and the
reporters (TensorBoard, W&B, ...) see the values; they are also added to
`trainer.state.log_history`.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from .monitor import StepStats


class OnlineMergingCallback(TrainerCallback):
    """Adds an online merging optimizer's statistics to Trainer's training logs."""

    def __init__(self, optimizer: Any, prefix: str = "online/"):
        self.prefix = prefix
        self.pending: list[StepStats] = []
        optimizer.monitor.add(self._collect)

    @classmethod
    def attach(cls, trainer: Any, optimizer: Any, prefix: str = "online/"
               ) -> OnlineMergingCallback:
        """Make one for `optimizer` and put it first among `trainer`'s callbacks."""
        callback = cls(optimizer, prefix)
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def _collect(self, stats: StepStats) -> None:
        if stats.merged:
            self.pending.append(stats)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or not self.pending:
            return
        values: dict[str, float] = {}
        for key in self.pending[0].as_dict(self.prefix):
            seen = [v for s in self.pending
                    if not math.isnan(v := s.as_dict(self.prefix)[key])]
            values[key] = sum(seen) / len(seen) if seen else math.nan
        self.pending.clear()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(values)
