"""`eval --lm-eval TASKS`: delegate standard benchmarks to lm-evaluation-harness.

Why delegate: its benchmarks (prompts, few-shot sampling, normalisation, metrics) are the
figures people compare with; re-implementing them would give numbers that look the same
and are not. It is an optional extra (`pip install "mergelang[lm-eval]"`); without it the
flag is an input error that says how to install it, before any model is loaded.

Offline use: TASKS is a comma-separated list of task names or local task YAML files (or
folders of them). A YAML task can read local data (`dataset_path: json` with
`dataset_kwargs: {data_files: ...}`), so nothing is fetched; a named hub task needs its
data set in the local Hugging Face cache (set HF_DATASETS_OFFLINE=1 to make sure).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..diagnostics import Diagnostic, MergeError

NOT_METRICS = {"alias", "sample_len", "sample_count"}  # bookkeeping in lm-eval's results
INSTALL = 'pip install "mergelang[lm-eval]"  (or: pip install lm-eval)'


@dataclass(frozen=True)
class HarnessTasks:
    names: tuple[str, ...]
    include: tuple[str, ...]  # folders of local task YAML files


def check_lm_eval(spec: str) -> HarnessTasks:
    """The tasks named by `spec`, after checking that lm-eval can be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MergeError(Diagnostic("--lm-eval needs lm-evaluation-harness, which is not "
                                    "installed", hint=INSTALL)) from None
    names, include = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise MergeError(Diagnostic(f"lm-eval task file not found: {item}"))
            include.append(str(path.resolve().parent))
            names.append(_task_name(path))
        elif path.is_dir():
            include.append(str(path.resolve()))
            names += [_task_name(p) for p in sorted(path.glob("*.y*ml"))]
        else:
            names.append(item)
    if not names:
        raise MergeError(Diagnostic("--lm-eval names no task", hint="e.g. --lm-eval my_task.yaml"))
    return HarnessTasks(tuple(names), tuple(dict.fromkeys(include)))


def _task_name(path: Path) -> str:
    """The `task:` a YAML file declares (its file name when it declares none)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise MergeError(Diagnostic(f"cannot read lm-eval task {path}: {exc}")) from None
    name = data.get("task") if isinstance(data, dict) else None
    return name if isinstance(name, str) else path.stem


def run_lm_eval(model: str, tasks: HarnessTasks, *, device: str = "cpu",
                batch_size: int = 16) -> list[dict]:
    """lm-eval's results for a model folder: one dict per (task, metric) with
    `{"task": "lm-eval:<task>", "metric": name, "value": number}`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(tasks.include) or None)
    try:
        out = lm_eval.simple_evaluate(model="hf",
                                      model_args={"pretrained": model, "dtype": "float32"},
                                      tasks=list(tasks.names), task_manager=manager,
                                      device=device, batch_size=batch_size)
    except Exception as exc:  # noqa: BLE001 - the harness raises many kinds; report, not crash
        raise MergeError(Diagnostic(f"lm-eval failed on {model}: {exc}",
                                    hint="is the task's data available offline?")) from None
    rows = []
    counts = (out or {}).get("n-samples", {})
    for task, metrics in (out or {}).get("results", {}).items():
        n = counts.get(task, {}).get("effective")
        for key, value in metrics.items():
            name = key.split(",")[0]  # "exact_match,none": metric, filter
            if isinstance(value, (int, float)) and name not in NOT_METRICS \
                    and not name.endswith("_stderr"):
                rows.append({"task": f"lm-eval:{task}:{name}", "n": n, "metric": name,
                             "value": float(value)})
    return rows
