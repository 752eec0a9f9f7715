"""Sparse values: a tensor that holds one value (its fill, mostly zero) everywhere but at a
few positions, computed where its values can differ from the fill.

Online merging applies a rule to every parameter at every optimizer step, and its rules
keep 1% of an update (`keep_random`, `top_fraction`) and combine it with a task vector
kept at 1%. Computed densely, each step of such a rule is a pass over every entry of the
parameter, for values that are almost all zero. The executor instead carries these values
as `Sparse`: the primitives that keep a few entries make them, an input may be one (the
task vector an optimizer holds), and an operation on them computes at the union of their
positions only.

The results are those of the dense computation, entry for entry: an entrywise operation on
Sparse values is applied to their values at the union of their positions, and once to their
fills (0-d tensors of the same dtype) for every other position, so `0 * inf` is NaN here as
it is there. Where a dense tensor meets a Sparse value, the Sparse one becomes dense first
(see `densify`); the executor does the same for a primitive that has no sparse form.

Supports (the positions) are shared, never copied: an operation whose operands' positions
are all within one of them works on that support, and the union of two supports remembers
where each lies in it, so a chain of operations on the same few entries (OnTIES's rule:
elect a sign, mask both terms, weigh and add them) computes one union, not one per step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


class Support:
    """Sorted, distinct flat positions (int64), and the positions within it of the
    supports it was made from (so that combining with one of those needs no search)."""

    __slots__ = ("index", "within")

    def __init__(self, index: torch.Tensor):
        self.index = index
        self.within: dict[int, tuple[Support, torch.Tensor]] = {}

    def __len__(self) -> int:
        return self.index.numel()

    def positions_of(self, other: Support) -> torch.Tensor | None:
        """Where `other`'s positions lie in this support (None: they are this support's),
        if that is known without a search; else raises KeyError."""
        if other is self:
            return None
        return self.within[id(other)][1]


def union(supports: Sequence[Support]) -> tuple[Support, list[torch.Tensor | None]]:
    """The union of `supports`, and where each one's positions lie in it (None: it is the
    union). A support that holds all the others is the union; else the union is found by
    one sort of their positions together."""
    distinct = list({id(s): s for s in supports}.values())
    for candidate in distinct:
        if all(s is candidate or id(s) in candidate.within for s in distinct):
            return candidate, [candidate.positions_of(s) for s in supports]
    index, inverse = _merge_sorted([s.index for s in distinct])
    made = Support(index)
    start = 0
    for s in distinct:
        made.within[id(s)] = (s, inverse[start:start + len(s)])
        start += len(s)
    return made, [made.positions_of(s) for s in supports]


def _merge_sorted(runs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct values of sorted `runs`, sorted, and where each entry of the runs (one
    after the other) lies among them. On the CPU numpy's stable sort merges the runs (it
    finds them: linear time for two), three times faster than torch.unique's sort."""
    if runs[0].device.type != "cpu" or sum(r.numel() for r in runs) == 0:
        return torch.unique(torch.cat(runs), sorted=True, return_inverse=True)
    flat = np.concatenate([r.numpy() for r in runs])
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    first = np.empty(len(ordered), dtype=bool)  # the first of its value
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(len(flat), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return torch.from_numpy(ordered[first]), torch.from_numpy(inverse)


class Sparse:
    """A tensor of `shape` that is `fill` (a 0-d tensor) everywhere except at the flat
    positions of `support`, where it is `values`. Never written in place: operations make
    new ones, and share supports."""

    __slots__ = ("support", "values", "fill", "shape")

    def __init__(self, support: Support | torch.Tensor, values: torch.Tensor,
                 shape: Sequence[int], fill: torch.Tensor | float = 0.0):
        self.support = support if isinstance(support, Support) else Support(support)
        self.values = values
        self.shape = torch.Size(shape)
        self.fill = fill if isinstance(fill, torch.Tensor) else \
            torch.tensor(fill, dtype=values.dtype, device=values.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.values.element_size()

    def is_floating_point(self) -> bool:
        return self.values.is_floating_point()

    def clone(self) -> Sparse:
        return self  # never written in place: sharing is safe

    def dense(self) -> torch.Tensor:
        out = self.fill.expand(self.shape).clone()
        out.view(-1).index_copy_(0, self.support.index, self.values)
        return out

    def to(self, dtype: torch.dtype | None = None, device: Any = None) -> Sparse:
        """The same entries in `dtype` and on `device` (rounded as a dense tensor's are)."""
        if (dtype is None or dtype == self.dtype) and (device is None or
                                                       torch.device(device) == self.device):
            return self
        support = self.support
        if device is not None and torch.device(device) != self.device:
            support = Support(support.index.to(device))
        return Sparse(support, self.values.to(dtype=dtype, device=device), self.shape,
                      self.fill.to(dtype=dtype, device=device))

    def cpu(self) -> Sparse:
        return self.to(device="cpu")

    def rows(self, lo: int, hi: int) -> Sparse:
        """Rows [lo, hi) of the tensor (its first dimension), as a Sparse of their own."""
        row = self.shape[1:].numel()
        index = self.support.index
        bounds = torch.tensor([lo * row, hi * row], device=index.device)
        a, b = torch.searchsorted(index, bounds).tolist()
        return Sparse(index[a:b] - lo * row, self.values[a:b], (hi - lo, *self.shape[1:]),
                      self.fill)

    def on(self, support: Support, positions: torch.Tensor | None) -> torch.Tensor:
        """The values at every position of `support`, which holds this one's at
        `positions` (None: the same support)."""
        if positions is None:
            return self.values
        out = self.fill.expand(len(support)).clone()
        return out.index_copy_(0, positions, self.values)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        """The values at the sorted flat positions `index` (any positions, searched)."""
        mine = self.support.index
        if mine.numel() == 0:
            return self.fill.expand(index.shape).clone()
        where = torch.searchsorted(mine, index).clamp_(max=mine.numel() - 1)
        found = mine[where] == index
        return torch.where(found, self.values[where], self.fill)

    def nonzero_count(self) -> int:
        """How many entries are not zero."""
        rest = self.numel() - len(self.support)
        return int(torch.count_nonzero(self.values)) + (rest if bool(self.fill != 0) else 0)

    def square_sum(self) -> float:
        """The sum of the squared entries (float32 squares, as a dense tensor's .float())."""
        rest = self.numel() - len(self.support)
        return float(self.values.float().square().sum()) + rest * float(self.fill.float()) ** 2

    def __repr__(self) -> str:
        return (f"Sparse(shape={tuple(self.shape)}, {len(self.support)} entries, "
                f"fill={float(self.fill)}, dtype={self.dtype})")


class Difference:
    """a - b (in their dtype, then converted to `dtype`), computed where it is read: at a
    few positions (`gather`) without a pass over the whole, or whole once, into a's own
    memory when `in_place` (the caller gives a up: an optimizer's parameters after its
    step, whose update this is).

    `to(dtype)` and `rows(lo, hi)` give views of the same difference: all of them read
    the whole once it is computed (so a - b is never taken twice from a's memory), and a
    row block read before that computes its rows apart, never in place."""

    __slots__ = ("a", "b", "dtype", "in_place", "_dense", "_root", "_rows")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None,
                 in_place: bool = False):
        self.a, self.b, self.in_place = a, b, in_place
        self.dtype = dtype or a.dtype
        self._dense: torch.Tensor | None = None  # the whole (at the root) or a row block
        self._root: Difference = self
        self._rows: tuple[int, int] | None = None

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    @property
    def device(self) -> torch.device:
        return self.a.device

    @property
    def computed(self) -> bool:
        """Whether a - b has been computed whole (into a, when in place)."""
        return self._root._dense is not None

    def numel(self) -> int:
        return self.a.numel()

    def element_size(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    def _known(self) -> torch.Tensor | None:
        """a - b as far as it is computed: the whole's rows, or this block's own."""
        whole = self._root._dense
        if whole is not None:
            return whole if self._rows is None else whole[self._rows[0]:self._rows[1]]
        return self._dense

    def dense(self) -> torch.Tensor:
        known = self._known()
        if known is None:
            root = self._root
            if self._rows is None:
                root._dense = root.a.sub_(root.b) if root.in_place else root.a - root.b
            else:
                self._dense = self.a - self.b
            known = self._known()
        return known.to(self.dtype)

    def clone(self) -> torch.Tensor:
        return self.dense().clone()

    def _view(self, dtype: torch.dtype, rows: tuple[int, int] | None) -> Difference:
        made = Difference(self.a, self.b, dtype)
        made._root = self._root
        if rows is not None:
            made.a, made.b = self.a[rows[0]:rows[1]], self.b[rows[0]:rows[1]]
            start = self._rows[0] if self._rows is not None else 0
            made._rows = (start + rows[0], start + rows[1])
        else:
            made._rows = self._rows
        return made

    def to(self, dtype: torch.dtype | None = None, device: Any = None
           ) -> Difference | torch.Tensor:
        if device is not None and torch.device(device) != self.device:
            return self.dense().to(dtype=dtype, device=device)
        if dtype is None or dtype == self.dtype:
            return self
        return self._view(dtype, None)

    def rows(self, lo: int, hi: int) -> Difference:
        return self._view(self.dtype, (lo, hi))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        known = self._known()
        if known is not None:
            return torch.index_select(known.reshape(-1), 0, index).to(self.dtype)
        a = torch.index_select(self.a.reshape(-1), 0, index)
        return a.sub_(torch.index_select(self.b.reshape(-1), 0, index)).to(self.dtype)


def join_rows(blocks: list[tuple[int, Sparse]], shape: Sequence[int]) -> torch.Tensor | Sparse:
    """One tensor of `shape` from Sparse blocks of its rows, (first row, block) in any
    order: a Sparse when they share a fill (else dense)."""
    blocks = sorted(blocks, key=lambda b: b[0])
    if len(blocks) == 1 and blocks[0][1].shape == torch.Size(shape):
        return blocks[0][1]
    row = torch.Size(shape)[1:].numel()
    fill = blocks[0][1].fill
    if any(not torch.equal(b.fill, fill) for _, b in blocks):
        return torch.cat([b.dense().reshape(-1) for _, b in blocks]).reshape(shape)
    index = torch.cat([b.support.index + start * row for start, b in blocks])
    return Sparse(index, torch.cat([b.values for _, b in blocks]), shape, fill)


def gather(x: torch.Tensor | Sparse | Difference, index: torch.Tensor) -> torch.Tensor:
    """x's values at the sorted flat positions `index`, x dense, Sparse or a Difference."""
    if isinstance(x, Sparse):
        return x.at(index)
    if isinstance(x, Difference):
        return x.gather(index)
    return torch.index_select(x.reshape(-1), 0, index)


def is_sparse(value: Any) -> bool:
    """A Sparse value, or a list holding one."""
    return isinstance(value, Sparse) or (isinstance(value, list) and
                                         any(isinstance(v, Sparse) for v in value))


def densify(value: Any) -> Any:
    """A Sparse value or a Difference (or those of a list) as a dense tensor; anything
    else as it is."""
    if isinstance(value, (Sparse, Difference)):
        return value.dense()
    if isinstance(value, list) and any(isinstance(v, (Sparse, Difference)) for v in value):
        return [densify(v) for v in value]
    return value


def entrywise(fn: Callable[..., torch.Tensor], args: Sequence[Any]) -> Any:
    """fn(*args) for an fn whose every entry depends on the same entry of its tensor
    arguments only (an operator, `sign`, `elect_sign`...): at the union of the Sparse
    arguments' positions, and once on their fills. A dense tensor among the arguments
    makes the result dense (computed densely, as fn computes it)."""
    flat = [v for a in args for v in (a if isinstance(a, list) else [a])]
    sparse = [v for v in flat if isinstance(v, Sparse)]
    if not sparse or any(isinstance(v, torch.Tensor) for v in flat) or \
            any(s.shape != sparse[0].shape for s in sparse):
        return fn(*(densify(a) for a in args))
    support, positions = union([s.support for s in sparse])
    where = {id(s): p for s, p in zip(sparse, positions, strict=True)}

    def values(a: Any) -> Any:
        if isinstance(a, list):
            return [values(v) for v in a]
        return a.on(support, where[id(a)]) if isinstance(a, Sparse) else a

    def fills(a: Any) -> Any:
        if isinstance(a, list):
            return [fills(v) for v in a]
        return a.fill if isinstance(a, Sparse) else a

    return Sparse(support, fn(*map(values, args)), sparse[0].shape, fn(*map(fills, args)))
