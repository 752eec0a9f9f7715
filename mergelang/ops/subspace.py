"""Subspace and selection primitives for the data-free methods beyond mergekit.

- `max_magnitude`: per entry, the value of largest magnitude (MagMax);
- `tall_mask`, `at_least`: TALL masks and the consensus count (TALL / Consensus Merging);
- `low_rank`, `isotropic`, `tsv_merge`, `iso_cts_merge`: decompositions of a weight
  matrix (CART, Iso-C, TSV-M, Iso-CTS). They need the whole tensor (`whole=True`: the
  executor never splits it into row blocks);
- `matrix_or`: picks between two results by whether the tensor is a matrix, so a method
  can say what it does with biases and norms in the library source.

The methods themselves are in `stdlib/magmax.merge`, `tsv.merge`, `iso_c.merge`,
`cart.merge` and `tall.merge`; docs/methods-subspace.md has the formulas.

Decompositions run in float32 (float64 when the compute dtype is float64; float16 and
bfloat16 inputs are lifted to float32, which torch.linalg needs) and the result is cast
back to the input's dtype. A float32 SVD is backward stable: its error is about 1e-6 of
the largest singular value, far below what a bfloat16 or float16 output keeps, so float64
would double the cost for nothing that survives the cast. On the CPU the result is the
same on every run for a given torch build and thread count.

None of these primitives returns one of its inputs: the executor may update a result in
place when it is the last user, which must never reach an input still in use.
"""

from __future__ import annotations

import math

import torch

from . import Param, primitive

FRACTION = (0.0, 1.0)
UNBOUNDED = (0.0, math.inf)


# selection (elementwise: computed in row blocks like any arithmetic)

@primitive("max_magnitude", Param("xs", "tensors"), maps=False)
def max_magnitude(xs: list[torch.Tensor]) -> torch.Tensor:
    """Per entry, the value of largest magnitude among the list `xs` (MagMax).

    At equal magnitudes the earlier tensor in the list wins; a NaN wins over any number,
    so it is not hidden.
    """
    best = xs[0].clone()
    best_magnitude = xs[0].abs()
    for x in xs[1:]:
        magnitude = x.abs()
        take = (magnitude > best_magnitude) | magnitude.isnan()
        best = torch.where(take, x, best)
        best_magnitude = torch.where(take, magnitude, best_magnitude)
    return best


@primitive("tall_mask", Param("x", "tensor"), Param("merged", "tensor"),
           Param("mask_lambda", "number", range=UNBOUNDED))
def tall_mask(x: torch.Tensor, merged: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """The TALL mask of a task vector `x` against the merged vector: 1 where
    |x| >= mask_lambda * |merged - x|, else 0 (Wang et al. 2024)."""
    return (x.abs() >= mask_lambda * (merged - x).abs()).to(x.dtype)


@primitive("at_least", Param("xs", "tensors"), Param("k", "number", range=UNBOUNDED),
           maps=False)
def at_least(xs: list[torch.Tensor], k: float) -> torch.Tensor:
    """1 where at least `k` of the tensors in the list `xs` are nonzero, else 0: with
    TALL masks, the entries that at least k tasks need (Consensus Merging)."""
    count = torch.zeros_like(xs[0])
    for x in xs:
        count += x != 0
    return (count >= k).to(xs[0].dtype)


@primitive("matrix_or", Param("matrix", "tensor"), Param("other", "tensor"))
def matrix_or(matrix: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`matrix` when the tensor is 2-D (a weight matrix), else `other` (biases, norms:
    1-D; and tensors of 3 or more dimensions). Both are computed; the choice is made per
    tensor by its shape."""
    return (matrix if matrix.dim() == 2 else other).clone()


# decompositions of a matrix (whole tensors)

@primitive("low_rank", Param("x", "tensor"), Param("rank", "number", range=FRACTION),
           whole=True)
def low_rank(x: torch.Tensor, rank: float) -> torch.Tensor:
    """The best approximation of the matrix `x` of rank k = keep(rank, min(m, n)) (its
    top k singular triplets; CART). Returns `x` itself (a copy) when k is the full rank,
    zeros when k is 0, and a copy of any tensor that is not 2-D."""
    if x.dim() != 2:
        return x.clone()
    k = keep(rank, min(x.shape))
    if k >= min(x.shape):
        return x.clone()
    if k == 0:
        return torch.zeros_like(x)
    u, s, vh = _svd(x)
    if u is None:
        return _nan_like(x)
    return ((u[:, :k] * s[:k]) @ vh[:k]).to(x.dtype)


@primitive("isotropic", Param("x", "tensor"), whole=True)
def isotropic(x: torch.Tensor) -> torch.Tensor:
    """The matrix `x` with every singular value replaced by their mean (Iso-C):
    mean(s) * U V^T from x = U diag(s) V^T, over all min(m, n) singular values. A copy of
    any tensor that is not 2-D."""
    if x.dim() != 2:
        return x.clone()
    u, s, vh = _svd(x)
    if u is None:
        return _nan_like(x)
    return (s.mean() * (u @ vh)).to(x.dtype)


@primitive("tsv_merge", Param("xs", "tensors"), Param("rank", "number", range=FRACTION),
           maps=False, whole=True)
def tsv_merge(xs: list[torch.Tensor], rank: float) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025) on the list of matrices `xs`: keep the top
    k = keep(rank, min(m, n)) singular triplets of each, stack their left and right
    singular vectors, replace each stack by its nearest matrix with orthonormal columns
    (orthogonal Procrustes: P Q^T from P D Q^T), and rebuild with the kept singular
    values. For tensors that are not 2-D: the sum of `xs`."""
    if xs[0].dim() != 2:
        return _sum(xs)
    k = keep(rank, min(xs[0].shape))
    if k == 0:
        return torch.zeros_like(xs[0])
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = _svd(x)
        if u is None:
            return _nan_like(x)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].mT)
    return _rebuild(torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)).to(xs[0].dtype)


@primitive("iso_cts_merge", Param("xs", "tensors"),
           Param("common", "number", range=FRACTION), maps=False, whole=True)
def iso_cts_merge(xs: list[torch.Tensor], common: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025) on the list of matrices `xs`, r = min(m, n):

    the top k singular triplets of sum(xs) (the common subspace) and, for each x, the top
    s of x with the common left subspace projected out (x - U_k U_k^T x), where
    s = min(round((r - floor(common * r)) / T), r // T) and k = r - T s; stack, make the
    stacks orthonormal (Procrustes, as TSV-M) and give every direction the mean of the
    kept singular values. common=1 is Iso-C. For tensors that are not 2-D: the sum."""
    total = _sum(xs)
    if total.dim() != 2:
        return total
    r, tasks = min(total.shape), len(xs)
    specific = min(round((r - keep(common, r, at_least_one=False)) / tasks), r // tasks)
    k = r - tasks * specific
    u, s, vh = _svd(total)
    if u is None:
        return _nan_like(total)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].mT]
    if specific:
        for x in xs:
            x = x.to(u.dtype)
            pu, ps, pvh = _svd(x - us[0] @ (us[0].mT @ x))
            us.append(pu[:, :specific])
            ss.append(ps[:specific])
            vs.append(pvh[:specific].mT)
    sigma = torch.cat(ss).mean()
    return (sigma * (_polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).mT)).to(total.dtype)


def keep(fraction: float, full: int, at_least_one: bool = True) -> int:
    """How many of `full` singular directions a fraction keeps: floor(fraction * full),
    at least 1 when fraction > 0 (as `trim` keeps at least one entry), 0 at fraction 0.
    The 1e-9 guards floor against a product such as (1/3) * 3 landing just below 1."""
    if fraction <= 0:
        return 0
    k = min(full, math.floor(fraction * full + 1e-9))
    return max(1, k) if at_least_one else k


def _rebuild(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """U⊥ diag(s) V⊥^T, with U⊥ and V⊥ the orthonormal (Procrustes) versions of u and v."""
    return (_polar(u) * s) @ _polar(v).mT


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The nearest matrix to `a` (Frobenius norm) with orthonormal columns (rows, when
    `a` is wider than tall): P Q^T from the SVD a = P D Q^T. Sign and rotation choices
    of the SVD cancel in the product."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _svd(x: torch.Tensor):
    """The thin SVD in float32 (float64 for float64 inputs): (U, s, V^T), or three Nones
    when `x` holds NaN or infinite values (the caller then returns NaNs, which the run
    reports for the tensor). If LAPACK does not converge, one retry in float64."""
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(work).all()):
        return None, None, None
    try:
        return torch.linalg.svd(work, full_matrices=False)
    except torch.linalg.LinAlgError:
        u, s, vh = torch.linalg.svd(work.double(), full_matrices=False)
        return u.to(work.dtype), s.to(work.dtype), vh.to(work.dtype)


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, math.nan)


def _sum(xs: list[torch.Tensor]) -> torch.Tensor:
    total = xs[0].clone()
    for x in xs[1:]:
        total += x
    return total
