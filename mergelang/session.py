"""A REPL session: what stays between lines, so that asking again costs nothing.

- Statements are parsed once, as they are typed, and kept as syntax trees; each new
  line is resolved and lowered with them (resolving is a walk over the trees, no file is
  read again but an imported one).
- One `ir.Builder` serves the whole session, so equal expressions are one node from line
  to line, and their per-tensor specialisations (loads, arithmetic, primitive calls) are
  one node too.
- Every model is opened once, when first named (headers read, files mapped once), and
  stays open until the session ends. Loads are counted.
- Computed tensors are cached by their specialised IR node (with the compute dtype, seed
  and device), in a cache bounded in bytes (least recently used first out). A tensor is
  computed one operation at a time through the ordinary executor, each operation's
  inputs served from the cache, so a later expression that shares any subexpression
  (the same delta, the same trim) reuses it, and asking again loads nothing. The values
  are the executor's own, bit for bit what `run` writes.

A whole-model reduction (`trim(..., scope="model")`) needs every tensor: such a tensor
is computed with the whole model's plan (every tensor is computed; only the wanted ones
are kept).
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import ast
from .bind import Bound, BoundModel, InMemoryModel, bind, check_tensors, count_layers
from .builtins import COMPUTE_DTYPES
from .diagnostics import error
from .execute import Collector, execute
from .extraction.form import refuse_outside_scripts
from .io.errors import ModelFileError
from .io.read import TensorInfo
from .io.sources import frame_of, is_derived, open_source
from .ir import SHAPE_RULES, TENSOR, Builder, Node, Op, static_args, tensor_args, walk
from .lower import Lowered, ModelRef, lower
from .ops import PRIMITIVES
from .plan import Plan, TensorPlan, plan
from .resolve import Resolved, resolve
from .schedule import DEFAULT_BUDGET
from .syntax import parse

CACHE_KEY = "<session values>"  # the in-memory model that serves cached values
DEFAULT_CACHE_BYTES = 1 << 30


@dataclass
class Loads:
    """What was read from the model files."""

    tensors: int = 0
    bytes: int = 0


class CountingSource:
    """A model's source that counts the tensor data loaded from it."""

    def __init__(self, inner: Any, loads: Loads):
        self.inner, self.loads = inner, loads
        self.tensors, self.config, self.folder = inner.tensors, inner.config, inner.folder
        self._lock = threading.Lock()

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor:
        tensor = self.inner.load(name, rows, dtype, view)
        info = self.tensors[name]
        share = (rows[1] - rows[0]) / info.shape[0] if rows and info.shape else 1.0
        with self._lock:
            self.loads.tensors += 1
            self.loads.bytes += int(info.nbytes * share)
        return tensor

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        self.inner.release(name, rows)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class ValueCache:
    """Tensors by key, least recently used evicted first once `limit` bytes are held."""

    def __init__(self, limit: int = DEFAULT_CACHE_BYTES):
        self.limit = limit
        self.values: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = 0

    def get(self, key: Any) -> torch.Tensor | None:
        value = self.values.get(key)
        if value is not None:
            self.values.move_to_end(key)
            self.hits += 1
        return value

    def put(self, key: Any, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.limit or key in self.values:
            return
        while self.bytes + size > self.limit:
            _, old = self.values.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.values[key] = value
        self.bytes += size

    def clear(self) -> None:
        self.values.clear()
        self.bytes = 0


@dataclass
class Options:
    """What `:set` changes for the session; None leaves the script's `set` in force."""

    dtype: str | None = None
    out_dtype: str | None = None
    seed: int | None = None
    device: str = "cpu"
    max_memory: int = DEFAULT_BUDGET


@dataclass
class Stats:
    """Summary statistics of one tensor, gathered a block of rows at a time."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    count: int = 0
    total: float = 0.0
    squares: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")
    nonzero: int = 0
    first: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, part: torch.Tensor) -> None:
        x = part.detach().reshape(-1).to(torch.float64)
        if not x.numel():
            return
        with self._lock:
            if self.first is None:
                self.first = float(x[0])
            self.count += x.numel()
            self.total += float(x.sum())
            self.squares += float((x * x).sum())
            self.low = min(self.low, float(x.min()))
            self.high = max(self.high, float(x.max()))
            self.nonzero += int((x != 0).sum())

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    @property
    def std(self) -> float:
        """The sample standard deviation (as torch.std)."""
        if self.count < 2:
            return 0.0
        return max(0.0, (self.squares - self.total ** 2 / self.count) / (self.count - 1)) ** 0.5

    @property
    def norm(self) -> float:
        return self.squares ** 0.5


class Session:
    """The state of one REPL session (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path  # relative model paths and imports resolve against its folder
        self.statements: list[ast.Stmt] = []
        self.builder = Builder()
        self.sources: dict[str, CountingSource] = {}
        self.loads = Loads()
        self.cache = ValueCache()
        self.options = Options()
        self.resolved: Resolved = resolve(ast.Module(parse("\n").source, ()))

    def close(self) -> None:
        for source in self.sources.values():
            source.close()
        self.sources.clear()
        self.cache.clear()

    # statements and expressions

    def define(self, module: ast.Module) -> list[ast.Output]:
        """Add a module's statements to the session (all or none). Returns its `output`
        statements, which are not kept: the caller shows them. Raises MergeError."""
        outputs = [s for s in module.statements if isinstance(s, ast.Output)]
        kept = [s for s in module.statements if not isinstance(s, ast.Output)]
        candidate = self.statements + kept
        resolved = resolve(ast.Module(module.source, tuple(candidate)))
        self._open(self._lower(resolved))
        self.statements, self.resolved = candidate, resolved
        return outputs

    def lower(self, expr: ast.Expr) -> Lowered:
        """The session with `expr` as its output, lowered. Raises MergeError."""
        module = ast.Module(expr.span.source, (*self.statements, ast.Output(expr.span, expr)))
        lowered = self._lower(resolve(module))
        self._open(lowered)
        return lowered

    def _lower(self, resolved: Resolved) -> Lowered:
        lowered = lower(resolved, session=True, builder=self.builder)
        refuse_outside_scripts(lowered.form, "the REPL")
        changes = {k: v for k in ("dtype", "out_dtype", "seed")
                   if (v := getattr(self.options, k)) is not None}
        return dataclasses.replace(lowered, **changes)

    def _open(self, lowered: Lowered) -> None:
        """Open the models not opened yet, checking them as bind would. A derived input
        (an adapter) is attached once the plain models are open, to its `base=` or the
        session's first plain model, and stays attached to it."""
        new = [(key, ref) for key, ref in lowered.models.items() if key not in self.sources]
        opened = {}
        for key, ref in new:
            try:
                opened[key] = open_source(key)
            except ModelFileError as exc:
                for source in opened.values():
                    source.close()
                raise error(exc.message, ref.span, hint=exc.hint) from None
        new.sort(key=lambda item: is_derived(opened[item[0]]))  # plain models first
        for i, (key, ref) in enumerate(new):
            source = opened[key]
            try:
                if is_derived(source):
                    source.attach(frame_of(key, {k: s for k, s in self.sources.items()
                                                 if not is_derived(s)}))
                check_tensors(source)
                count_layers(source)
            except ModelFileError as exc:
                for later, _ in new[i:]:
                    opened[later].close()
                raise error(exc.message, ref.span, hint=exc.hint) from None
            self.sources[key] = CountingSource(source, self.loads)

    def bind(self, lowered: Lowered) -> Bound:
        """The lowered session bound to its open models (never close it: the models are
        the session's)."""
        return bind(lowered, dict(self.sources))

    def plan(self, lowered: Lowered, names: Iterable[str] | None = None) -> Plan:
        return plan(self.bind(lowered), names=names)

    def tensor_names(self) -> list[str]:
        """Every tensor name of every model opened so far."""
        seen: dict[str, None] = {}
        for source in self.sources.values():
            seen.update(dict.fromkeys(source.tensors))
        return list(seen)

    # values

    def compute(self, p: Plan, t: TensorPlan) -> torch.Tensor:
        """The value of a planned tensor in the compute dtype, from the cache if it is
        there; each operation computed is cached on the way."""
        root_key = self._key(p, t.root)
        cached = self.cache.get(root_key)
        if cached is not None:
            return cached
        if t.copy_only or model_wide(t):
            return self._compute_whole(p, t)
        values: dict[Node, torch.Tensor] = {}
        todo: set[Node] = set()
        stack = [t.root]
        while stack:  # what is not cached, and what that needs
            node = stack.pop()
            if node in todo or node in values:
                continue
            value = self.cache.get(self._key(p, node))
            if value is not None:
                values[node] = value
                continue
            todo.add(node)
            stack.extend(_operands(node))
        order = [n for n in walk(t.root) if n in todo]
        users: dict[Node, int] = {}
        for node in order:
            for arg in _operands(node):
                users[arg] = users.get(arg, 0) + 1
        shapes = _shapes(p, t.root)
        for node in order:
            value = self._operation(p, t.name, node, shapes[node], values)
            self.cache.put(self._key(p, node), value)
            values[node] = value
            for arg in _operands(node):
                users[arg] -= 1
                if users[arg] == 0 and arg is not t.root:
                    values.pop(arg, None)
        return values[t.root]

    def _key(self, p: Plan, node: Node) -> tuple:
        return (node, p.compute_dtype, p.seed, self.options.device)

    def _operation(self, p: Plan, name: str, node: Node, shape: tuple[int, ...],
                   values: dict[Node, torch.Tensor]) -> torch.Tensor:
        """One operation, run by the executor on its operands' cached values."""
        inputs: dict[str, torch.Tensor] = {}

        def served(a: Node) -> Node:
            if a.is_const:
                return a
            if a.op is Op.LIST:
                return self.builder.make(Op.LIST, tuple(map(served, a.args)), a.attr, a.kind,
                                         a.span)
            label = f"v{len(inputs)}"
            inputs[label] = values[a]
            return self.builder.make(Op.LOAD, (), (CACHE_KEY, label), TENSOR, a.span)

        step = node if node.op is Op.LOAD else self.builder.make(
            node.op, tuple(map(served, node.args)), node.attr, node.kind, node.span)
        models = dict(p.bound.models)
        models[CACHE_KEY] = BoundModel(CACHE_KEY, ModelRef(CACHE_KEY, node.span),
                                       InMemoryModel(inputs), 0)
        one = TensorPlan(name, step, shape, p.compute_dtype, False)
        run = dataclasses.replace(p, bound=Bound(p.bound.lowered, models, p.bound.donor),
                                  tensors=[one])
        out = Collector([one])
        execute(run, out.sink, self.options.device, budget=self.options.max_memory)
        return out.tensors[name]

    def _compute_whole(self, p: Plan, t: TensorPlan) -> torch.Tensor:
        """A tensor computed as one kernel (a non-float copy), or with the whole model's
        plan (a whole-model reduction)."""
        wanted = dataclasses.replace(t, out_dtype=t.out_dtype if t.copy_only
                                     else p.compute_dtype)
        out = Collector([wanted])
        if t.copy_only:
            execute(dataclasses.replace(p, tensors=[wanted]), out.sink, self.options.device,
                    budget=self.options.max_memory)
        else:
            whole = plan(p.bound)
            whole.tensors = [wanted if x.name == t.name else x for x in whole.tensors]
            execute(whole, lambda name, row0, part: name == t.name and out.sink(name, row0, part),
                    self.options.device, budget=self.options.max_memory)
        self.cache.put(self._key(p, t.root), out.tensors[t.name])
        return out.tensors[t.name]

    def stream(self, p: Plan, done: Callable[[TensorPlan, Stats], None],
               progress: Callable[[TensorPlan], None] | None = None) -> None:
        """Statistics of every tensor of the plan, as written (output dtype), streamed
        through the executor in bounded memory; `done(t, stats)` is called as each tensor
        is complete, in the order they are computed."""
        stats = {t.name: Stats(t.shape, t.out_dtype) for t in p.tensors}
        planned = {t.name: t for t in p.tensors}
        reported: set[str] = set()

        def sink(name: str, row0: int, part: torch.Tensor) -> None:
            stats[name].add(part)

        def finished(t: TensorPlan) -> None:
            if progress is not None:
                progress(t)
            for name, s in stats.items():
                if name not in reported and s.count == _numel(planned[name].shape):
                    reported.add(name)
                    done(planned[name], s)

        execute(p, sink, self.options.device, budget=self.options.max_memory,
                progress=finished)
        for name in stats:
            if name not in reported:
                done(planned[name], stats[name])

    def compute_dtype(self, lowered: Lowered) -> torch.dtype:
        return COMPUTE_DTYPES[lowered.dtype]


def matching(names: Iterable[str], pattern: str) -> list[str]:
    """The names equal to `pattern`, or else those it finds (a regular expression)."""
    names = list(names)
    if pattern in names:
        return [pattern]
    try:
        found = re.compile(pattern)
    except re.error as exc:
        raise error(f'bad regular expression "{pattern}": {exc}', None) from None
    return [n for n in names if found.search(n)]


def _operands(node: Node) -> list[Node]:
    """The tensor operands of a node, looking through lists."""
    out = []
    for a in tensor_args(node):
        out.extend(_operands(a) if a.op is Op.LIST else [a])
    return out


def _shapes(p: Plan, root: Node) -> dict[Node, tuple[int, ...]]:
    shapes: dict[Node, tuple[int, ...]] = {}
    for node in walk(root):
        if node.kind != TENSOR:
            continue
        if node.op is Op.LOAD:
            shapes[node] = p.bound.models[node.attr[0]].source.tensors[node.attr[1]].shape
        else:
            shapes[node] = SHAPE_RULES[node.op](tensor_args(node), shapes)[0]
    return shapes


def model_wide(t: TensorPlan) -> bool:
    """Whether a planned tensor needs a whole-model reduction (every tensor's data)."""
    numel = _numel(t.shape)
    for node in walk(t.root):
        if node.op is Op.PRIM:
            reduction = PRIMITIVES[node.attr[0]].make_reduction(numel, static_args(node))
            if reduction is not None and reduction.model_wide:
                return True
    return False


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def output_infos(p: Plan) -> dict[str, TensorInfo]:
    """A plan's output tensors as headers describe tensors (for structure.describe)."""
    where = Path("<output>")
    return {t.name: TensorInfo(t.name, t.shape, t.out_dtype, where, 0, t.nbytes)
            for t in p.tensors}
