"""Schedule: how the planned tensors are computed — the last part of planning.

For each output tensor this fixes, before anything runs:
- the steps in dependency order and how many times each value is used, so that the
  executor frees every value right after its last use;
- the passes: the per-tensor reductions (a TIES threshold, a DARE L1 norm), grouped in
  levels that are swept together over the tensor, then the final pass that computes
  and writes the result;
- the chunk: how many rows go through at once, so that the values alive at the same
  time fit the memory budget whatever the size of the tensor.

And the order of the tensors: by the position of their inputs in the files, so that
each input file is read front to back.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from .ir import Node, Op, static_args, tensor_args, walk
from .ops import PRIMITIVES
from .plan import Plan, TensorPlan
from .reduce import Reduction

DEFAULT_BUDGET = 192 * 10**6  # bytes of tensor data alive at once, prefetched inputs included
DEFAULT_BUDGET_TEXT = "192MB"  # the same, as the command line writes it
_SCRATCH = 2
_WRITE_QUEUE = 2


@dataclass(frozen=True)
class Pass:
    """One sweep over the rows: `steps` in order, computing `targets`."""

    steps: tuple[Node, ...]
    uses: dict[Node, int]         # users of each value within this pass (targets: +1)
    targets: tuple[Node, ...]
    reductions: tuple[Node, ...]  # the reduction calls this pass feeds (none: the final pass)

    @property
    def loads(self) -> tuple[Node, ...]:
        return tuple(n for n in self.steps if n.op is Op.LOAD)


@dataclass(frozen=True)
class Kernel:
    tensor: TensorPlan
    passes: tuple[Pass, ...]      # reduction levels first, the final pass last
    model_pass: Pass | None       # feeds the model-wide reductions (swept before any kernel)
    rows: int                     # extent of the first dimension (1 for a scalar)
    row_numel: int
    chunk_rows: int
    alive: int                    # values of one chunk held at once, at most

    def working_set(self, itemsize: int) -> int:
        """Bytes of tensor data this kernel holds at once, by the schedule's count."""
        return self.chunk_rows * self.row_numel * itemsize * self.alive

    @property
    def chunks(self) -> list[tuple[int, int]]:
        if self.rows == 0:  # a tensor with no rows is one empty chunk, written as such
            return [(0, 0)]
        return [(r, min(r + self.chunk_rows, self.rows))
                for r in range(0, self.rows, self.chunk_rows)]

    @property
    def numel(self) -> int:
        return self.rows * self.row_numel


Order = Callable[[list["Kernel"]], list["Kernel"]]


def schedule(plan: Plan, budget: int = DEFAULT_BUDGET, order: Order | None = None
             ) -> list[Kernel]:
    """A kernel per output tensor, in the order their inputs lie in the files.

    `order` rearranges that order (tests reverse and shuffle it to show that the bytes
    written do not depend on it)."""
    itemsize = plan.compute_dtype.itemsize
    kernels = [kernel(t, budget, itemsize) for t in plan.tensors]
    kernels.sort(key=lambda k: _file_position(plan, k.tensor))
    return order(kernels) if order is not None else kernels


def kernel(t: TensorPlan, budget: int, itemsize: int) -> Kernel:
    steps = tuple(n for n in t.nodes if not n.is_const)
    made = {n: _reduction(n, _numel(t.shape)) for n in steps if n.op is Op.PRIM}
    model_wide = [n for n, r in made.items() if r is not None and r.model_wide]
    reductions = [n for n, r in made.items() if r is not None and not r.model_wide]
    passes = [_pass(steps, level, tuple(a for r in level for a in tensor_args(r)))
              for level in _levels(reductions)] if reductions else []
    passes.append(_pass(steps, (), (t.root,)))
    model_pass = (_pass(steps, tuple(model_wide),
                        tuple(a for r in model_wide for a in tensor_args(r)))
                  if model_wide else None)
    rows = t.shape[0] if t.shape else 1
    row_numel = _numel(t.shape[1:]) if t.shape else 1
    # + the next chunk's inputs (prefetched), the temporaries inside one primitive,
    # and the results waiting for the writer
    every = passes + ([model_pass] if model_pass else [])
    alive = max(peak_alive(p) + len(p.loads) for p in every) + _SCRATCH + _WRITE_QUEUE
    per_row = max(1, row_numel * itemsize * alive)
    whole = t.copy_only or any(PRIMITIVES[n.attr[0]].whole for n in steps if n.op is Op.PRIM)
    chunk_rows = rows if whole else max(1, min(rows, budget // per_row))
    return Kernel(t, tuple(passes), model_pass, rows, row_numel, chunk_rows, alive)


def _reduction(node: Node, numel: int) -> Reduction | None:
    """The reduction this primitive call needs with these arguments, if any."""
    return PRIMITIVES[node.attr[0]].make_reduction(numel, static_args(node))


def _levels(reductions: list[Node]) -> list[tuple[Node, ...]]:
    """Reductions grouped so each group depends only on earlier groups' results."""
    level: dict[Node, int] = {}
    for r in reductions:  # in dependency order
        inner = [level[n] for a in tensor_args(r) for n in walk(a) if n in level]
        level[r] = 1 + max(inner, default=-1)
    groups: dict[int, list[Node]] = defaultdict(list)
    for r, lv in level.items():
        groups[lv].append(r)
    return [tuple(groups[lv]) for lv in sorted(groups)]


def _pass(steps: tuple[Node, ...], reductions: tuple[Node, ...],
          targets: tuple[Node, ...]) -> Pass:
    if len(targets) == 1 and steps and targets[0] is steps[-1]:  # the root: every step
        order = steps
    else:
        needed: set[Node] = set()
        for target in targets:
            needed.update(walk(target))
        order = tuple(n for n in steps if n in needed)
    uses: dict[Node, int] = defaultdict(int)
    for node in order:
        for arg in tensor_args(node):
            uses[arg] += 1
    for target in targets:
        uses[target] += 1
    return Pass(order, dict(uses), targets, reductions)


def peak_alive(p: Pass) -> int:
    """The most values alive at once while the pass runs its steps in order, its inputs
    (loaded before it starts) included."""
    uses = dict(p.uses)
    alive = peak = len(p.loads)
    for node in p.steps:
        if node.op not in (Op.LIST, Op.LOAD):
            alive += 1
        peak = max(peak, alive)
        for arg in tensor_args(node):
            uses[arg] -= 1
            if uses[arg] == 0 and arg.op is not Op.LIST:
                alive -= 1
    return peak


def _file_position(plan: Plan, t: TensorPlan) -> tuple[str, int]:
    load = t.loads[0] if t.loads else None
    if load is None:
        return ("", 0)
    info = plan.bound.models[load.attr[0]].source.tensors[load.attr[1]]
    return (str(info.file), info.offset)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
