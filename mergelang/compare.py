"""`mergelang diff BASE MODEL...`: the task vectors of fine-tunes against their base,
streamed tensor by tensor in bounded memory.

For each tensor name the base and every model have (same shape, floating point), the
deltas `model - base` are computed in float32 in blocks of rows, and sums are gathered
from which every figure follows, for one tensor or any group of tensors:

- relative norm    ‖Δᵢ‖ / ‖base‖: how far a fine-tune moved;
- cosine           ⟨Δᵢ, Δⱼ⟩ / (‖Δᵢ‖ ‖Δⱼ‖): whether two fine-tunes moved the same way;
- sign conflicts   the fraction of entries where the deltas, each trimmed to its top
                   `density` by magnitude, have both a positive and a negative value kept:
                   the interference TIES resolves by electing a sign;
- trim mass        ‖trim(Δᵢ, density)‖₁ / ‖Δᵢ‖₁: the share of a delta's L1 mass a trim at
                   that density keeps (a random drop at that density keeps `density` of it,
                   in expectation);
- zeros            the fraction of entries a fine-tune did not change at all.

The trim is the language's own `trim` primitive (its exact top-k selection and tie rule),
fed through its reduction exactly as the executor feeds it, so "what a trim at that
density keeps" here is what a merge would keep. A tensor larger than the memory budget
is read in row blocks: twice more for the top-k selection, then once for the figures.
Group figures are ratios of summed sums, so a layer's cosine is the cosine of its
tensors taken together, not a mean of cosines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from .diagnostics import Diagnostic, MergeError
from .io.errors import ModelFileError
from .io.read import SafetensorsModel
from .io.sources import open_plain_model
from .ops import PRIMITIVES, TENSOR_KINDS
from .reduce import Chunk, Reduction
from .schedule import DEFAULT_BUDGET
from .structure import module_of, place_of, place_order


@dataclass
class Sums:
    """The sums every figure is made of, for one tensor or a group of tensors."""

    models: int
    numel: int = 0
    base_sq: float = 0.0
    sq: list[float] = field(default_factory=list)
    l1: list[float] = field(default_factory=list)
    kept_l1: list[float] = field(default_factory=list)
    zeros: list[int] = field(default_factory=list)
    dots: dict[tuple[int, int], float] = field(default_factory=dict)
    conflicts: int = 0

    def __post_init__(self) -> None:
        n = self.models
        self.sq = self.sq or [0.0] * n
        self.l1 = self.l1 or [0.0] * n
        self.kept_l1 = self.kept_l1 or [0.0] * n
        self.zeros = self.zeros or [0] * n
        self.dots = self.dots or {pair: 0.0 for pair in combinations(range(n), 2)}

    def add(self, other: Sums) -> None:
        self.numel += other.numel
        self.base_sq += other.base_sq
        self.conflicts += other.conflicts
        for i in range(self.models):
            self.sq[i] += other.sq[i]
            self.l1[i] += other.l1[i]
            self.kept_l1[i] += other.kept_l1[i]
            self.zeros[i] += other.zeros[i]
        for pair in self.dots:
            self.dots[pair] += other.dots[pair]

    # the figures

    def relative_norm(self, i: int) -> float:
        return _ratio(math.sqrt(self.sq[i]), math.sqrt(self.base_sq))

    def cosine(self, i: int, j: int) -> float:
        return _ratio(self.dots[(min(i, j), max(i, j))], math.sqrt(self.sq[i] * self.sq[j]))

    def sign_conflicts(self) -> float:
        return _ratio(self.conflicts, self.numel)

    def trim_mass(self, i: int) -> float:
        return _ratio(self.kept_l1[i], self.l1[i])

    def zero_fraction(self, i: int) -> float:
        return _ratio(self.zeros[i], self.numel)

    def figures(self, labels: list[str]) -> dict[str, Any]:
        """The figures of this group as plain JSON values (null for a figure that does not
        exist), models named by `labels`."""
        n = self.models
        return {
            "parameters": self.numel,
            "relative_norm": {labels[i]: _json(self.relative_norm(i)) for i in range(n)},
            "delta_norm": {labels[i]: math.sqrt(self.sq[i]) for i in range(n)},
            "cosine": [{"a": labels[i], "b": labels[j], "cosine": _json(self.cosine(i, j))}
                       for i, j in self.dots],
            "sign_conflicts": _json(self.sign_conflicts()),
            "trim_mass": {labels[i]: _json(self.trim_mass(i)) for i in range(n)},
            "zeros": {labels[i]: _json(self.zero_fraction(i)) for i in range(n)},
        }


def _json(x: float) -> float | None:
    return None if math.isnan(x) else x


def _ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 (a figure that does not exist, e.g. the cosine of a zero
    delta): JSON and tables show it as such rather than as a made-up 0."""
    return a / b if b else math.nan


@dataclass
class Comparison:
    """What `diff` found: per-tensor sums, and the tensors it could not compare."""

    base: str
    models: list[str]
    density: float
    tensors: dict[str, Sums]
    skipped: dict[str, str]              # tensor name -> why

    def total(self) -> Sums:
        return self.group(lambda name: "all")["all"]

    def group(self, key: Callable[[str], Hashable]) -> dict[Any, Sums]:
        """The sums of the tensors that share key(name), in tensor order."""
        out: dict[str, Sums] = {}
        for name, sums in self.tensors.items():
            out.setdefault(key(name), Sums(len(self.models))).add(sums)
        return out

    def by_layer(self) -> dict[str, Sums]:
        """Layer by layer: the embeddings ("before") first, the head ("after") last."""
        groups = self.group(place_of)
        return {k: groups[k] for k in sorted(groups, key=place_order)}

    def by_module(self) -> dict[str, Sums]:
        """Module type by module type, in the order of the places they first appear."""
        first: dict[str, str] = {}
        for name in self.tensors:
            first.setdefault(module_of(name), place_of(name))
        groups = self.group(module_of)
        return {k: groups[k] for k in sorted(groups, key=lambda k: place_order(first[k]))}

    def as_json(self) -> dict[str, Any]:
        labels = self.models
        return {
            "base": self.base, "models": labels, "density": self.density,
            "overall": self.total().figures(labels),
            "layers": [{"layer": k, **s.figures(labels)} for k, s in self.by_layer().items()],
            "modules": [{"module": k, **s.figures(labels)}
                        for k, s in self.by_module().items()],
            "tensors": [{"tensor": k, **s.figures(labels)} for k, s in self.tensors.items()],
            "skipped": [{"tensor": k, "reason": v} for k, v in self.skipped.items()],
        }


def compare(base: str | Path, models: list[str | Path], density: float = 0.2,
            budget: int = DEFAULT_BUDGET,
            progress: Callable[[int, int], None] | None = None) -> Comparison:
    """The task vectors of `models` against `base`. Raises MergeError for unusable input.

    `budget` bounds the tensor data held at once (bytes); `progress(n, total)` is told
    the bytes of each tensor as it is done, and the bytes of all of them."""
    if not 0 <= density <= 1:
        raise MergeError(Diagnostic(f"--density must be in [0, 1], not {density:g}",
                                    hint="e.g. --density 0.2: the top 20% by magnitude"))
    opened: list[SafetensorsModel] = []
    try:
        for path in [base, *models]:
            opened.append(_open(path))
        return _compare(opened, [str(base), *map(str, models)], density, budget, progress)
    finally:
        for model in opened:
            model.close()


def _open(path: str | Path) -> SafetensorsModel:
    try:
        return open_plain_model(Path(path))
    except ModelFileError as exc:
        raise MergeError(Diagnostic(exc.message, hint=exc.hint)) from None


def _compare(opened: list[SafetensorsModel], labels: list[str], density: float, budget: int,
             progress: Callable[[int, int], None] | None) -> Comparison:
    base, models = opened[0], opened[1:]
    result = Comparison(labels[0], labels[1:], density, {}, {})
    order = sorted(base.tensors.values(), key=lambda t: (str(t.file), t.offset))
    names = []
    for info in order:
        reason = _why_not(info.name, opened, labels)
        if reason is None:
            names.append(info.name)
        else:
            result.skipped[info.name] = reason
    total = sum(m.tensors[name].nbytes for name in names for m in opened)
    for name in names:
        result.tensors[name] = _tensor(name, base, models, density, budget)
        if progress is not None:
            progress(sum(m.tensors[name].nbytes for m in opened), total)
    extra = sorted({n for m in models for n in m.tensors} - set(base.tensors))
    for name in extra:
        result.skipped[name] = "not in the base"
    if not result.tensors:
        raise MergeError(Diagnostic(
            "no tensor can be compared: the models share no floating-point tensor of the "
            "same shape with the base", hint="diff takes a base and fine-tunes of it"))
    return result


def _why_not(name: str, opened: list[SafetensorsModel], labels: list[str]) -> str | None:
    info = opened[0].tensors[name]
    if not info.dtype.is_floating_point:
        return f"not a floating-point tensor ({str(info.dtype).removeprefix('torch.')})"
    for model, label in zip(opened[1:], labels[1:], strict=True):
        other = model.tensors.get(name)
        if other is None:
            return f"not in {label}"
        if other.shape != info.shape:
            return f"shape {list(info.shape)} in the base but {list(other.shape)} in {label}"
    return None


def _trim() -> tuple[Callable, Callable[[int], Reduction | None], dict[str, Any]]:
    """trim's function and reduction factory, by its declared parameters."""
    prim = PRIMITIVES["trim"]
    given = {"scope": "tensor"}
    return prim.fn, lambda numel, density: prim.make_reduction(numel, tuple(
        density if p.name == "density" else given[p.name]
        for p in prim.params if p.kind not in TENSOR_KINDS)), given


def _tensor(name: str, base: SafetensorsModel, models: list[SafetensorsModel],
            density: float, budget: int) -> Sums:
    info = base.tensors[name]
    n = len(models)
    numel = math.prod(info.shape)
    rows = info.shape[0] if info.shape else 1
    row_numel = numel // rows if rows else 0
    # float32 rows held at once, by count: every model's (the deltas are made in place),
    # and inside trim |delta|, its 32-bit keys and their 64-bit counts, the mask and the
    # trimmed delta, and the sign masks; with room for the allocator's slack
    chunk_rows = max(1, min(rows, budget // max(1, row_numel * 4 * (2 * n + 10))))
    chunks = [(r, min(r + chunk_rows, rows)) for r in range(0, rows, chunk_rows)]
    trim, make, given = _trim()
    reductions = [make(numel, density) for _ in models]
    stats: list[Any] = [None] * n
    for i, r in enumerate(reductions):
        if r is None or r.sweeps(len(chunks)) == 0:
            stats[i] = r.result() if r is not None else None
    while any(s is None for s in stats):  # the top-k selection's sweeps (large tensors)
        states: list[dict] = [{} for _ in models]
        for rows_ in chunks:
            _, deltas = _load(name, base, models, rows_ if len(chunks) > 1 else None)
            for i, d in enumerate(deltas):
                if stats[i] is None:
                    reductions[i].add(d, Chunk(numel, rows_[0] * row_numel, None, states[i],
                                               None, name))
        for i, r in enumerate(reductions):
            if stats[i] is None and r.finish_sweep():
                stats[i] = r.result()
    sums = Sums(n, numel)
    states = [{} for _ in models]
    for rows_ in chunks:
        b, deltas = _load(name, base, models, rows_ if len(chunks) > 1 else None)
        sums.base_sq += _dot(b, b)
        positive = torch.zeros(b.shape, dtype=torch.bool)
        negative = torch.zeros(b.shape, dtype=torch.bool)
        for i, d in enumerate(deltas):
            sums.sq[i] += _dot(d, d)
            sums.l1[i] += _l1(d)
            sums.zeros[i] += d.numel() - int(torch.count_nonzero(d))
            chunk = Chunk(numel, rows_[0] * row_numel, stats[i], states[i], None, name)
            kept = trim(d, density=density, **given, chunk=chunk)
            sums.kept_l1[i] += _l1(kept)
            positive |= kept > 0
            negative |= kept < 0
        for i, j in sums.dots:
            sums.dots[(i, j)] += _dot(deltas[i], deltas[j])
        sums.conflicts += int(torch.count_nonzero(positive & negative))
    return sums


def _load(name: str, base: SafetensorsModel, models: list[SafetensorsModel],
          rows: tuple[int, int] | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base's rows and each model's delta, in float32 (each a copy of its own)."""
    b = base.load(name, rows, dtype=torch.float32)
    return b, [m.load(name, rows, dtype=torch.float32).sub_(b) for m in models]


# Sums within a block of rows are float32 (pairwise, as BLAS and torch add: a relative
# error near 1e-7 on these sizes); the blocks' sums are added in float64.


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a.reshape(-1), b.reshape(-1)))


def _l1(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.reshape(-1), 1))
