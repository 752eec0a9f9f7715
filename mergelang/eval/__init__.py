"""Does the merge work? Scoring models on tasks (LANGUAGE.md §6, `mergelang eval`).

    from mergelang.eval import score, load_tasks
    score("merged/", ["examples/tasks/math.jsonl"])          # a folder
    score(state_dict, tasks, like="examples/models/base")   # a merge held in memory
    # -> [{"task": "math", "n": 200, "exact_match": 0.93, "loglik": -0.08}, ...]

A sweep scores many merges; each is scored from memory when it is small, so nothing here
assumes a model was written to disk. transformers is imported only when a model is
loaded, so `import mergelang` stays light.
"""

from .against import Inputs, annotate, kept_by_finetune, kept_gain
from .models import LoadedModel, load_model
from .score import perplexity, score, score_loaded
from .tasks import check_records, load_tasks

__all__ = ["score", "score_loaded", "perplexity", "load_tasks", "check_records", "load_model",
           "LoadedModel", "Inputs", "annotate", "kept_gain", "kept_by_finetune"]
