"""What a merge cost each skill: its score next to the best input's, and the share of each
fine-tune's gain over the base that it keeps (`eval --against BASE FT...`).

Why these two numbers: "is the merge good?" has two halves. Next to the best input, the
score says whether any model you already had does better on that task. The kept gain,
(merge - base) / (fine-tune - base) on the fine-tune's own tasks, says how much of the
skill a fine-tune brought survived the merge: 1.0 is all of it, 0 is none, a negative
value means the merge is worse than the base. A fine-tune's own tasks are those it
scores best on among the inputs and improves over the base by at least MIN_GAIN; on a
task where no fine-tune gains that much, the fraction would divide by noise and is left
out (None).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_GAIN = 0.05  # exact match points a fine-tune must gain on a task to own it
METRIC = "exact_match"


@dataclass(frozen=True)
class Inputs:
    """Scores of the merge's inputs: model -> task -> result dict (as `score` returns)."""

    base: str
    finetunes: tuple[str, ...]
    scores: dict[str, dict[str, dict]]

    def value(self, model: str, task: str) -> float | None:
        result = self.scores.get(model, {}).get(task)
        return None if result is None else result.get(METRIC)

    def best(self, task: str) -> tuple[str, float] | None:
        """The input with the highest score on `task` (the base included)."""
        found = [(self.value(m, task), m) for m in (self.base, *self.finetunes)]
        found = [(v, m) for v, m in found if v is not None]
        if not found:
            return None
        value, model = max(found, key=lambda vm: vm[0])
        return model, value

    def owner(self, task: str) -> str | None:
        """The fine-tune whose skill `task` is: best among the fine-tunes, and ahead of the
        base by MIN_GAIN."""
        base = self.value(self.base, task)
        found = [(self.value(m, task), m) for m in self.finetunes]
        found = [(v, m) for v, m in found if v is not None]
        if base is None or not found:
            return None
        value, model = max(found, key=lambda vm: vm[0])
        return model if value - base >= MIN_GAIN else None


def kept_gain(inputs: Inputs, task: str, merged: float) -> float | None:
    """Share of the task owner's gain over the base that a merge scoring `merged` keeps."""
    owner = inputs.owner(task)
    if owner is None:
        return None
    base = inputs.value(inputs.base, task)
    return (merged - base) / (inputs.value(owner, task) - base)


def annotate(result: dict, inputs: Inputs) -> dict:
    """A merge's result for one task, with the best input and the kept gain added."""
    out = dict(result)
    best = inputs.best(result["task"])
    if best is not None:
        out["best_input"], out["best_input_exact_match"] = best
    out["base_exact_match"] = inputs.value(inputs.base, result["task"])
    out["owner"] = inputs.owner(result["task"])
    out["kept_gain"] = kept_gain(inputs, result["task"], result[METRIC])
    return out


def kept_by_finetune(inputs: Inputs, merged: dict[str, dict]) -> dict[str, float | None]:
    """For each fine-tune, the share of its gain the merge keeps, pooled over the tasks it
    owns: sum(merge - base) / sum(fine-tune - base). None for a fine-tune owning no task."""
    out: dict[str, float | None] = {}
    for ft in inputs.finetunes:
        tasks = [t for t in merged if inputs.owner(t) == ft]
        gain = sum(inputs.value(ft, t) - inputs.value(inputs.base, t) for t in tasks)
        kept = sum(merged[t][METRIC] - inputs.value(inputs.base, t) for t in tasks)
        out[ft] = kept / gain if tasks and gain > 0 else None
    return out
