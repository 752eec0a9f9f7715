"""Dot products of vectors that span the row blocks ("chunks") a large tensor is computed
in, with bits that do not depend on the chunking: the Gram reduction of the spherical
merges (ops/geometry.py).

A Gram matrix holds the pairwise dot products of a few same-shape tensors, taken over one
of three kinds of vectors (the `scope`):

- "tensor":  each tensor is one vector (SLERP, Multi-SLERP, Karcher, Model Stock);
- "rows":    the vectors along the last dimension (NuSLERP without flattening, Model
             Stock's filter_wise); a chunk holds whole rows, so the products are taken
             inside the chunk, except for a tensor of one dimension (or none), whose one
             vector is the whole tensor;
- "columns": the vectors along the first dimension (NuSLERP row_wise), summed across
             the chunks.

Every sum is taken so that its bits do not depend on how the rows are chunked: products
in float64, each row summed left to right, rows combined by math.fsum (exact), column
sums taken on blocks of rows of one fixed shape and accumulated block by block in row
order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..reduce import Chunk, Reduction, reduce_whole, rows

BLOCK_ELEMENTS = 1 << 18  # elements in one block of rows summed at once
MAX_BLOCK_ROWS = 1024


def _block_rows(row_length: int) -> int:
    """Rows per block for rows of this length: fixed per tensor, whatever the chunks."""
    return max(1, min(MAX_BLOCK_ROWS, BLOCK_ELEMENTS // max(row_length, 1)))


def fixed_row_sums(terms: Callable[[int, int], torch.Tensor], rows: int, length: int,
                    dtype: torch.dtype, device) -> torch.Tensor:
    """Per-row sums of terms(start, stop) (a [stop - start, length] block, taken a bounded
    number of rows at a time). Each row is summed left to right (a cumulative sum, which
    torch computes sequentially along the row), so its bits do not depend on which or
    how many rows it is computed with, unlike sum(), whose order follows the shape."""
    if length == 1:
        return terms(0, rows).reshape(rows)
    size = _block_rows(length)
    sums = [terms(start, min(start + size, rows)).cumsum(1)[:, -1]
            for start in range(0, rows, size)]
    return torch.cat(sums) if sums else torch.zeros(0, dtype=dtype, device=device)


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k a[r, k] * b[r, k] for each row r of two [rows, length] tensors, in float64."""
    rows, length = a.shape
    return fixed_row_sums(lambda s, e: a[s:e].double() * b[s:e].double(), rows, length,
                           torch.float64, a.device)


def _pairs(k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(i, k)]


class _ColumnSums:
    """sum over rows of a_i[r, c] * a_j[r, c], per column c, for every pair (i, j): rows
    summed in blocks of a fixed shape, fixed by their absolute row index (rows of a block
    cut by a chunk boundary wait for the next chunk), blocks added in row order."""

    def __init__(self):
        self.pending: list[list[torch.Tensor]] = []   # per input: row pieces not yet summed
        self.waiting = 0
        self.totals: dict[tuple[int, int], torch.Tensor] = {}
        self.size = 0

    def add(self, vectors: list[torch.Tensor]) -> None:
        self.size = _block_rows(vectors[0].shape[1])
        if not self.pending:
            self.pending = [[] for _ in vectors]
        rows = vectors[0].shape[0]
        if self.waiting + rows < self.size:  # kept past this chunk: copied
            for pieces, v in zip(self.pending, vectors, strict=True):
                pieces.append(v.clone())
            self.waiting += rows
            return
        joined = [torch.cat([*pieces, v]) if pieces else v
                  for pieces, v in zip(self.pending, vectors, strict=True)]
        total = self.waiting + rows
        full = total - total % self.size
        for start in range(0, full, self.size):
            self._block([v[start:start + self.size] for v in joined])
        self.pending = [[v[full:].clone()] if full < total else [] for v in joined]
        self.waiting = total - full

    def finish(self) -> None:
        if self.waiting:
            joined = [torch.cat(pieces) for pieces in self.pending]
            pad = self.size - self.waiting
            self._block([torch.cat([v, v.new_zeros(pad, v.shape[1])]) for v in joined])
        self.pending, self.waiting = [], 0

    def _block(self, block: list[torch.Tensor]) -> None:
        wide = [b.double() for b in block]
        for i, j in _pairs(len(wide)):
            s = (wide[i] * wide[j]).sum(0)
            self.totals[i, j] = s if (i, j) not in self.totals else self.totals[i, j] + s


class Gram(Reduction):
    """The dot products of every pair of a few same-shape tensors, over the vectors of
    `scope` ("tensor", "rows" or "columns"). `vectors_of` turns the primitive's tensor
    arguments (one chunk of them) into those tensors.

    result(): a float64 tensor G of shape [k, k] for one vector per tensor (scope
    "tensor", or any scope on a tensor of at most one dimension), [k, k, *shape[1:]] for
    "columns", and None for "rows" on a tensor of two or more dimensions (the primitive
    takes those products inside each chunk: see gram_of).
    """

    def __init__(self, vectors_of: Callable[..., list[torch.Tensor]], scope: str = "tensor"):
        self.vectors_of, self.scope = vectors_of, scope
        self.rows: dict[tuple[int, int], list[float]] | None = None
        self.columns: _ColumnSums | None = None
        self.k = 0
        self.tail: tuple[int, ...] = ()

    def sweeps(self, chunks: int) -> int:
        # "rows" in one chunk: the primitive takes the products itself. In several chunks
        # the sweep is needed only for a tensor of one dimension, but which it is shows
        # only in add(), so a larger tensor gets a sweep that does nothing.
        return 0 if self.scope == "rows" and chunks == 1 else 1

    def add(self, *args) -> None:
        vectors = [v.detach() for v in self.vectors_of(*args[:-1])]
        self.k = len(vectors)
        x = vectors[0]
        if x.dim() >= 2 and self.scope == "rows":
            return
        if x.dim() >= 2 and self.scope == "columns":
            if self.columns is None:
                self.columns = _ColumnSums()
            self.tail = tuple(x.shape[1:])
            self.columns.add([rows(v) for v in vectors])
            return
        if self.rows is None:
            self.rows = {p: [] for p in _pairs(self.k)}
        flat = [rows(v) for v in vectors]
        for i, j in _pairs(self.k):
            self.rows[i, j] += _row_dots(flat[i], flat[j]).tolist()

    def finish_sweep(self) -> bool:
        if self.columns is not None:
            self.columns.finish()
        return True

    def result(self) -> torch.Tensor | None:
        if self.rows is not None:
            g = torch.empty(self.k, self.k, dtype=torch.float64)
            for (i, j), parts in self.rows.items():
                g[i, j] = g[j, i] = math.fsum(parts)
            return g
        if self.columns is not None:
            totals = self.columns.totals
            g = torch.empty(self.k, self.k, *self.tail, dtype=torch.float64,
                            device=totals[0, 0].device)
            for (i, j), s in totals.items():
                g[i, j] = g[j, i] = s.reshape(self.tail)
            return g
        return None


def _rows_gram(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix of the vectors along the last dimension: [k, k, *shape[:-1]]."""
    lead, length = vectors[0].shape[:-1], vectors[0].shape[-1]
    flat = [v.reshape(-1, length) for v in vectors]
    g = torch.empty(len(vectors), len(vectors), *lead, dtype=torch.float64,
                    device=vectors[0].device)
    for i, j in _pairs(len(vectors)):
        g[i, j] = g[j, i] = _row_dots(flat[i], flat[j]).reshape(lead)
    return g


def gram_of(vectors: list[torch.Tensor], scope: str, chunk: Chunk | None) -> torch.Tensor:
    """The Gram matrix for this chunk: from the reduction, or computed here (per-row
    vectors, or a direct call on a whole tensor)."""
    if chunk is not None and chunk.stats is not None:
        return chunk.stats
    if vectors[0].dim() < 2:  # one vector per tensor, whatever the scope
        scope = "tensor"
    if scope == "rows":
        return _rows_gram(vectors)
    return reduce_whole(Gram(lambda *v: list(v), scope), vectors, chunk)


def spread(coefficient: torch.Tensor, scope: str, x: torch.Tensor) -> torch.Tensor:
    """A per-vector coefficient, in x's dtype and device, shaped to broadcast against x."""
    c = coefficient.to(device=x.device, dtype=x.dtype)
    if x.dim() < 2 or scope == "tensor":
        return c
    return c.unsqueeze(-1) if scope == "rows" else c.unsqueeze(0)


def vector_norms(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, 0, 0, 1).clamp(min=0).sqrt().movedim(-1, 0)
