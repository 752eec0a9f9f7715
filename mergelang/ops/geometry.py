"""Geometric merges: interpolation on the sphere (SLERP, NuSLERP, Multi-SLERP, the Karcher
mean), Model Stock's angle-based ratio, and the per-entry rules of NearSwap and Arcee Fusion.

The spherical methods need dot products and norms of vectors that may span the row
blocks ("chunks") a large tensor is computed in. They are gathered by a Gram reduction:
the matrix of pairwise dot products of a few tensors, taken over one of three kinds of
vectors (the `scope`):

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
order. The coefficients follow from the Gram matrix in float64; the tensors themselves
are combined in the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..reduce import Chunk, Reduction
from . import Param, primitive

_BLOCK_ELEMENTS = 1 << 18  # elements in one block of rows summed at once
_MAX_BLOCK_ROWS = 1024


def _block_rows(row_length: int) -> int:
    """Rows per block for rows of this length: fixed per tensor, whatever the chunks."""
    return max(1, min(_MAX_BLOCK_ROWS, _BLOCK_ELEMENTS // max(row_length, 1)))


def _fixed_row_sums(terms: Callable[[int, int], torch.Tensor], rows: int, length: int,
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
    return _fixed_row_sums(lambda s, e: a[s:e].double() * b[s:e].double(), rows, length,
                           torch.float64, a.device)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)


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
            self.columns.add([_as_rows(v) for v in vectors])
            return
        if self.rows is None:
            self.rows = {p: [] for p in _pairs(self.k)}
        flat = [_as_rows(v) for v in vectors]
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
    if scope == "rows" and vectors[0].dim() >= 2:
        return _rows_gram(vectors)
    gram = Gram(lambda *v: list(v), scope)
    gram.add(*vectors, None)
    gram.finish_sweep()
    return gram.result()


def _spread(coefficient: torch.Tensor, scope: str, x: torch.Tensor) -> torch.Tensor:
    """A per-vector coefficient, in x's dtype and device, shaped to broadcast against x."""
    c = coefficient.to(device=x.device, dtype=x.dtype)
    if x.dim() < 2 or scope == "tensor":
        return c
    return c.unsqueeze(-1) if scope == "rows" else c.unsqueeze(0)


def _norms(g: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(g, 0, 0, 1).clamp(min=0).sqrt().movedim(-1, 0)


# --- SLERP -------------------------------------------------------------------------------

def _slerp_reduction(numel: int, t: float, dot_threshold: float = 0.9995,
                     eps: float = 1e-8) -> Gram:
    return Gram(lambda a, b: [a, b])


@primitive("slerp_tensor", Param("a", "tensor"), Param("b", "tensor"), Param("t", "number"),
           Param("dot_threshold", "number", 0.9995, range=(0.0, 1.0)),
           Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_slerp_reduction)
def slerp_tensor(a: torch.Tensor, b: torch.Tensor, t: float, dot_threshold: float = 0.9995,
                 eps: float = 1e-8, *, chunk: Chunk | None = None) -> torch.Tensor:
    """Spherical interpolation from a (t=0) to b (t=1), each tensor taken as one vector:
    mergekit 0.1.5's slerp.

    With norms |a|, |b| (a norm of at most eps counts as 1) and the cosine
    d = clamp(a.b / (|a| |b|), -1, 1), the angle th = acos(d) gives
    sin((1-t) th)/sin(th) a + sin(t th)/sin(th) b; where |d| > dot_threshold (nearly
    colinear, or opposite) it is the linear (1-t) a + t b.
    """
    g = gram_of([a, b], "tensor", chunk)
    norms = _norms(g)
    na = torch.where(norms[0] > eps, norms[0], 1.0)
    nb = torch.where(norms[1] > eps, norms[1], 1.0)
    dot = (g[0, 1] / (na * nb)).clamp(-1, 1)
    linear = bool(dot.abs() > dot_threshold)
    if linear:
        ca, cb = torch.tensor(1 - t, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    else:
        theta = torch.acos(dot)
        ca = torch.sin((1 - t) * theta) / torch.sin(theta)
        cb = torch.sin(t * theta) / torch.sin(theta)
    return _spread(ca, "tensor", a) * a + _spread(cb, "tensor", b) * b


# --- NuSLERP -----------------------------------------------------------------------------

SCOPE = Param("over", "string", "tensor", choices=("tensor", "rows", "columns"))


def _nuslerp_reduction(numel: int, t: float, over: str = "tensor", eps: float = 1e-8) -> Gram:
    return Gram(lambda a, b: [a, b], over)


@primitive("nuslerp_vectors", Param("a", "tensor"), Param("b", "tensor"), Param("t", "number"),
           SCOPE, Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_nuslerp_reduction)
def nuslerp_vectors(a: torch.Tensor, b: torch.Tensor, t: float, over: str = "tensor",
                    eps: float = 1e-8, *, chunk: Chunk | None = None) -> torch.Tensor:
    """Spherical interpolation with mergekit 0.1.5 nuslerp's rule, over each vector of
    `over`: "tensor" (flattened), "rows" (along the last dimension) or "columns" (along
    the first dimension; mergekit's nuslerp_row_wise). A tensor of at most one dimension
    is one vector whatever `over` says.

    The norms are clamped to at least 1e-7; cos = clamp(a.b / (|a| |b|), -1, 1);
    vectors with 1 - cos^2 <= eps^2 in float32 (colinear, or opposite) get (1-t) a + t b,
    the others (sin((1-t) th) a + sin(t th) b) / sin(th) with th = acos(cos).
    """
    scope = over if a.dim() >= 2 else "tensor"
    g = gram_of([a, b], over, chunk)
    norms = _norms(g).clamp(min=1e-7)
    cos = (g[0, 1] / (norms[0] * norms[1])).clamp(-1, 1)
    # the test in float32, mergekit's precision: in float64 it holds only for cos = +-1
    # exactly, and nearly opposite vectors would get sin(th) ~ 1e-8 as a divisor
    single = cos.float()
    colinear = ((1 - single * single) <= eps * eps).to(cos.device)
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    ca, cb = torch.sin((1 - t) * theta), torch.sin(t * theta)
    if scope == "tensor" and bool(colinear):
        return (1 - t) * a + t * b
    spherical = (_spread(ca, scope, a) * a + _spread(cb, scope, b) * b) \
        / _spread(torch.sin(theta), scope, a)
    if scope == "tensor":
        return spherical
    return torch.where(_spread(colinear, scope, a).bool(), (1 - t) * a + t * b, spherical)


# --- Multi-SLERP: unit, norm_along ---------------------------------------------------------

def _one(numel: int, eps: float = 1e-8) -> Gram:
    return Gram(lambda x: [x])


@primitive("unit", Param("x", "tensor"), Param("eps", "number", 1e-8, range=(0.0, 1.0)),
           reduction=_one)
def unit(x: torch.Tensor, eps: float = 1e-8, *, chunk: Chunk | None = None) -> torch.Tensor:
    """x / (|x| + eps): x projected onto the unit sphere (the tensor as one vector)."""
    norm = _norms(gram_of([x], "tensor", chunk))[0]
    return x / (norm + eps).to(device=x.device, dtype=x.dtype)


def _two(numel: int, eps: float = 1e-8) -> Gram:
    return Gram(lambda x, d: [x, d])


@primitive("norm_along", Param("x", "tensor"), Param("direction", "tensor"),
           Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_two)
def norm_along(x: torch.Tensor, direction: torch.Tensor, eps: float = 1e-8, *,
               chunk: Chunk | None = None) -> torch.Tensor:
    """|x| direction / |direction|: x's norm along direction; x itself where
    |direction| < eps (no direction to take)."""
    norms = _norms(gram_of([x, direction], "tensor", chunk))
    if float(norms[1]) < eps:
        return x.clone()  # a value of its own: the engine may overwrite it in place
    return (norms[0] / norms[1]).to(device=x.device, dtype=x.dtype) * direction


# --- Karcher mean --------------------------------------------------------------------------

def _karcher_reduction(numel: int, max_iter: float = 10, tol: float = 1e-5) -> Gram:
    return Gram(lambda xs: list(xs))


@primitive("karcher_mean", Param("xs", "tensors"),
           Param("max_iter", "number", 10, range=(0, 10_000)),
           Param("tol", "number", 1e-5, range=(0.0, 1.0)), reduction=_karcher_reduction,
           maps=False)
def karcher_mean(xs: list[torch.Tensor], max_iter: float = 10, tol: float = 1e-5, *,
                 chunk: Chunk | None = None) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the tensors' directions on the unit sphere, with
    equal weights, times their mean norm: mergekit 0.1.5's karcher.

    Tensors of norm <= tol take no part in the direction. The mean starts at the
    normalised average of the unit vectors and moves by the exponential map of the
    weighted tangent sum(alpha th_i / sin th_i (u_i - cos th_i m)) until its norm is below
    tol or after max_iter steps. The mean stays in the span of the inputs, so the steps
    are taken on their coefficients, with the Gram matrix as the inner product.
    """
    g = gram_of(list(xs), "tensor", chunk)
    coefficients = _karcher_coefficients(g, int(max_iter), tol)
    out = None
    for c, x in zip(coefficients.tolist(), xs, strict=True):
        term = torch.tensor(c, dtype=x.dtype, device=x.device) * x
        out = term if out is None else out + term
    return out


def _karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The result as sum_j c_j x_j: the c_j, from the Gram matrix g of the x_j."""
    k = g.shape[0]
    norms = _norms(g)
    result = torch.zeros(k, dtype=torch.float64)
    valid = [i for i in range(k) if norms[i] > tol]
    if not valid:
        return result
    n = norms[valid]
    u = g[valid][:, valid] / torch.outer(n, n)    # Gram matrix of the unit vectors
    alpha = 1.0 / len(valid)
    basis = torch.eye(len(valid), dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ u @ c), 0.0))

    mean = torch.full((len(valid),), alpha, dtype=torch.float64)
    length = norm(mean)
    mean = basis[0].clone() if length < tol else mean / length
    for _ in range(max_iter):
        tangent = torch.zeros(len(valid), dtype=torch.float64)
        cosines = (u @ mean).clamp(-1, 1)
        for i in range(len(valid)):
            theta = math.acos(float(cosines[i]))
            if theta < tol:
                continue
            tangent += alpha * (theta / math.sin(theta)) * (basis[i] - cosines[i] * mean)
        step = norm(tangent)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        length = norm(mean)
        if length > tol:
            mean = mean / length
    scale = sum(float(x) for x in norms) / k
    result[valid] = scale * mean / n
    return result


# --- Model Stock ---------------------------------------------------------------------------

def _stock_reduction(numel: int, over: str = "tensor", fine_tunes: float = 2) -> Gram:
    return Gram(_offsets, over)


def _offsets(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m - base for m in models]


@primitive("stock_ratio", Param("base", "tensor"), Param("models", "tensors"),
           Param("over", "string", "tensor", choices=("tensor", "rows")),
           Param("fine_tunes", "number", 2, range=(2, math.inf)), reduction=_stock_reduction)
def stock_ratio(base: torch.Tensor, models: list[torch.Tensor], over: str = "tensor",
                fine_tunes: float = 2, *, chunk: Chunk | None = None) -> torch.Tensor:
    """Model Stock's interpolation ratio t, per entry (constant over the tensor, or over
    each row with over="rows"): t = N cos / (1 + (N - 1) cos), where cos is the mean
    cosine between the N fine-tunes' offsets from base (each norm product clamped to at
    least 1e-6, each cosine to [-1, 1]); t = 0 where |1 + (N - 1) cos| < 1e-6.
    `fine_tunes` is N, given so a call with fewer than two is an error in the script.
    """
    if len(models) < 2:
        raise ValueError("stock_ratio needs at least two fine-tuned models")
    offsets = _offsets(base, models)
    scope = over if base.dim() >= 2 else "tensor"
    g = gram_of(offsets, over, chunk)
    count = len(models)
    norms = _norms(g)
    cosines = [(g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(count) for j in range(i + 1, count)]
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    return _spread(t, scope, base).expand(base.shape).contiguous()


# --- NearSwap ------------------------------------------------------------------------------

@primitive("swap_weight", Param("a", "tensor"), Param("b", "tensor"), Param("t", "number"))
def swap_weight(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap's per-entry weight of b: clamp(t / max(|a - b|, 1e-6), 0, 1), so entries
    closer than t take b, and farther ones move toward b by t / |a - b|."""
    return (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)


# --- Arcee Fusion --------------------------------------------------------------------------

_FUSION_EPS = 1e-8


def _kl_terms(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    p = F.softmax(model, dim=-1) + _FUSION_EPS
    q = F.softmax(base, dim=-1) + _FUSION_EPS
    return p * torch.log(p / q)


def _importance_rows(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|model - base| times the KL divergence of the rows' softmaxes (two or more
    dimensions: each row is in the chunk, and its sum is chunk-independent)."""
    terms = _kl_terms(model, base)
    length = terms.shape[-1]
    flat = terms.reshape(-1, length)
    kl = _fixed_row_sums(lambda s, e: flat[s:e], flat.shape[0], length, terms.dtype,
                         terms.device)
    return (model - base).abs() * kl.reshape(*terms.shape[:-1], 1)


def _vector_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The KL divergence of a whole tensor of at most one dimension, as one vector."""
    return torch.sum(_kl_terms(model.reshape(-1), base.reshape(-1)), dim=-1, keepdim=True)


def _order_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 values as int64 keys in [0, 2^32) that sort like the values."""
    bits = x.detach().float().reshape(-1).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def _key_value(key: int) -> torch.Tensor:
    bits = key - (1 << 31) if key >= 1 << 31 else 0xFFFFFFFF - key
    signed = bits - (1 << 32) if bits >= 1 << 31 else bits
    return torch.tensor([signed], dtype=torch.int32).view(torch.float32)[0]


def _histogram(counts: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """Add the counts of 16-bit keys to a 65536-bin histogram (exact integer counts)."""
    if counts is None:
        counts = torch.zeros(1 << 16, dtype=torch.int64)
    if keys.numel() >= 1 << 14:
        return counts + torch.bincount(keys, minlength=1 << 16).cpu()
    keys = keys.cpu()
    return counts.index_add_(0, keys, torch.ones_like(keys))


def _find(counts: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the value of this rank (0 = smallest), and its rank in the bin."""
    through = counts.cumsum(0)
    b = int(torch.searchsorted(through, rank, right=True))
    return b, rank - (int(through[b]) - int(counts[b]))


class FusionThreshold(Reduction):
    """Arcee Fusion's threshold on the importance: median + 1.5 (q3 - q1), with the
    quartiles the sorted values at floor(q (n - 1)), found exactly: in one chunk by
    selection, over several by a two-sweep radix selection on the values' bits. A tensor
    of at most one dimension (one softmax over all of it) is gathered whole."""

    def __init__(self, numel: int):
        self.numel = numel
        self.ranks = [(numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4]
        self.sweep = 0
        self.high: torch.Tensor | None = None
        self.bins: list[tuple[int, int]] = []
        self.low: dict[int, torch.Tensor] = {}
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.found: tuple | None = (None, torch.tensor(0.0)) if numel == 0 else None

    def sweeps(self, chunks: int) -> int:
        return 1 if chunks == 1 or self.found is not None else 2

    def add(self, model: torch.Tensor, base: torch.Tensor, chunk: Chunk | None) -> None:
        if self.found is not None:
            return
        if model.dim() <= 1:
            self.parts.append((model.detach().reshape(-1).clone(),
                               base.detach().reshape(-1).clone()))
            return
        keys = _order_keys(_importance_rows(model, base))
        if self.sweep == 0 and keys.numel() == self.numel:
            self.found = (None, self._threshold(self._select(keys)))
        elif self.sweep == 0:
            self.high = _histogram(self.high, keys >> 16)
        else:
            high = keys >> 16
            for b in {b for b, _ in self.bins}:
                self.low[b] = _histogram(self.low.get(b), keys[high == b] & 0xFFFF)

    def finish_sweep(self) -> bool:
        if self.found is not None:
            return True
        if self.parts:
            model = torch.cat([m for m, _ in self.parts])
            base = torch.cat([b for _, b in self.parts])
            kl = _vector_kl(model, base)
            keys = _order_keys((model - base).abs() * kl)
            self.found = (kl, self._threshold(self._select(keys)))
            return True
        if self.sweep == 0:
            self.bins = [_find(self.high, r) for r in self.ranks]
            self.sweep = 1
            return False
        values = [(b << 16) | _find(self.low[b], r)[0] for b, r in self.bins]
        self.found = (None, self._threshold(values))
        return True

    def _select(self, keys: torch.Tensor) -> list[int]:
        return [int(torch.kthvalue(keys.cpu(), r + 1).values) for r in self.ranks]

    @staticmethod
    def _threshold(keys: list[int]) -> torch.Tensor:
        q1, median, q3 = (_key_value(k) for k in keys)
        return median + 1.5 * (q3 - q1)

    def result(self) -> tuple:
        """(the KL of a tensor of at most one dimension, else None; the threshold)."""
        assert self.found is not None
        return self.found


@primitive("fusion_mask", Param("model", "tensor"), Param("base", "tensor"),
           reduction=lambda numel: FusionThreshold(numel))
def fusion_mask(model: torch.Tensor, base: torch.Tensor, *,
                chunk: Chunk | None = None) -> torch.Tensor:
    """Arcee Fusion's mask: 1 where the importance |model - base| * KL(softmax(model) ||
    softmax(base)) (softmax and KL along the last dimension, 1e-8 added to both
    distributions) is at least median + 1.5 (q3 - q1) of the tensor's importances, else 0.
    """
    stats = chunk.stats if chunk is not None else None
    if stats is None:
        reduction = FusionThreshold(model.numel())
        reduction.add(model, base, None)
        reduction.finish_sweep()
        stats = reduction.result()
    kl, threshold = stats
    if model.dim() <= 1:
        if kl is None:  # one chunk: the whole tensor is here
            kl = _vector_kl(model, base)
        importance = (model - base).abs().reshape(-1) * kl.to(model.device)
        importance = importance.reshape(model.shape)
    else:
        importance = _importance_rows(model, base)
    return (importance >= threshold.to(model.device)).to(model.dtype)
