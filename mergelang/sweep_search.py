"""Searches for `mergelang sweep --search random|tpe|cma`, through optuna.

The search space is the sweep's grid: each axis with more than one value is a parameter
of the study. An axis of numbers is ordinal (an integer index into its values, sorted), so
TPE and CMA-ES can use that nearby values score alike; any other axis (strings, lists) is
categorical. Proposals are always grid values, so a point found by one search is reused
by the next search and by the grid.

The results file, not an optuna storage, is what makes a search resumable: before
proposing anything the study is told every finished point of the space as a trial, so a
rerun continues from the history (and a search after a grid starts from the grid's
points). `--trials N` counts distinct points in the results file: a rerun of a finished
search does nothing. A proposal of a point already scored is answered from the results
and does not count; after MAX_REPEATS of them in a row the search stops, as the sampler
has nothing new to offer.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator

from .diagnostics import error
from .params import Axis, Value
from .sweep import MAX_REPEATS, Record, Sweep, point_key

_EXTRA = {"optuna": "sweep", "cmaes": "sweep"}


def require(module: str, why: str):
    """Import an optional dependency, or say which extra installs it (exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = _EXTRA.get(module, module)
        raise error(f"{why} needs {module}, which is not installed", None,
                    hint=f"pip install 'mergelang[{extra}]'") from None


def search(sweep: Sweep, kind: str, trials: int, seed: int,
           on_point: Callable[[Record, bool], None] | None) -> list[Record]:
    optuna = require("optuna", f"--search {kind}")
    if kind == "cma":
        require("cmaes", "--search cma")
    samplers = {"random": optuna.samplers.RandomSampler, "tpe": optuna.samplers.TPESampler,
                "cma": optuna.samplers.CmaEsSampler}
    free = [a for a in sweep.axes if len(a.values) > 1]
    spaces = {a.name: _Space(a) for a in free}
    distributions = {name: space.distribution(optuna) for name, space in spaces.items()}
    with _quiet(optuna):
        study = optuna.create_study(direction="maximize", sampler=samplers[kind](seed=seed))
        known = tell_history(optuna, study, sweep, spaces, distributions)
        wanted = min(trials, sweep.size)
        done: list[Record] = []
        repeats = 0
        while len(known) < wanted and repeats < MAX_REPEATS:
            trial = study.ask(distributions)
            indices = {a.name: spaces[a.name].position(trial.params[a.name])
                       if a.name in spaces else 0 for a in sweep.axes}
            params, overrides = sweep.point(indices)
            record = known.get(point_key(params))
            new = record is None
            if new:
                record = sweep.evaluate(params, overrides)
                known[point_key(params)] = record
                repeats = 0
            else:
                repeats += 1
            study.tell(trial, record.objective)
            done.append(record)
            if on_point is not None:
                on_point(record, new)
    return done


def tell_history(optuna, study, sweep: Sweep, spaces: dict[str, _Space],
                 distributions: dict) -> dict[str, Record]:
    """Tell the study every finished point of its space, as a trial; those points by key."""
    known: dict[str, Record] = {}
    for record in sweep.finished():
        indices = {n: s.index(record.params[n]) for n, s in spaces.items()}
        fixed = all(record.params[a.name] == a.values[0] for a in sweep.axes
                    if a.name not in spaces)
        if fixed and None not in indices.values():
            known[point_key(record.params)] = record
            study.add_trial(optuna.trial.create_trial(
                params=indices, distributions=distributions, value=record.objective))
    return known


class _Space:
    """One axis as an optuna distribution over indices: ordinal when its values are all
    numbers (sorted, so neighbours are near), categorical otherwise."""

    def __init__(self, axis: Axis):
        self.axis = axis
        self.ordinal = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in axis.values)
        n = len(axis.values)
        self.order = sorted(range(n), key=lambda i: axis.values[i]) if self.ordinal \
            else list(range(n))

    def distribution(self, optuna):
        n = len(self.order)
        if self.ordinal:
            return optuna.distributions.IntDistribution(0, n - 1)
        return optuna.distributions.CategoricalDistribution(tuple(range(n)))

    def position(self, index: int) -> int:
        """The axis position of the study's index."""
        return self.order[index]

    def index(self, value: Value) -> int | None:
        """The study's index of a value, or None when the value is not on this axis."""
        key = point_key({"": value})
        for i, position in enumerate(self.order):
            if point_key({"": self.axis.values[position]}) == key:
                return i
        return None


@contextlib.contextmanager
def _quiet(optuna) -> Iterator[None]:
    """optuna logs every trial at INFO, and at WARNING that CMA-ES falls back to random
    sampling on one dimension or a categorical axis; the sweep shows its own progress."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


__all__ = ["require", "search"]
