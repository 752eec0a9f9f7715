"""Execute: run the scheduled kernels, streaming inputs in and results out.

Three threads share the work, so both cores stay busy and the disk never waits on
the arithmetic: a reader loads the next chunk's inputs (and converts them to the
compute dtype, and copies them to the GPU) while the main thread computes the
current one, and a writer casts finished chunks to the output dtype and puts them in
the output file. Values are released right after their last use (use counts come from
the schedule), and a value whose last use is an elementwise operation is overwritten
in place rather than copied.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .devices import parse_devices
from .diagnostics import Diagnostic, MergeError, error
from .ir import Node
from .ops import BINARY, PRIMITIVES
from .plan import Plan, TensorPlan
from .reduce import Chunk, RandomStream, Reduction, reduce_whole
from .schedule import DEFAULT_BUDGET, Kernel, Pass, schedule, static_args, tensor_args

# sink(name, first row, rows of the result in the output dtype, on the CPU)
Sink = Callable[[str, int, torch.Tensor], None]
_COUNTING = threading.Lock()
_SMALL_LOAD = 1 << 18  # elements: read or written on the spot, not by a helper thread
_IN_PLACE = {"+": torch.add, "-": torch.sub, "*": torch.mul, "/": torch.div}


def execute(plan: Plan, sink: Sink, device: str = "cpu", strict: bool = False,
            progress: Callable[[TensorPlan], None] | None = None,
            budget: int = DEFAULT_BUDGET) -> list[Diagnostic]:
    """Compute every output tensor into `sink`. Returns warnings (NaN/Inf); with
    strict=True a non-finite result is an error instead.

    `device` is one device or several GPUs ("cuda:0,cuda:1", "cuda:all"), which split
    the tensors between them; the results are the same bytes either way."""
    devices = parse_devices(device)
    kernels = schedule(plan, budget)
    non_finite: Counter[str] = Counter()
    with _Run(plan, devices[0], sink, non_finite) as run:
        model_wide = run.sweep_model(kernels)
    if len(devices) == 1:
        _run_kernels(plan, devices[0], kernels, sink, non_finite, progress, model_wide)
    else:
        with ThreadPoolExecutor(len(devices), thread_name_prefix="mergelang-gpu") as pool:
            runs = [pool.submit(_run_kernels, plan, d, group, sink, non_finite, progress,
                                model_wide)
                    for d, group in zip(devices, _split(kernels, len(devices)), strict=True)]
            for run in runs:
                run.result()
    return _report(plan, non_finite, strict)


def _run_kernels(plan: Plan, device: torch.device, kernels: list[Kernel], sink: Sink,
                 non_finite: Counter, progress, model_wide: dict[str, Reduction]) -> None:
    with _Run(plan, device, sink, non_finite) as run:
        for kernel in kernels:
            run.kernel(kernel, model_wide)
            if progress is not None:
                progress(kernel.tensor)
        run.drain(0)


def _split(kernels: list[Kernel], parts: int) -> list[list[Kernel]]:
    """Kernels dealt to `parts` devices by size, largest first, each part kept in order."""
    loads = [0] * parts
    owner: dict[int, int] = {}
    for i in sorted(range(len(kernels)), key=lambda i: -kernels[i].numel):
        part = loads.index(min(loads))
        owner[i] = part
        loads[part] += kernels[i].numel
    return [[k for i, k in enumerate(kernels) if owner[i] == part] for part in range(parts)]


def run_tensor(plan: Plan, t: TensorPlan, device: str = "cpu",
               budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """One output tensor, computed alone; on the CPU in its output dtype."""
    results = Collector([t])
    execute(Plan(plan.bound, [t], plan.compute_dtype, plan.seed, plan.num_layers), results.sink,
            device, budget=budget)
    return results.tensors[t.name]


class Collector:
    """A sink that assembles the results in memory (for `evaluate` and tests)."""

    def __init__(self, tensors: list[TensorPlan]):
        self.tensors = {t.name: torch.empty(t.shape, dtype=t.out_dtype) for t in tensors}

    def sink(self, name: str, row0: int, part: torch.Tensor) -> None:
        whole = self.tensors[name]
        rows = whole.view(-1) if whole.dim() == 0 else whole
        rows[row0:row0 + len(part)] = part


class _Run:
    """The state of one execution: the device, the two helper threads, the results."""

    def __init__(self, plan: Plan, device: torch.device, sink: Sink, non_finite: Counter):
        self.plan, self.device = plan, device
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="mergelang-read")
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="mergelang-write")
        self.sink, self.non_finite = sink, non_finite
        self.pending: deque[Future] = deque()
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reader.shutdown()
        self.writer.shutdown()

    def sweep_model(self, kernels: list[Kernel]) -> dict[str, Reduction]:
        """Feed every kernel's model-wide reductions, in order, for as many sweeps as
        they need; one reduction per call site, over all the tensors it appears in."""
        sites: dict[str, list[Node]] = {}
        numel: Counter[str] = Counter()
        for k in kernels:
            for node in k.model_pass.reductions if k.model_pass else ():
                sites.setdefault(node.attr[1], []).append(node)
                numel[node.attr[1]] += k.numel
        made = {site: reduction_of(nodes[0], numel[site]) for site, nodes in sites.items()}
        for _ in range(max((r.sweeps(2) for r in made.values()), default=0)):
            for k in kernels:
                if k.model_pass is None:
                    continue
                randoms = self._randoms(k, [k.model_pass])
                for rows in k.chunks:
                    chunk = _ChunkContext(k, rows, {}, {}, randoms)
                    loads = self._load(k, k.model_pass, rows)
                    values = self._compute(k.model_pass, loads, chunk)
                    for node in k.model_pass.reductions:
                        made[node.attr[1]].add(*(self._widen(values[a])
                                                 for a in tensor_args(node)),
                                               chunk.at(node))
                    loads.done()
            for reduction in made.values():
                reduction.finish_sweep()
        return made

    def _randoms(self, k: Kernel, passes) -> dict[Node, RandomStream]:
        return {n: RandomStream(self.plan.seed, k.tensor.name, n.attr[1]) for p in passes
                for n in p.steps if n.op == "prim" and PRIMITIVES[n.attr[0]].random}

    def kernel(self, k: Kernel, model_wide: dict[str, Reduction]) -> None:
        t = k.tensor
        randoms = self._randoms(k, k.passes)
        reductions = {r: reduction_of(r, k.numel) for p in k.passes for r in p.reductions}
        chunks = k.chunks
        stats = {r: red.result() for r, red in reductions.items() if red.sweeps(len(chunks)) == 0}
        for node in k.model_pass.reductions if k.model_pass else ():
            stats[node] = model_wide[node.attr[1]].result_for(t.name)
        # One chunk: no sweeps; each reduction runs when its call is reached, on the
        # call's own arguments (see _step), so the inputs are read and computed once.
        inline = {r: red for r, red in reductions.items() if r not in stats} \
            if len(chunks) == 1 else {}
        tasks = [(p, rows) for p in k.passes[:-1] if not inline
                 for _ in range(max(reductions[r].sweeps(len(chunks)) for r in p.reductions))
                 for rows in chunks]
        tasks += [(k.passes[-1], rows) for rows in chunks]
        loading = self._prefetch(k, *tasks[0])
        states: dict[Node, dict] = {}
        for i, (p, rows) in enumerate(tasks):
            loads = loading.result()
            if i + 1 < len(tasks):
                loading = self._prefetch(k, *tasks[i + 1])
            if rows[0] == 0:  # a new sweep: primitives start their chunk state afresh
                states = {}
            chunk = _ChunkContext(k, rows, stats, states, randoms, inline)
            values = self._compute(p, loads, chunk)
            if not p.reductions:
                result = values[t.root]
                if id(result) in loads.views:  # the output is an input as it is
                    result = result.clone()
                loads.done()
                self._write(t, rows[0], result)
                continue
            open_ = [r for r in p.reductions if r not in stats]
            for r in open_:
                reductions[r].add(*(self._widen(values[a]) for a in tensor_args(r)),
                                  chunk.at(r))
            loads.done()
            if rows[1] == k.rows:
                for r in open_:
                    if reductions[r].finish_sweep():
                        stats[r] = reductions[r].result()

    def _prefetch(self, k: Kernel, p: Pass, rows: tuple[int, int]) -> Future:
        """Start loading a task's inputs on the reader thread; small ones are loaded
        right away, where a thread hand-off would cost more than the read."""
        if len(p.loads) * (rows[1] - rows[0]) * k.row_numel < _SMALL_LOAD:
            done: Future = Future()
            done.set_result(self._load(k, p, rows))
            return done
        return self.reader.submit(self._load, k, p, rows)

    def _load(self, k: Kernel, p: Pass, rows: tuple[int, int]) -> _Loaded:
        """A task's inputs. On the CPU an input needing no conversion is a view of the
        file's bytes, released once the task is done (see _Loaded)."""
        whole = rows == (0, k.rows) or not k.tensor.shape
        loaded = _Loaded()
        for node in p.loads:
            key, name = node.attr
            source = self.plan.bound.models[key].source
            part = None if whole else rows
            dtype = self._load_dtype(k, node)
            view = dtype is None and self.copy_stream is None
            tensor = source.load(name, part, dtype, view=view)
            if view:
                loaded.views.add(id(tensor))
                loaded.release.append((source, name, part))
            if self.copy_stream is not None:
                with torch.cuda.stream(self.copy_stream):
                    tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            loaded.tensors[node] = tensor
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        return loaded

    def _load_dtype(self, k: Kernel, node: Node) -> torch.dtype | None:
        """Inputs stay in their stored dtype when it widens exactly to the compute dtype
        (bfloat16 -> float32): the first operation that uses them converts them, and an
        operation with one operand already in the compute dtype promotes the other as
        it goes, which saves a pass and a buffer per input."""
        stored = self.plan.bound.models[node.attr[0]].source.tensors[node.attr[1]].dtype
        compute = self.plan.compute_dtype
        if k.tensor.copy_only or torch.promote_types(stored, compute) == compute:
            return None
        return compute

    def _widen(self, value: Any) -> Any:
        """A tensor (or the tensors of a list) in the compute dtype."""
        if isinstance(value, list):
            return [self._widen(v) for v in value]
        if isinstance(value, torch.Tensor) and value.dtype != self.plan.compute_dtype:
            return value.to(self.plan.compute_dtype)
        return value

    def _compute(self, p: Pass, loads: _Loaded, chunk: _ChunkContext) -> dict[Node, Any]:
        values: dict[Node, Any] = dict(loads.tensors)
        uses = dict(p.uses)
        # tensors not to overwrite: views of the files, and those a live list refers to
        in_lists: Counter[int] = Counter(loads.views)
        for node in p.steps:
            if node.op != "load":
                values[node] = self._step(node, values, uses, in_lists, chunk)
                if node.op == "list":
                    in_lists.update(id(v) for v in values[node])
            for arg in node.args:
                if arg.op == "const":
                    continue
                uses[arg] -= 1
                if uses[arg] == 0:
                    dead = values.pop(arg)
                    if arg.op == "list":
                        in_lists.subtract(id(v) for v in dead)
        return values

    def _step(self, node: Node, values: dict, uses: dict, in_lists: Counter,
              chunk: _ChunkContext) -> Any:
        op = node.op
        args = [a.attr if a.op == "const" else values[a] for a in node.args]
        if op == "list":
            return args
        compute = self.plan.compute_dtype
        if op == "neg":
            x = args[0]
            if x.dtype != compute:
                return x.to(compute).neg_()
            return x.neg_() if self._reusable(node.args[0], x, uses, in_lists) else -x
        if op in _IN_PLACE:
            a, b = args
            if not any(isinstance(x, torch.Tensor) and x.dtype == compute for x in (a, b)):
                # neither is in the compute dtype yet: widen one (a fresh buffer) and let
                # the operation promote the other
                if isinstance(a, torch.Tensor):
                    a = a.to(compute)
                    return _IN_PLACE[op](a, b, out=a) if _fits(a, a, b) else BINARY[op](a, b)
                b = b.to(compute)
                return BINARY[op](a, b)
            if self._reusable(node.args[0], a, uses, in_lists) and _fits(a, a, b):
                return _IN_PLACE[op](a, b, out=a)
            if isinstance(a, torch.Tensor) and self._reusable(node.args[1], b, uses, in_lists) \
                    and _fits(b, a, b):
                return _IN_PLACE[op](a, b, out=b)
            return BINARY[op](a, b)
        if op == "prim":
            prim = PRIMITIVES[node.attr[0]]
            args = [self._widen(a) for a in args]
            if not prim.takes_chunk:
                return _own(prim.fn(*args), args)
            if node in chunk.inline and node not in chunk.stats:
                chunk.stats[node] = reduce_whole(chunk.inline[node],
                                                 [a for a in args if not _is_static(a)],
                                                 chunk.at(node))
            return _own(prim.fn(*args, chunk=chunk.at(node)), args)
        if op == "copy_agreeing":
            for other in args[1:]:
                if not torch.equal(args[0], other):
                    name = chunk.kernel.tensor.name
                    raise error(f'tensor "{name}" ({args[0].dtype}) is not a float tensor and '
                                "differs between the models; it cannot be merged", node.span,
                                hint="take it from one model with `a | b` or a condition on "
                                     "`name`")
            return args[0]
        raise AssertionError(f"no executor for {op}")

    @staticmethod
    def _reusable(arg: Node, value: Any, uses: dict, in_lists: Counter) -> bool:
        """A tensor this step is the last user of, and nothing else refers to."""
        return (arg.op != "const" and uses.get(arg) == 1 and isinstance(value, torch.Tensor)
                and value.is_floating_point() and not in_lists[id(value)])

    def _write(self, t: TensorPlan, row0: int, part: torch.Tensor) -> None:
        if part.numel() < _SMALL_LOAD:
            self._cast_and_sink(t, row0, part)
            return
        self.drain(1)
        self.pending.append(self.writer.submit(self._cast_and_sink, t, row0, part))

    def _cast_and_sink(self, t: TensorPlan, row0: int, part: torch.Tensor) -> None:
        out = part.to(t.out_dtype).cpu()
        # one reduction finds out whether any value is NaN or infinite (the sum would
        # be); only then are they counted
        if out.is_floating_point() and out.numel() and not torch.isfinite(out.sum()):
            bad = int((~torch.isfinite(out)).sum())
            if bad:
                with _COUNTING:
                    self.non_finite[t.name] += bad
        self.sink(t.name, row0, out.reshape(-1) if not t.shape else out)

    def drain(self, keep: int) -> None:
        """Wait until at most `keep` writes are outstanding (raising their errors)."""
        while len(self.pending) > keep:
            self.pending.popleft().result()


def _own(result: Any, args: list) -> Any:
    """A primitive's result as a value of its own: one that returns an argument as it is
    (e.g. drop with density 1) must not let a later in-place step change both."""
    if any(result is a for a in args) or any(
            isinstance(a, list) and any(result is x for x in a) for a in args):
        return result.clone()
    return result


def _fits(out: torch.Tensor, a: Any, b: Any) -> bool:
    """Whether `out` can hold a op b: the result's shape and dtype."""
    if not out.is_floating_point():
        return False
    tensors = [x for x in (a, b) if isinstance(x, torch.Tensor)]
    return all(x.shape == out.shape for x in tensors) and \
        torch.result_type(a, b) == out.dtype


def _is_static(value: Any) -> bool:
    """A primitive's number or string argument (not a tensor or a list of them)."""
    return not isinstance(value, (torch.Tensor, list))


def reduction_of(node: Node, numel: int) -> Reduction:
    """A fresh reduction for one primitive call on a tensor of `numel` elements."""
    return PRIMITIVES[node.attr[0]].make_reduction(numel, static_args(node))


class _Loaded:
    """A task's inputs, and the file views among them to release when it is done."""

    def __init__(self) -> None:
        self.tensors: dict[Node, torch.Tensor] = {}
        self.views: set[int] = set()
        self.release: list[tuple[Any, str, tuple[int, int] | None]] = []

    def done(self) -> None:
        for source, name, rows in self.release:
            source.release(name, rows)
        self.release.clear()


class _ChunkContext:
    """Makes the `Chunk` each primitive call sees for the current rows."""

    def __init__(self, k: Kernel, rows: tuple[int, int], stats: dict, states: dict,
                 randoms: dict, inline: dict | None = None):
        self.kernel, self.rows = k, rows
        self.stats, self.states, self.randoms = stats, states, randoms
        self.inline = inline or {}  # reductions to run at their call (one-chunk tensors)

    def at(self, node: Node) -> Chunk:
        state = self.states.setdefault(node, {})
        return Chunk(self.kernel.numel, self.rows[0] * self.kernel.row_numel,
                     self.stats.get(node), state, self.randoms.get(node),
                     self.kernel.tensor.name)


def _report(plan: Plan, non_finite: Counter, strict: bool) -> list[Diagnostic]:
    if not non_finite:
        return []
    names = [t.name for t in plan.tensors if t.name in non_finite]
    shown = ", ".join(f'"{n}" ({non_finite[n]})' for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    diagnostic = Diagnostic(
        f"NaN or infinite values in the result: {shown}{more}",
        plan.bound.lowered.output.span if plan.bound.lowered.output is not None else None,
        hint="check the weights and divisors of the merge"
             + ("" if strict else "; pass --strict to make this an error"),
        severity="error" if strict else "warning")
    if strict:
        raise MergeError(diagnostic)
    return [diagnostic]
