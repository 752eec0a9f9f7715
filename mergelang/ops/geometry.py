"""Geometric merges: interpolation on the sphere (SLERP, NuSLERP, Multi-SLERP, the Karcher
mean), Model Stock's angle-based ratio, and the per-entry rules of NearSwap and Arcee Fusion.

The spherical methods need dot products and norms of vectors that may span the row blocks
("chunks") a large tensor is computed in: they come from a Gram reduction (ops/gram.py),
whose sums have bits that do not depend on the chunking. The coefficients follow from the
Gram matrix in float64; the tensors themselves are combined in the compute dtype. Arcee
Fusion's quartiles are exact order statistics (selection.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reduce import Chunk, Reduction, reduce_whole
from ..selection import OrderStatistics
from . import Param, primitive
from .gram import Gram, fixed_row_sums, gram_of, spread, vector_norms

# --- SLERP -------------------------------------------------------------------------------

def _pair(numel: int) -> Gram:
    return Gram(lambda a, b: [a, b])


@primitive("slerp_tensor", Param("a", "tensor"), Param("b", "tensor"), Param("t", "number"),
           Param("dot_threshold", "number", 0.9995, range=(0.0, 1.0)),
           Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_pair)
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
    norms = vector_norms(g)
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
    return spread(ca, "tensor", a) * a + spread(cb, "tensor", b) * b


# --- NuSLERP -----------------------------------------------------------------------------

OVER = Param("over", "string", "tensor", choices=("tensor", "rows", "columns"))


def _nuslerp_reduction(numel: int, over: str) -> Gram:
    return Gram(lambda a, b: [a, b], over)


@primitive("nuslerp_vectors", Param("a", "tensor"), Param("b", "tensor"), Param("t", "number"),
           OVER, Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_nuslerp_reduction)
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
    norms = vector_norms(g).clamp(min=1e-7)
    cos = (g[0, 1] / (norms[0] * norms[1])).clamp(-1, 1)
    # the test in float32, mergekit's precision: in float64 it holds only for cos = +-1
    # exactly, and nearly opposite vectors would get sin(th) ~ 1e-8 as a divisor
    single = cos.float()
    colinear = ((1 - single * single) <= eps * eps).to(cos.device)
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    ca, cb = torch.sin((1 - t) * theta), torch.sin(t * theta)
    if scope == "tensor" and bool(colinear):
        return (1 - t) * a + t * b
    spherical = (spread(ca, scope, a) * a + spread(cb, scope, b) * b) \
        / spread(torch.sin(theta), scope, a)
    if scope == "tensor":
        return spherical
    return torch.where(spread(colinear, scope, a).bool(), (1 - t) * a + t * b, spherical)


# --- Multi-SLERP: unit, norm_along ---------------------------------------------------------

@primitive("unit", Param("x", "tensor"), Param("eps", "number", 1e-8, range=(0.0, 1.0)),
           reduction=lambda numel: Gram(lambda x: [x]))
def unit(x: torch.Tensor, eps: float = 1e-8, *, chunk: Chunk | None = None) -> torch.Tensor:
    """x / (|x| + eps): x projected onto the unit sphere (the tensor as one vector)."""
    norm = vector_norms(gram_of([x], "tensor", chunk))[0]
    return x / (norm + eps).to(device=x.device, dtype=x.dtype)


@primitive("norm_along", Param("x", "tensor"), Param("direction", "tensor"),
           Param("eps", "number", 1e-8, range=(0.0, 1.0)), reduction=_pair)
def norm_along(x: torch.Tensor, direction: torch.Tensor, eps: float = 1e-8, *,
               chunk: Chunk | None = None) -> torch.Tensor:
    """|x| direction / |direction|: x's norm along direction; x itself where
    |direction| < eps (no direction to take)."""
    norms = vector_norms(gram_of([x, direction], "tensor", chunk))
    if float(norms[1]) < eps:
        return x.clone()  # a value of its own: the engine may overwrite it in place
    return (norms[0] / norms[1]).to(device=x.device, dtype=x.dtype) * direction


# --- Karcher mean --------------------------------------------------------------------------

@primitive("karcher_mean", Param("xs", "tensors"),
           Param("max_iter", "number", 10, range=(0, 10_000)),
           Param("tol", "number", 1e-5, range=(0.0, 1.0)), reduction=lambda numel: Gram(list),
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
    norms = vector_norms(g)
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

def _stock_reduction(numel: int, over: str) -> Gram:
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
    norms = vector_norms(g)
    cosines = [(g[i, j] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1)
               for i in range(count) for j in range(i + 1, count)]
    cos = torch.stack(cosines).mean(0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    return spread(t, scope, base).expand(base.shape).contiguous()


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
    kl = fixed_row_sums(lambda s, e: flat[s:e], flat.shape[0], length, terms.dtype,
                         terms.device)
    return (model - base).abs() * kl.reshape(*terms.shape[:-1], 1)


def _vector_kl(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The KL divergence of a whole tensor of at most one dimension, as one vector."""
    return torch.sum(_kl_terms(model.reshape(-1), base.reshape(-1)), dim=-1, keepdim=True)


def _quartile_ranks(numel: int) -> list[int]:
    """The ranks of q1, the median and q3: floor(q (n - 1))."""
    return [(numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4]


class FusionThreshold(Reduction):
    """Arcee Fusion's threshold on the importance: median + 1.5 (q3 - q1), with the
    quartiles the sorted values at floor(q (n - 1)), found exactly by the selection of
    selection.py. A tensor of at most one dimension (one softmax over all of it) is
    gathered whole."""

    def __init__(self, numel: int):
        self.numel = numel
        self.selection = OrderStatistics(numel, _quartile_ranks(numel) if numel else [],
                                         values=_importance_rows, magnitudes=False)
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
        self.selection.add(model, base, chunk)

    def finish_sweep(self) -> bool:
        if self.found is not None:
            return True
        if self.parts:
            model = torch.cat([m for m, _ in self.parts])
            base = torch.cat([b for _, b in self.parts])
            kl = _vector_kl(model, base)
            importance = (model - base).abs() * kl
            whole = OrderStatistics(self.numel, _quartile_ranks(self.numel), magnitudes=False)
            self.found = (kl, self._threshold(reduce_whole(whole, [importance], None)))
            return True
        if not self.selection.finish_sweep():
            return False
        self.found = (None, self._threshold(self.selection.result()))
        return True

    def _threshold(self, selection) -> torch.Tensor:
        q1, median, q3 = (torch.tensor(selection.ranks[r].value, dtype=torch.float32)
                          for r in _quartile_ranks(self.numel))
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
        stats = reduce_whole(FusionThreshold(model.numel()), [model, base], chunk)
    kl, threshold = stats
    if model.dim() <= 1:
        if kl is None:  # one chunk: the whole tensor is here
            kl = _vector_kl(model, base)
        importance = (model - base).abs().reshape(-1) * kl.to(model.device)
        importance = importance.reshape(model.shape)
    else:
        importance = _importance_rows(model, base)
    return (importance >= threshold.to(model.device)).to(model.dtype)
