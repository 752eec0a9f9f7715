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

from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .devices import parse_devices
from .diagnostics import Diagnostic, MergeError, error
from .ir import Node, Op, static_args, tensor_args
from .ops import BINARY, PRIMITIVES
from .plan import Plan, TensorPlan
from .reduce import Chunk, RandomStream, Reduction, reduce_whole
from .schedule import DEFAULT_BUDGET, Kernel, Order, Pass, schedule
from .sparse import Difference, Sparse, densify, entrywise, is_sparse, join_rows
from .staging import Loaded, Sink, Stager, Writer

_IN_PLACE = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.div}
_BINARY = {Op.ADD: BINARY["+"], Op.SUB: BINARY["-"], Op.MUL: BINARY["*"],
           Op.DIV: BINARY["/"]}


def execute(plan: Plan, sink: Sink, device: str = "cpu", strict: bool = False,
            progress: Callable[[TensorPlan], None] | None = None,
            budget: int = DEFAULT_BUDGET, order: Order | None = None,
            kernels: list[Kernel] | None = None,
            model_wide: Mapping[str, Any] | None = None,
            check_finite: bool = True, sparse_results: bool = False) -> list[Diagnostic]:
    """Compute every output tensor into `sink`. Returns warnings (NaN/Inf); with
    strict=True a non-finite result is an error instead; check_finite=False skips the
    check (a pass over each result) for a caller that would not report it.
    sparse_results=True: a result computed as a mergelang.sparse.Sparse reaches the sink
    as one (in row blocks, each its own Sparse), not made dense.

    `device` is one device or several GPUs ("cuda:0,cuda:1", "cuda:all"), which split
    the tensors between them; the results are the same bytes either way, and whatever
    `order` (see schedule) the tensors are computed in. `kernels`: the plan's schedule,
    made earlier (a caller that runs one plan many times schedules it once).
    `model_wide`: the model-wide reductions' results, found elsewhere (call site ->
    anything with `result_for(tensor name)`; a cluster task gets them from the client,
    which swept the whole model): then this makes no sweep of its own."""
    devices = parse_devices(device)
    if kernels is None:
        kernels = schedule(plan, budget, order)
    non_finite: Counter[str] | None = Counter() if check_finite else None
    if model_wide is None:
        with _Run(plan, devices[0], sink, non_finite) as run:
            model_wide = run.sweep_model(kernels)
    if len(devices) == 1:
        _run_kernels(plan, devices[0], kernels, sink, non_finite, progress, model_wide,
                     sparse_results)
    else:
        with ThreadPoolExecutor(len(devices), thread_name_prefix="mergelang-gpu") as pool:
            runs = [pool.submit(_run_kernels, plan, d, group, sink, non_finite, progress,
                                model_wide, sparse_results)
                    for d, group in zip(devices, _split(kernels, len(devices)), strict=True)]
            for run in runs:
                run.result()
    return _report(plan, non_finite, strict)


def _run_kernels(plan: Plan, device: torch.device, kernels: list[Kernel], sink: Sink,
                 non_finite: Counter, progress, model_wide: dict[str, Reduction],
                 sparse_results: bool) -> None:
    with _Run(plan, device, sink, non_finite, sparse_results) as run:
        for kernel in kernels:
            run.kernel(kernel, model_wide)
            if progress is not None:
                progress(kernel.tensor)
        run.writer.drain(0)


def _split(kernels: list[Kernel], parts: int) -> list[list[Kernel]]:
    """Kernels dealt to `parts` devices by size, largest first, each part kept in order."""
    loads = [0] * parts
    owner: dict[int, int] = {}
    for i in sorted(range(len(kernels)), key=lambda i: -kernels[i].numel):
        part = loads.index(min(loads))
        owner[i] = part
        loads[part] += kernels[i].numel
    return [[k for i, k in enumerate(kernels) if owner[i] == part] for part in range(parts)]


def model_reductions(kernels: list[Kernel], numel: Mapping[str, int] | None = None
                     ) -> dict[str, Reduction]:
    """A fresh reduction for each model-wide call site of the kernels, over the elements
    of all the tensors it appears in; with `numel` (call site -> elements), only for
    those sites and over that many elements (a cluster task holds part of the tensors)."""
    sites: dict[str, Node] = {}
    counts: Counter[str] = Counter()
    for k in kernels:
        for node in k.model_pass.reductions if k.model_pass else ():
            sites.setdefault(node.attr[1], node)
            counts[node.attr[1]] += k.numel
    total = counts if numel is None else numel
    return {site: reduction_of(node, total[site]) for site, node in sites.items()
            if site in total}


def feed_model_wide(plan: Plan, kernels: list[Kernel], reductions: Mapping[str, Reduction],
                    device: str = "cpu") -> None:
    """One sweep of the model-wide `reductions` (call site -> Reduction) over these
    kernels' chunks, in order, without finishing it: a cluster task's part of a sweep
    (see mergelang.cluster)."""
    with _Run(plan, parse_devices(device)[0], _no_sink, Counter()) as run:
        run.feed_model(kernels, reductions)


def _no_sink(name: str, row0: int, part: torch.Tensor) -> None:
    raise AssertionError("a sweep writes nothing")


def run_tensor(plan: Plan, t: TensorPlan, device: str = "cpu",
               budget: int = DEFAULT_BUDGET) -> torch.Tensor:
    """One output tensor, computed alone; on the CPU in its output dtype."""
    results = Collector([t])
    execute(plan.only([t.name]), results.sink, device, budget=budget)
    return results.tensors[t.name]


class Collector:
    """A sink that assembles the results in memory (for `evaluate` and tests). A tensor
    that arrives in one piece is kept as it is, not copied; one that arrives in Sparse row
    blocks (see execute's sparse_results) is joined into one Sparse."""

    def __init__(self, tensors: list[TensorPlan]):
        self.shapes = {t.name: (t.shape, t.out_dtype) for t in tensors}
        self._tensors: dict[str, torch.Tensor] = {}
        self._blocks: dict[str, list[tuple[int, Sparse]]] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor | Sparse]:
        for name, blocks in self._blocks.items():
            self._tensors[name] = join_rows(blocks, self.shapes[name][0])
        self._blocks.clear()
        return self._tensors

    def sink(self, name: str, row0: int, part: torch.Tensor | Sparse) -> None:
        shape, dtype = self.shapes[name]
        if isinstance(part, Sparse):
            if name not in self._tensors:  # else rows came dense: this one joins them
                self._blocks.setdefault(name, []).append((row0, part))
                return
            part = part.dense()
        if name in self._blocks:  # a block came dense: the Sparse ones go in dense too
            for start, block in self._blocks.pop(name):
                self.sink(name, start, block.dense())
        if row0 == 0 and part.numel() == _numel(shape) and name not in self._tensors:
            self._tensors[name] = part.reshape(shape)
            return
        self._write_rows(name, row0, part)

    def _write_rows(self, name: str, row0: int, part: torch.Tensor) -> None:
        shape, dtype = self.shapes[name]
        whole = self._tensors.setdefault(name, torch.empty(shape, dtype=dtype))
        rows = whole.view(-1) if whole.dim() == 0 else whole
        rows[row0:row0 + len(part)] = part


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Run:
    """The interpreter for one device: walks each kernel's passes over its chunks,
    computing the steps and feeding reductions; inputs and results go through the
    Stager and the Writer."""

    def __init__(self, plan: Plan, device: torch.device, sink: Sink, non_finite: Counter,
                 sparse_results: bool = False):
        self.plan, self.device, self.sparse_results = plan, device, sparse_results
        self.stager = Stager(plan, device)
        self.writer = Writer(sink, non_finite)

    def __enter__(self) -> _Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stager.close()
        self.writer.close()

    def sweep_model(self, kernels: list[Kernel]) -> dict[str, Reduction]:
        """Feed every kernel's model-wide reductions, in order, for as many sweeps as
        they need; one reduction per call site, over all the tensors it appears in. A
        reduction whose result is known is not fed again (a sum would count twice)."""
        made = model_reductions(kernels)
        open_ = dict(made)
        for _ in range(max((r.sweeps(2) for r in made.values()), default=0)):
            self.feed_model(kernels, open_)
            open_ = {site: r for site, r in open_.items() if not r.finish_sweep()}
        return made

    def feed_model(self, kernels: list[Kernel], reductions: Mapping[str, Reduction]) -> None:
        """One sweep: each kernel's chunks, in order, to those of its model-wide
        reductions that are in `reductions` (by call site)."""
        for k in kernels:
            nodes = [n for n in (k.model_pass.reductions if k.model_pass else ())
                     if n.attr[1] in reductions]
            if not nodes or k.numel == 0:  # an empty tensor adds nothing to a reduction
                continue
            randoms = self._randoms(k, [k.model_pass])
            for rows in k.chunks:
                chunk = _ChunkContext(k, rows, {}, {}, randoms)
                loads = self.stager.load(k, k.model_pass, rows)
                values = self._compute(k.model_pass, loads, chunk)
                for node in nodes:
                    reductions[node.attr[1]].add(*(densify(self.stager.widen(values[a]))
                                                   for a in tensor_args(node)),
                                                 chunk.at(node))
                loads.done()

    def _randoms(self, k: Kernel, passes) -> dict[Node, RandomStream]:
        return {n: RandomStream(self.plan.seed, k.tensor.name, n.attr[1]) for p in passes
                for n in p.steps if n.op is Op.PRIM and PRIMITIVES[n.attr[0]].random}

    def kernel(self, k: Kernel, model_wide: dict[str, Reduction]) -> None:
        t = k.tensor
        if k.numel == 0:  # no rows (or an empty row): every operation gives no values
            self.writer.write(t, 0, torch.empty(t.shape, dtype=self.plan.compute_dtype,
                                                device=self.device))
            return
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
        loading = self.stager.prefetch(k, *tasks[0])
        states: dict[Node, dict] = {}
        for i, (p, rows) in enumerate(tasks):
            loads = loading.result()
            if i + 1 < len(tasks):
                loading = self.stager.prefetch(k, *tasks[i + 1])
            if rows[0] == 0:  # a new sweep: primitives start their chunk state afresh
                states = {}
            chunk = _ChunkContext(k, rows, stats, states, randoms, inline)
            values = self._compute(p, loads, chunk)
            if not p.reductions:
                result = values[t.root]
                if id(result) in loads.views:  # the output is an input as it is
                    result = result.clone()
                if isinstance(result, Sparse) and not self.sparse_results:
                    result = result.dense()
                loads.done()
                self.writer.write(t, rows[0], result)
                continue
            open_ = [r for r in p.reductions if r not in stats]
            for r in open_:
                reductions[r].add(*(densify(self.stager.widen(values[a]))
                                    for a in tensor_args(r)), chunk.at(r))
            loads.done()
            if rows[1] == k.rows:
                for r in open_:
                    if reductions[r].finish_sweep():
                        stats[r] = reductions[r].result()

    def _compute(self, p: Pass, loads: Loaded, chunk: _ChunkContext) -> dict[Node, Any]:
        values: dict[Node, Any] = dict(loads.tensors)
        step = _Step(self, values, dict(p.uses), Counter(loads.views), chunk)
        for node in p.steps:
            if node.op is not Op.LOAD:
                values[node] = STEPS[node.op](step, node)
                if node.op is Op.LIST:
                    step.in_lists.update(id(v) for v in values[node])
            for arg in tensor_args(node):
                step.uses[arg] -= 1
                if step.uses[arg] == 0:
                    dead = values.pop(arg)
                    if arg.op is Op.LIST:
                        step.in_lists.subtract(id(v) for v in dead)
        return values


class _Step:
    """What one step of a pass sees: the values so far, the remaining uses of each, and
    which tensors must not be overwritten (views of the files, and those a live list
    refers to)."""

    def __init__(self, run: _Run, values: dict, uses: dict, in_lists: Counter,
                 chunk: _ChunkContext):
        self.run, self.values, self.uses, self.in_lists = run, values, uses, in_lists
        self.chunk = chunk
        self.compute = run.plan.compute_dtype

    def args(self, node: Node, lazy: bool = False) -> list:
        """The values of a node's arguments. A Difference is computed whole unless `lazy`
        (a primitive's sparse form reads it where it keeps entries), and is then an input
        like a file's view: never written over."""
        out = [a.attr if a.is_const else self.values[a] for a in node.args]
        if not lazy:
            for i, value in enumerate(out):
                if isinstance(value, Difference):
                    out[i] = value.dense()
                    self.in_lists[id(out[i])] += 1
        return out

    def reusable(self, arg: Node, value: Any) -> bool:
        """A tensor this step is the last user of, and nothing else refers to."""
        return (not arg.is_const and self.uses.get(arg) == 1
                and isinstance(value, torch.Tensor) and value.is_floating_point()
                and not self.in_lists[id(value)])


def _list(step: _Step, node: Node) -> list:
    return step.args(node)


def _neg(step: _Step, node: Node) -> torch.Tensor | Sparse:
    x = step.args(node)[0]
    if isinstance(x, Sparse):
        return entrywise(torch.neg, [step.run.stager.widen(x)])
    if x.dtype != step.compute:
        return x.to(step.compute).neg_()
    return x.neg_() if step.reusable(node.args[0], x) else -x


def _arithmetic(step: _Step, node: Node) -> Any:
    """a op b, into the buffer of an operand this is the last use of where possible;
    at their positions only where both are Sparse (or one is, beside a number)."""
    op, (a, b) = node.op, step.args(node)
    if isinstance(a, Sparse) or isinstance(b, Sparse):
        a, b = (step.run.stager.widen(x) if isinstance(x, Sparse) else x for x in (a, b))
        if not any(isinstance(x, torch.Tensor) for x in (a, b)):
            return entrywise(_BINARY[op], [a, b])
        a, b = densify(a), densify(b)  # beside a dense tensor: dense, as below
    if not any(isinstance(x, torch.Tensor) and x.dtype == step.compute for x in (a, b)):
        # neither is in the compute dtype yet: widen one (a fresh buffer) and let the
        # operation promote the other
        if isinstance(a, torch.Tensor):
            a = a.to(step.compute)
            return _IN_PLACE[op](a, b, out=a) if _fits(a, a, b) else _BINARY[op](a, b)
        return _BINARY[op](a, b.to(step.compute))
    if step.reusable(node.args[0], a) and _fits(a, a, b):
        return _IN_PLACE[op](a, b, out=a)
    if isinstance(a, torch.Tensor) and step.reusable(node.args[1], b) and _fits(b, a, b):
        return _IN_PLACE[op](a, b, out=b)
    return _BINARY[op](a, b)


def _primitive(step: _Step, node: Node) -> Any:
    """A primitive's call: on Sparse arguments its sparse form (or, entrywise, at their
    positions only), else on them made dense."""
    prim = PRIMITIVES[node.attr[0]]
    args = [step.run.stager.widen(a) for a in step.args(node, lazy=prim.sparse is not None)]
    if any(map(is_sparse, args)):
        if prim.entrywise:
            return entrywise(prim.fn, args)
        if prim.sparse is None:
            args = [densify(a) for a in args]
    fn = prim.sparse or prim.fn
    if not prim.takes_chunk:
        return _own(fn(*args), args)
    chunk = step.chunk
    if node in chunk.inline and node not in chunk.stats:
        chunk.stats[node] = reduce_whole(chunk.inline[node],
                                         [densify(a) for a in args if not _is_static(a)],
                                         chunk.at(node))
    return _own(fn(*args, chunk=chunk.at(node)), args)


def _copy_agreeing(step: _Step, node: Node) -> torch.Tensor:
    args = [densify(a) for a in step.args(node)]
    for other in args[1:]:
        if not torch.equal(args[0], other):
            name = step.chunk.kernel.tensor.name
            raise error(f'tensor "{name}" ({args[0].dtype}) is not a float tensor and '
                        "differs between the models; it cannot be merged", node.span,
                        hint="take it from one model with `a | b` or a condition on `name`")
    return args[0]


def _loaded(step: _Step, node: Node) -> Any:
    raise AssertionError("loads are the Stager's: a pass starts with them")


# one entry per tensor operation that can reach execution
STEPS: dict[Op, Callable[[_Step, Node], Any]] = {
    Op.LOAD: _loaded, Op.LIST: _list, Op.NEG: _neg, Op.ADD: _arithmetic, Op.SUB: _arithmetic,
    Op.MUL: _arithmetic, Op.DIV: _arithmetic, Op.PRIM: _primitive,
    Op.COPY_AGREEING: _copy_agreeing,
}


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
    return not isinstance(value, (torch.Tensor, Sparse, Difference, list))


def reduction_of(node: Node, numel: int) -> Reduction:
    """A fresh reduction for one primitive call on a tensor of `numel` elements."""
    return PRIMITIVES[node.attr[0]].make_reduction(numel, static_args(node))


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
