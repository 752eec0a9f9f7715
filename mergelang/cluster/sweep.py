"""`mergelang sweep ... --scheduler ADDRESS | --workers N`: a sweep's points merged and
scored on the workers, in parallel.

A point is a task: its worker compiles the script with the point's values, merges (in
memory when small, else in a temporary folder on its own machine) and scores the merge,
and sends back the scorer's rows. The client writes each point's line to the results
file the moment it arrives, so the results file stays the sweep's only state: a sweep
stopped in any way resumes as a single-process one does, and the two can take turns on
one results file.

A grid submits every point that is not in the results file at once (Dask queues them).
A search keeps as many points in flight as the cluster has worker threads. Each proposal
is an optuna trial left unanswered until its point is scored, so the sampler knows what
is pending: TPE is made with `constant_liar`, which counts pending trials as if they
scored badly, so parallel proposals spread out instead of repeating each other. A
proposal of a point already in flight waits for that point's score instead of merging
it twice. With several points in flight the order in which scores come back depends on
the workers, so a parallel search is not repeatable point for point (a grid is).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..diagnostics import MergeError
from ..io.errors import ModelFileError
from ..params import Value, text
from ..sweep import MAX_REPEATS, Record, Scorer, Sweep, objective_of, point_key
from .pool import Pool
from .tasks import Outcome, diagnostics_of, prepare_worker

if TYPE_CHECKING:
    from .client import Cluster


@dataclass(frozen=True)
class PointTask:
    """One point: the script (text and path), its values, the task records, the scorer
    (None: mergelang.eval.score; any other must be importable on the workers)."""

    text: str
    path: str
    params: dict[str, Value]
    tasks: list[dict]
    scorer: Scorer | None
    device: str
    in_memory_bytes: int
    threads: int | None = None


def score_point(task: PointTask) -> Outcome:
    """On a worker: compile, merge and score one point; the scorer's rows."""
    from ..api import Program
    from ..sweep import score

    prepare_worker(task.threads)
    try:
        program = Program(task.text, task.path, task.params)
        return Outcome(score(program, task.tasks, task.scorer, task.device,
                             task.in_memory_bytes, None))
    except (MergeError, ModelFileError) as exc:
        return Outcome(diagnostics=tuple(diagnostics_of(exc)))


def run_sweep(sweep: Sweep, cluster: Cluster, search: str, trials: int | None, seed: int,
              on_point: Callable[[Record, bool], None] | None) -> list[Record]:
    """`Sweep.run` with the points scored on the cluster's workers."""
    script = sweep.script.resolve()
    source = script.read_text(encoding="utf-8")  # compiled already (Sweep checked it)

    def task(params: dict[str, Value]) -> PointTask:
        return PointTask(source, str(script), dict(params), sweep.tasks, sweep.scorer,
                         sweep.device, sweep.in_memory_bytes, cluster.threads)

    tell = on_point or (lambda record, new: None)
    with Pool(cluster.connected()) as pool:
        if search == "grid":
            return _grid(sweep, pool, task, tell)
        parallel = max(1, sum(cluster.connected().nthreads().values()))
        return _search(sweep, pool, task, search, trials or 1, seed, parallel, tell)


def _grid(sweep: Sweep, pool: Pool, task: Callable[[dict], PointTask],
          tell: Callable[[Record, bool], None]) -> list[Record]:
    done = []
    for params, _ in sweep.grid():
        record = sweep.results.finished(params, sweep.task_names)
        if record is None:
            pool.submit(score_point, task(params), params, _what(params))
            continue
        done.append(_again(sweep, record))
        tell(done[-1], False)
    for params, rows in pool.answers():
        done.append(sweep.record(params, rows))
        tell(done[-1], True)
    return done


def _search(sweep: Sweep, pool: Pool, task: Callable[[dict], PointTask], kind: str,
            trials: int, seed: int, parallel: int,
            tell: Callable[[Record, bool], None]) -> list[Record]:
    from ..sweep_search import _quiet, _Space, require, tell_history

    optuna = require("optuna", f"--search {kind}")
    if kind == "cma":
        require("cmaes", "--search cma")
    samplers = {"random": lambda: optuna.samplers.RandomSampler(seed=seed),
                "tpe": lambda: optuna.samplers.TPESampler(seed=seed, constant_liar=True),
                "cma": lambda: optuna.samplers.CmaEsSampler(seed=seed)}
    spaces = {a.name: _Space(a) for a in sweep.axes if len(a.values) > 1}
    distributions = {name: space.distribution(optuna) for name, space in spaces.items()}
    with _quiet(optuna):
        study = optuna.create_study(direction="maximize", sampler=samplers[kind]())
        known = tell_history(optuna, study, sweep, spaces, distributions)
        wanted = min(trials, sweep.size)
        flying: dict[str, list[Any]] = {}  # point key -> the trials waiting for its score
        done: list[Record] = []
        repeats = 0
        while True:
            while (len(flying) < parallel and len(known) + len(flying) < wanted
                   and repeats < MAX_REPEATS):
                trial = study.ask(distributions)
                params, _ = sweep.point({a.name: spaces[a.name].position(trial.params[a.name])
                                         if a.name in spaces else 0 for a in sweep.axes})
                key = point_key(params)
                if key in known:  # answered from the results, as a single-process search
                    study.tell(trial, known[key].objective)
                    repeats += 1
                    done.append(known[key])
                    tell(known[key], False)
                elif key in flying:
                    flying[key].append(trial)
                    repeats += 1
                else:
                    flying[key] = [trial]
                    pool.submit(score_point, task(params), params, _what(params))
            if not flying:
                return done
            params, rows = pool.next()
            record = sweep.record(params, rows)
            key = point_key(params)
            known[key] = record
            repeats = 0
            for trial in flying.pop(key):
                study.tell(trial, record.objective)
            done.append(record)
            tell(record, True)


def _again(sweep: Sweep, record: Record) -> Record:
    """A finished point as this sweep scores it (its tasks, its objective)."""
    scores = {t: record.scores[t] for t in sweep.task_names}
    return Record(record.params, scores, objective_of(scores, sweep.objective))


def _what(params: dict[str, Value]) -> str:
    return "the point " + ", ".join(f"{k}={text(v)}" for k, v in params.items())
