"""What a cluster's workers run: a round of a model-wide sweep, or the shards of a write;
and the small, plain data each task carries (never an open file map: each worker opens
the models itself)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..devices import parse_devices
from ..diagnostics import Diagnostic, MergeError, error
from ..execute import execute, feed_model_wide, model_reductions
from ..io.dtypes import FLOAT8
from ..io.errors import ModelFileError
from ..io.hf import SCRIPT_KEY
from ..io.write import OutputTensor, ShardedWriter
from ..plan import Plan
from ..schedule import Kernel, schedule

if TYPE_CHECKING:
    from ..api import Program

PARTS = ".parts"
"""The folder, inside the output's temporary folder, where write tasks build their shards."""


# --- what travels to the workers -------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every task of one run shares: small and picklable. Each worker compiles the
    script's text again (its path resolves the models and imports) with these values."""

    text: str
    path: str | None
    params: dict[str, Any]
    seed: int | None
    dtype: str | None
    out_dtype: str | None
    device: str
    budget: int
    layout: tuple[OutputTensor, ...]  # every output tensor, in the plan's order
    shard_size: int
    folder: str                       # the output's temporary folder
    topic: str                        # where write tasks report finished tensors
    threads: int | None = None        # torch threads per task (a local cluster sets it)


@dataclass(frozen=True)
class SweepTask:
    """One round of the model-wide sweep over a run of the plan's tensors. `sites`: each
    call site still sweeping -> (its elements over the whole model, the combined
    partials of the earlier rounds)."""

    job: Job
    names: tuple[str, ...]
    sites: dict[str, tuple[int, list]]


@dataclass(frozen=True)
class WriteTask:
    """Compute the tensors of some whole shards and write them. `found`: call site ->
    tensor -> what the model-wide reduction gives that tensor."""

    job: Job
    index: int
    shards: tuple[int, ...]
    names: tuple[str, ...]
    found: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """A task's answer: its value, or the diagnostics of a script or input error (sent
    back as data, so they reach the user as a local run's would, not as a traceback)."""

    value: Any = None
    diagnostics: tuple[Diagnostic, ...] = ()


def sweep_part(task: SweepTask) -> Outcome:
    """Feed this round of the model-wide reductions with the task's tensors; returns each
    call site's partial."""
    def work(program: Program, p: Plan) -> dict[str, Any]:
        kernels = _in_order(schedule(p.only(task.names), task.job.budget), task.names)
        made = model_reductions(kernels, {site: n for site, (n, _) in task.sites.items()})
        for site, reduction in made.items():
            for combined in task.sites[site][1]:  # bring it to the model's state
                reduction.merge([combined])
                reduction.finish_sweep()
        feed_model_wide(p, kernels, made, task.job.device)
        return {site: reduction.partial() for site, reduction in made.items()}
    return _on_worker(task.job, work)


def write_part(task: WriteTask) -> Outcome:
    """Compute the task's tensors and write its shards into the temporary folder; returns
    the count of NaN and infinite values per tensor."""
    job = task.job
    folder = Path(job.folder)
    mine = folder / PARTS / f"{task.index:05d}"

    def work(program: Program, p: Plan) -> dict[str, int] | Outcome:
        sub = p.only(task.names)
        _check_layout(job, sub, task.names)
        # made just before the writer, never with parents, so that a temporary folder
        # removed by a failed or interrupted run is not made again by a task still running
        try:
            (folder / PARTS).mkdir(exist_ok=True)
            if mine.exists():  # an earlier attempt at this task, on a worker that died
                shutil.rmtree(mine)
            mine.mkdir()
        except FileNotFoundError:
            return Outcome(diagnostics=(_not_shared(folder),))
        writer = ShardedWriter(mine, list(job.layout), job.shard_size,
                               {SCRIPT_KEY: program.source_text}, shards=task.shards)
        non_finite: Counter[str] = Counter()
        report = _reporter(job.topic)

        def sink(name: str, row0: int, part: torch.Tensor) -> None:
            seen = part.float() if part.dtype in FLOAT8 else part  # torch sums no float8
            if seen.is_floating_point() and seen.numel() and not torch.isfinite(seen.sum()):
                non_finite[name] += int((~torch.isfinite(seen)).sum())
            writer.write_rows(name, row0, part)

        found = {site: _Found(by_tensor) for site, by_tensor in task.found.items()}
        try:
            execute(sub, sink, job.device, False, lambda t: report(task.index, t.name),
                    job.budget, model_wide=found)
        except MergeError as exc:
            raise MergeError(program.in_script(exc.diagnostics)) from None
        writer.close()
        for i in task.shards:
            os.replace(writer.paths[i], folder / writer.paths[i].name)
        return dict(non_finite)

    outcome = _on_worker(job, work)
    shutil.rmtree(mine, ignore_errors=True)
    return outcome.value if isinstance(outcome.value, Outcome) else outcome


def _on_worker(job: Job, work: Callable[[Program, Plan], Any]) -> Outcome:
    """Compile and plan the job's script here, then `work`; script and input errors come
    back as diagnostics."""
    from ..api import Program

    prepare_worker(job.threads)
    try:
        program = Program(job.text, job.path, job.params)
        plan = program.plan(job.seed, job.dtype, job.out_dtype)
    except (MergeError, ModelFileError) as exc:
        # the client compiled and planned the same text without this error
        note = f"found on {_worker_address()}, which sees other files than the client"
        return Outcome(diagnostics=tuple(dataclasses.replace(d, notes=(*d.notes, note))
                                         for d in diagnostics_of(exc)))
    try:
        with plan as p:
            return Outcome(work(program, p))
    except (MergeError, ModelFileError) as exc:
        return Outcome(diagnostics=tuple(diagnostics_of(exc)))


def diagnostics_of(exc: MergeError | ModelFileError) -> list[Diagnostic]:
    if isinstance(exc, ModelFileError):  # as Program.run reports a file's error
        return [Diagnostic(exc.message, hint=exc.hint)]
    return list(exc.diagnostics)


def prepare_worker(threads: int | None) -> None:
    """Set up this worker for merging. A worker process that Dask's nanny started has
    MALLOC_TRIM_THRESHOLD_ at 64 KiB, so glibc hands every freed tensor back to the
    kernel and faults fresh pages in for the next (measured on the 270M TIES merge in one
    worker: 30 s of system time against 1.5 s, and twice the wall time): there the
    allocator is tuned as the command tunes its own process. (A worker thread inside
    another program leaves that program's allocator alone.) torch's threads are set
    when the cluster says how many (a local one does)."""
    global _PREPARED
    if not _PREPARED and "MALLOC_TRIM_THRESHOLD_" in os.environ:
        from ..io.allocator import keep_freed_memory

        keep_freed_memory()
        _PREPARED = True
    if threads is not None:
        torch.set_num_threads(threads)


_PREPARED = False


class _Found:
    """A model-wide reduction's results as a write task receives them."""

    def __init__(self, by_tensor: dict[str, Any]):
        self.by_tensor = by_tensor

    def result_for(self, tensor: str) -> Any:
        return self.by_tensor[tensor]


def _in_order(kernels: list[Kernel], names: Sequence[str]) -> list[Kernel]:
    place = {name: i for i, name in enumerate(names)}
    return sorted(kernels, key=lambda k: place[k.tensor.name])


def _check_layout(job: Job, p: Plan, names: Sequence[str]) -> None:
    """The worker's plan of its tensors must be the client's: else it sees other files."""
    declared = {t.name: t for t in job.layout if t.name in set(names)}
    planned = {t.name: OutputTensor(t.name, t.shape, t.out_dtype) for t in p.tensors}
    for name, want in declared.items():
        got = planned.get(name)
        if got != want:
            seen = "no such tensor" if got is None else \
                f"{list(got.shape)} {str(got.dtype).removeprefix('torch.')}"
            raise error(f'a Dask worker plans tensor "{name}" differently from this machine '
                        f"({seen}, not {list(want.shape)} "
                        f"{str(want.dtype).removeprefix('torch.')})", None,
                        notes=(f"on {_worker_address()}",),
                        hint="every worker must see the same model files at the same paths")


def _not_shared(folder: Path) -> Diagnostic:
    return Diagnostic(f"a Dask worker cannot see the output's temporary folder {folder}",
                      notes=(f"on {_worker_address()}",),
                      hint="write the output to a folder every worker shares (the same path "
                           "on a shared filesystem)")


def device_problem(device: str) -> tuple[str, str | None] | None:
    """Why this process cannot compute on `device` (message, hint), or None: run on each
    worker before a merge."""
    try:
        parse_devices(device)
    except MergeError as exc:
        first = exc.diagnostics[0]
        return first.message, first.hint
    return None


def _worker_address() -> str:
    try:
        from distributed import get_worker
        return f"the Dask worker {get_worker().address}"
    except (ImportError, ValueError):
        return "this process"


def _reporter(topic: str) -> Callable[[int, str], None]:
    """Tells the client each tensor written, through the scheduler's events (nothing when
    not run by a Dask worker)."""
    try:
        from distributed import get_worker
        worker = get_worker()
    except (ImportError, ValueError):
        return lambda index, name: None
    return lambda index, name: worker.log_event(topic, (index, name))


