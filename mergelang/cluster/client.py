"""The client's side of a cluster run: plan the tasks, run them on Dask, combine the
model-wide partials in the plan's order, and finish the output folder."""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import queue
import secrets
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..diagnostics import Diagnostic, MergeError, error
from ..execute import _report, model_reductions
from ..io.hf import SCRIPT_KEY
from ..io.write import OutputTensor, ShardedWriter
from ..plan import Plan, TensorPlan
from ..schedule import Kernel, Order, schedule
from .connect import connect, dashboard_link, import_dask, start_local
from .pool import Pool
from .tasks import (
    PARTS,
    Job,
    Outcome,
    SweepTask,
    WriteTask,
    device_problem,
    sweep_part,
    write_part,
)

if TYPE_CHECKING:
    from distributed import Client

    from ..api import Program

class Cluster:
    """A Dask cluster that merges: the scheduler at `scheduler` (an address such as
    tcp://10.0.0.5:8786, or the path of a scheduler file), or a local cluster of `workers`
    processes started here and stopped on close. Use it in a `with` block and pass it to
    `Program.run(..., cluster=...)`, once or for many runs.

    `task_size`: output bytes a write task covers at most (whole shards are grouped up to
    it; default: one shard per task); it also sizes the runs of tensors a model-wide sweep
    task feeds (default: the shard size). `say`: where to print the dashboard's address.
    Raises MergeError when dask is not installed or the scheduler cannot be reached."""

    def __init__(self, scheduler: str | None = None, workers: int | None = None, *,
                 task_size: int | None = None, say: Callable[[str], None] | None = None):
        if (scheduler is None) == (workers is None):
            raise error("give either a scheduler address or a number of workers", None,
                        hint="--scheduler tcp://HOST:8786, or --workers 2 for a local cluster")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or workers < 1):
            raise error(f"--workers must be a whole number of at least 1, not {workers!r}",
                        None, hint="e.g. --workers 2")
        if task_size is not None and task_size < 1:
            raise error(f"the task size must be at least one byte, not {task_size}", None)
        import_dask()
        self.task_size = task_size
        self.say = say
        self._local = None
        self.threads: int | None = None  # torch's, in each task (None: the worker's)
        if workers is not None:
            self._local, self.client = start_local(workers)
            self.threads = max(1, (os.cpu_count() or 1) // workers)
        else:
            self.client = connect(scheduler)
        link = dashboard_link(self.client)
        # a local cluster's dashboard page only says to install bokeh when it is missing
        if link and say is not None and (scheduler is not None
                                         or importlib.util.find_spec("bokeh") is not None):
            say(f"Dask dashboard: {link}")

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Disconnect; a local cluster is stopped."""
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        local, self._local = self._local, None
        if local is not None:
            with contextlib.suppress(Exception):
                local.close()

    def connected(self) -> Client:
        """The Dask client; a MergeError once the cluster is closed."""
        if self.client is None:
            raise error("this cluster is closed", None, hint="use it inside its `with` block")
        return self.client

    def check_device(self, device: str) -> None:
        """A MergeError unless every worker can compute on `device`: the workers run the
        merge, so their GPUs count, not this machine's (a client without a GPU may send
        `cuda` work to workers that have one)."""
        answers = self.connected().run(device_problem, device)
        for worker, problem in sorted(answers.items()):
            if problem is not None:
                message, hint = problem
                raise error(message, None, hint=hint, notes=(f"on the Dask worker {worker}",))

    def write(self, program: Program, p: Plan, folder: Path, device: str, shard_bytes: int,
              strict: bool, progress: Callable[[TensorPlan], None] | None, budget: int,
              order: Order | None = None) -> list[Diagnostic]:
        """What `Program.run` does locally (`api._write`), done by the workers: the shards
        of `p` into `folder`, then the folder's other files. `order` is not used: each
        task computes its tensors in the order of the input files."""
        from ..api import write_folder_files

        self.connected()

        job = Job(program.source_text,
                  str(program.path.resolve()) if program.path is not None else None,
                  dict(program.params), p.seed, p.bound.lowered.dtype,
                  p.bound.lowered.out_dtype, device, budget,
                  tuple(OutputTensor(t.name, t.shape, t.out_dtype) for t in p.tensors),
                  shard_bytes, str(folder), f"mergelang-{secrets.token_hex(8)}", self.threads)
        layout = ShardedWriter(folder, list(job.layout), shard_bytes,
                               {SCRIPT_KEY: program.source_text}, shards=())
        kernels = schedule(p, budget)
        found = self._sweep(job, kernels, self.task_size or shard_bytes)
        shard_of = {path.name: i for i, path in enumerate(layout.paths)}
        names: list[list[str]] = [[] for _ in layout.paths]
        sizes = [0] * len(layout.paths)
        for t in p.tensors:
            names[shard_of[layout.weight_map[t.name]]].append(t.name)
            sizes[shard_of[layout.weight_map[t.name]]] += t.nbytes
        groups = _group(list(range(len(layout.paths))), sizes, self.task_size)
        tasks = []
        for index, group in enumerate(groups):
            mine = tuple(n for i in group for n in names[i])
            tasks.append(WriteTask(job, index, tuple(group), mine,
                                   {site: {n: by[n] for n in mine if n in by}
                                    for site, by in found.items()}))
        by_name = {t.name: t for t in p.tensors}
        counts = _Progress(progress, by_name)
        outcomes = self._run(write_part, tasks, _what, job.topic, counts)
        non_finite: Counter[str] = Counter()
        for value in outcomes:
            non_finite.update(value)
        _check_landed(folder, layout, job.layout)
        shutil.rmtree(folder / PARTS, ignore_errors=True)
        layout.write_index()
        write_folder_files(program, p, folder)
        try:
            return program.in_script(_report(p, non_finite, strict))
        except MergeError as exc:
            raise MergeError(program.in_script(exc.diagnostics)) from None

    def _sweep(self, job: Job, kernels: list[Kernel], size: int) -> dict[str, dict[str, Any]]:
        """The model-wide reductions, swept over the whole model in rounds of tasks; what
        each gives each tensor (call site -> tensor -> result)."""
        numel: Counter[str] = Counter()
        for k in kernels:
            for node in k.model_pass.reductions if k.model_pass else ():
                numel[node.attr[1]] += k.numel
        made = model_reductions(kernels, numel)
        combined: dict[str, list] = {site: [] for site in made}
        sweeping = dict(made)
        for _ in range(max((r.sweeps(2) for r in made.values()), default=0)):
            if not sweeping:
                break
            fed = [k for k in kernels if k.model_pass and any(
                n.attr[1] in sweeping for n in k.model_pass.reductions)]
            runs = _runs([k.tensor.name for k in fed], [k.tensor.nbytes for k in fed], size)
            state = {site: (numel[site], list(combined[site])) for site in sweeping}
            partials = self._run(sweep_part, [SweepTask(job, run, state) for run in runs],
                                 _what)
            for site, reduction in sweeping.items():
                reduction.merge([part[site] for part in partials if site in part])
            sweeping = {site: r for site, r in sweeping.items() if not r.finish_sweep()}
            for site, reduction in sweeping.items():
                combined[site].append(reduction.partial())
        found: dict[str, dict[str, Any]] = {}
        for k in kernels:
            for node in k.model_pass.reductions if k.model_pass else ():
                site = node.attr[1]
                found.setdefault(site, {})[k.tensor.name] = made[site].result_for(
                    k.tensor.name)
        return found

    def _run(self, fn: Callable[[Any], Outcome], tasks: list, what: Callable[[Any], str],
             topic: str | None = None, progress: _Progress | None = None) -> list[Any]:
        """Run the tasks on the cluster; their values in the tasks' order. The first
        script or input error cancels the rest and is raised as a MergeError. Write
        tasks report each tensor written on the events `topic` (to `progress`)."""
        client = self.client
        events: queue.SimpleQueue = queue.SimpleQueue()
        if topic is not None:
            client.subscribe_topic(topic, events.put)

        def tick() -> None:
            while not events.empty():
                _, (_index, name) = events.get()
                progress.done([name])

        values: list[Any] = [None] * len(tasks)
        try:
            with Pool(client, tick if progress is not None else None) as pool:
                for i, task in enumerate(tasks):
                    pool.submit(fn, task, i, what(task))
                for i, value in pool.answers():
                    values[i] = value
                    if isinstance(tasks[i], WriteTask) and progress is not None:
                        progress.done(tasks[i].names)  # events may come after the answer
        finally:
            if topic is not None:
                with contextlib.suppress(Exception):
                    client.unsubscribe_topic(topic)
        return values


class _Progress:
    """Calls `progress` once per tensor, however many times a tensor is reported (a task
    that is run again reports its tensors again)."""

    def __init__(self, progress: Callable[[TensorPlan], None] | None,
                 tensors: dict[str, TensorPlan]):
        self.progress, self.tensors = progress, tensors
        self.seen: set[str] = set()

    def done(self, names: Iterable[str]) -> None:
        for name in names:
            if name not in self.seen and name in self.tensors:
                self.seen.add(name)
                if self.progress is not None:
                    self.progress(self.tensors[name])


def _what(task: SweepTask | WriteTask) -> str:
    if isinstance(task, SweepTask):
        return "a task of a model-wide sweep"
    return f"the task writing shard{'s' if len(task.shards) > 1 else ''} " + \
        ", ".join(str(i + 1) for i in task.shards)


def _runs(names: list[str], sizes: list[int], size: int) -> list[tuple[str, ...]]:
    """The names in contiguous runs of at most `size` bytes (a larger tensor alone)."""
    runs: list[list[str]] = []
    filled = 0
    for name, nbytes in zip(names, sizes, strict=True):
        if not runs or (runs[-1] and filled + nbytes > size):
            runs.append([])
            filled = 0
        runs[-1].append(name)
        filled += nbytes
    return [tuple(r) for r in runs]


def _group(shards: list[int], sizes: list[int], size: int | None) -> list[list[int]]:
    """Consecutive shards grouped up to `size` bytes a task; None: a shard a task."""
    if size is None:
        return [[i] for i in shards]
    return [[int(i) for i in run] for run in _runs([str(i) for i in shards], sizes, size)]


def _check_landed(folder: Path, layout: ShardedWriter, tensors: Iterable[OutputTensor]
                  ) -> None:
    """Every shard is in the temporary folder, at its full size, before anything moves
    (a task reports success only after its rename, but a filesystem that is not shared
    would let a worker's rename go elsewhere)."""
    data: Counter[str] = Counter()
    for t in tensors:
        data[layout.weight_map[t.name]] += math.prod(t.shape) * t.dtype.itemsize
    for path in layout.paths:
        landed = folder / path.name
        try:
            with open(landed, "rb") as f:
                header = 8 + int.from_bytes(f.read(8), "little")
            whole = landed.stat().st_size == header + data[path.name]
        except OSError:
            whole = False
        if not whole:
            raise error(f"shard {path.name} did not land whole in {folder}", None,
                        hint="write the output to a folder every worker shares (the same "
                             "path on a shared filesystem)")


