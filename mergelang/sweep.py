"""`mergelang sweep`: merge and score a script at many values of its parameters.

A sweep is a set of points (one value for each swept `param`), a scorer, and a results
file. Each point is compiled with its values as overrides (so every check of the language
applies to it), merged, scored on the task files, and written to the results file as one
JSON line the moment it is done (LANGUAGE.md §6):

    {"params": {"density": 0.5}, "scores": {"add": 0.9, "reverse": 0.7}, "objective": 0.8}

The results file is the sweep's only state. Running the same sweep again reads it and
skips every point that already has a score for every task, so a killed sweep resumes where
it stopped; a search (`random`, `tpe`, `cma`, through optuna) is told the finished points
as its history before it proposes new ones. The objective is recomputed from the scores
each time, so a finished sweep can be reread under another `--objective`.

Small merges are made in memory (the plan executed into a `Collector`, the state dict
scored with the donor folder's config and tokenizer); large ones, and merges that change
the layer count, through a temporary model folder.

The scorer is `mergelang.eval.score`; a program (or a test) may pass its own with the
same call: `scorer(model, records, device=..., like=folder_or_None) -> [{"task",
"exact_match", ...}, ...]`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import api
from .devices import parse_devices
from .diagnostics import Diagnostic, MergeError, Source, Span, did_you_mean, error
from .execute import Collector, execute
from .params import Axis, Override, Value, from_json, to_json

IN_MEMORY_BYTES = 2 * 10**9
"""Merges whose output is at most this large are scored without writing a folder."""

SEARCHES = ("grid", "random", "tpe", "cma")
MAX_REPEATS = 200
"""A search stops after proposing this many already-scored points in a row."""
_CHECK_EVERY_VALUE = 200  # up to this many axis values, each is compiled before the sweep

if TYPE_CHECKING:
    from .cluster import Cluster

Scorer = Callable[..., list[dict]]


@dataclass(frozen=True)
class Record:
    """One finished point: its parameter values, each task's exact match, the objective."""

    params: dict[str, Value]
    scores: dict[str, float]
    objective: float

    def to_json(self) -> dict:
        return {"params": {k: to_json(v) for k, v in self.params.items()},
                "scores": self.scores, "objective": self.objective}


def point_key(params: Mapping[str, Value]) -> str:
    """A point's identity in the results file: its values as canonical JSON, numbers as
    floats (a density of 1 and one of 1.0 are the same point)."""
    return json.dumps({k: _same_numbers(v) for k, v in params.items()}, sort_keys=True)


def _same_numbers(value: Value) -> object:
    if isinstance(value, tuple):
        return [_same_numbers(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def objective_of(scores: Mapping[str, float], objective: str) -> float:
    """`mean` over tasks, `min` over tasks (the merge that hurts no skill), or one task."""
    if objective == "mean":
        return sum(scores.values()) / len(scores)
    if objective == "min":
        return min(scores.values())
    return scores[objective]


class Results:
    """The results file, read once and then appended to, one line per finished point.

    A last line without its newline is what a sweep killed while writing leaves: it is
    dropped (and the file cut back to its last whole line) rather than reported. Any
    other line that is not a result is an error at its line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, Record] = {}  # point key -> its latest record
        self.dropped: str | None = None
        if self.path.exists():
            self._read()
        elif not self.path.parent.is_dir():
            raise error(f"cannot write the results file {self.path}: its folder "
                        f"{self.path.parent} does not exist", None,
                        hint="create the folder, or choose another --results path")

    def _read(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"cannot read the results file {self.path}: "
                        f"{getattr(exc, 'strerror', None) or exc}", None,
                        hint="choose another --results path") from None
        source = Source(str(self.path), text)
        lines = text.split("\n")
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = _record(json.loads(line))
            except (ValueError, TypeError, KeyError, AttributeError):
                if number == len(lines):  # no newline after it: an interrupted write
                    os.truncate(self.path, len(text[:len(text) - len(line)].encode()))
                    self.dropped = f"dropped the unfinished last line of {self.path}"
                    return
                raise error(f"line {number} of the results file is not a sweep result",
                            Span(source, number, 1, number, len(line) + 1),
                            hint='each line is {"params": {...}, "scores": {...}, '
                                 '"objective": ...}; remove the line, or choose another '
                                 "--results file") from None
            self.records[point_key(record.params)] = record

    def finished(self, params: Mapping[str, Value], tasks: Sequence[str]) -> Record | None:
        record = self.records.get(point_key(params))
        return record if record is not None and all(t in record.scores for t in tasks) \
            else None

    def append(self, record: Record) -> None:
        """Write one line and make it durable before the next point starts."""
        line = json.dumps(record.to_json()) + "\n"
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise error(f"cannot write the results file {self.path}: {exc.strerror}", None,
                        hint="check the disk and the folder's permissions") from None
        self.records[point_key(record.params)] = record


def _record(obj: Any) -> Record:
    params, scores = obj["params"], obj["scores"]
    if not isinstance(params, dict) or not isinstance(scores, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values()):
        raise TypeError("not a result")
    return Record({k: from_json(v) for k, v in params.items()},
                  {k: float(v) for k, v in scores.items()}, float(obj.get("objective", 0)))


class Sweep:
    """A script, the values to try for its parameters, the tasks and the results file.

    `axes`: `Axis` objects (from `-D NAME=VALUES`) or a mapping of names to the values to
    try. `tasks`: task-file paths or `{"task", "prompt", "answer"}` records. `scorer`:
    what scores a model (default `mergelang.eval.score`), the hook for programs and tests.
    Raises MergeError for an unknown parameter, a value the script refuses, an unknown
    objective, or a bad task or results file, before anything is merged."""

    def __init__(self, script: str | Path, axes: Sequence[Axis] | Mapping[str, Sequence[Any]],
                 tasks: Sequence[str | Path | Mapping], results: str | Path, *,
                 objective: str = "mean", device: str = "cpu", scorer: Scorer | None = None,
                 in_memory_bytes: int = IN_MEMORY_BYTES):
        self.script = Path(script)
        self.axes = _axes(axes)
        self.device = device
        self.scorer = scorer
        self.in_memory_bytes = in_memory_bytes
        self._check_values()
        self.tasks = _load_tasks(tasks)
        self.task_names = list(dict.fromkeys(t["task"] for t in self.tasks))
        self.objective = _check_objective(objective, self.task_names)
        self.results = Results(results)

    @property
    def size(self) -> int:
        """How many points the grid has."""
        return math.prod(len(a.values) for a in self.axes)

    def grid(self) -> Iterator[tuple[dict[str, Value], list[Override]]]:
        """Every point, in order (the last axis varies fastest), with its overrides."""
        for indices in itertools.product(*(range(len(a.values)) for a in self.axes)):
            yield self.point(dict(zip((a.name for a in self.axes), indices, strict=True)))

    def point(self, indices: Mapping[str, int]) -> tuple[dict[str, Value], list[Override]]:
        """The point at these positions on the axes (an axis left out: its first value)."""
        overrides = [a.override(indices.get(a.name, 0)) for a in self.axes]
        return {o.name: o.value for o in overrides}, overrides

    def finished(self) -> list[Record]:
        """The results of this sweep's points (any search), each with the objective
        recomputed for this sweep's objective."""
        names = {a.name for a in self.axes}
        out = []
        for record in self.results.records.values():
            if set(record.params) == names and all(t in record.scores for t in self.task_names):
                scores = {t: record.scores[t] for t in self.task_names}
                out.append(Record(record.params, scores, objective_of(scores, self.objective)))
        return out

    def best(self) -> Record | None:
        """The finished point with the highest objective (the first one on a tie)."""
        return max(self.finished(), key=lambda r: r.objective, default=None)

    def run(self, search: str = "grid", trials: int | None = None, seed: int = 0,
            on_point: Callable[[Record, bool], None] | None = None,
            cluster: Cluster | None = None) -> list[Record]:
        """Score the points not yet in the results file. `search`: `grid` (every point),
        or `random`, `tpe`, `cma` for `trials` points chosen by an optuna sampler
        seeded with `seed`. `on_point(record, new)` is called for each point, `new`
        False for one read from the results file. Returns this run's records.
        `cluster`: a `mergelang.cluster.Cluster` whose workers merge and score points
        in parallel (see docs/cluster.md)."""
        if search not in SEARCHES:
            raise error(f'unknown search "{search}"', None,
                        hint=did_you_mean(search, SEARCHES) or f"use one of {', '.join(SEARCHES)}")
        if search != "grid" and (trials is None or trials < 1):
            raise error(f"--search {search} needs --trials N (N >= 1)", None,
                        hint=f"e.g. --search {search} --trials 20")
        if cluster is not None:
            from .cluster.sweep import run_sweep
            cluster.check_device(self.device)  # before any point: the workers' devices
            return run_sweep(self, cluster, search, trials, seed, on_point)
        parse_devices(self.device)
        if search == "grid":
            return self._grid(on_point)
        from .sweep_search import search as run_search
        return run_search(self, search, trials, seed, on_point)

    def _grid(self, on_point) -> list[Record]:
        done = []
        for params, overrides in self.grid():
            record = self.results.finished(params, self.task_names)
            new = record is None
            if new:
                record = self.evaluate(params, overrides)
            else:
                scores = {t: record.scores[t] for t in self.task_names}
                record = Record(record.params, scores, objective_of(scores, self.objective))
            done.append(record)
            if on_point is not None:
                on_point(record, new)
        return done

    def evaluate(self, params: dict[str, Value], overrides: list[Override]) -> Record:
        """Merge and score one point, and append its line to the results file."""
        program = api.load(self.script, params=overrides)
        return self.record(params, self._score(program))

    def record(self, params: dict[str, Value], rows: list[dict]) -> Record:
        """The record of a point from the scorer's rows, appended to the results file."""
        scores = {r["task"]: float(r["exact_match"]) for r in rows}
        missing = [t for t in self.task_names if t not in scores]
        if missing:
            raise error(f"the scorer gave no score for {', '.join(missing)}", None)
        scores = {t: scores[t] for t in self.task_names}
        record = Record(params, scores, objective_of(scores, self.objective))
        self.results.append(record)
        return record

    def _score(self, program: api.Program) -> list[dict]:
        return score(program, self.tasks, self.scorer, self.device, self.in_memory_bytes,
                     self.results.path.resolve().parent)

    def _check_values(self) -> None:
        """Compile the script with each value of each axis (the others at their first),
        so that an unknown name or a refused value stops the sweep before any merge."""
        count = sum(len(a.values) for a in self.axes)
        first = [a.override(0) for a in self.axes]
        api.load(self.script, params=first)
        for i, axis in enumerate(self.axes):
            n = len(axis.values)
            picks = range(1, n) if count <= _CHECK_EVERY_VALUE else [n - 1] if n > 1 else []
            for j in picks:
                api.load(self.script, params=[*first[:i], axis.override(j), *first[i + 1:]])


def score(program: api.Program, tasks: list[dict], scorer: Scorer | None, device: str,
          in_memory_bytes: int, place: Path | None) -> list[dict]:
    """Merge and score one point: in memory when small, else through a temporary folder
    in `place` (None: the system's); the scorer's rows."""
    scorer = scorer or _default_scorer()
    with program.plan() as p:
        donor = p.bound.donor
        folder = donor.source.folder if donor is not None else None
        if (p.output_bytes <= in_memory_bytes and folder is not None
                and p.num_layers == donor.num_layers):
            merged = Collector(p.tensors)
            execute(p, merged.sink, device)
            return scorer(merged.tensors, tasks, device=device, like=folder)
    with tempfile.TemporaryDirectory(prefix=".mergelang-sweep-", dir=place) as tmp:
        out = Path(tmp) / "model"
        program.run(out, device)
        return scorer(out, tasks, device=device, like=None)


def _axes(axes: Sequence[Axis] | Mapping[str, Sequence[Any]]) -> list[Axis]:
    from .params import from_python

    if isinstance(axes, Mapping):
        made = []
        for name, values in axes.items():
            values = values if isinstance(values, (list, tuple)) else [values]
            made.append(Axis(name, tuple(from_python(v, f'parameter "{name}"')
                                         for v in values)))
        axes = made
    seen: dict[str, Axis] = {}
    for a in axes:
        if a.name in seen:
            raise error(f'parameter "{a.name}" is given twice', a.name_span,
                        hint="give each parameter one -D NAME=VALUES")
        if not a.values:
            raise error(f'parameter "{a.name}" has no values to try', a.name_span)
        seen[a.name] = a
    return list(axes)


def _load_tasks(tasks: Sequence[str | Path | Mapping]) -> list[dict]:
    from .eval.tasks import check_records, load_tasks

    tasks = list(tasks)
    if not tasks:
        raise error("a sweep needs tasks to score the merges on", None,
                    hint="e.g. --tasks tasks/add.jsonl tasks/reverse.jsonl")
    if all(isinstance(t, Mapping) for t in tasks):
        return check_records(tasks)
    if any(isinstance(t, Mapping) for t in tasks):
        raise error("give tasks as files or as records, not both", None)
    return load_tasks(tasks)


def _check_objective(objective: str, tasks: list[str]) -> str:
    if objective in ("mean", "min") or objective in tasks:
        return objective
    raise MergeError(Diagnostic(
        f'unknown objective "{objective}": it is neither mean, min nor a task',
        hint=did_you_mean(objective, [*tasks, "mean", "min"])
        or f"the tasks are {', '.join(tasks)}"))


def _default_scorer() -> Scorer:
    from .eval import score

    return score


__all__ = ["IN_MEMORY_BYTES", "Record", "Results", "SEARCHES", "Sweep", "objective_of",
           "point_key"]
