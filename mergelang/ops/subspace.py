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

Decompositions run in float64, whatever the compute dtype, and the result is cast back
to it. Not for accuracy (a float32 SVD is backward stable, its error far below what a
bfloat16 output keeps) but to tell zero from small: in float32 the singular values of an
exactly low-rank matrix come out near 1e-7 of the largest, as large as the genuine tail
of a fine-tune's spectrum (which Iso-C raises to the mean); in float64 they are near
1e-16. So merges of identical deltas, deltas in disjoint subspaces or exactly low-rank
deltas are handled by a rule (zero directions are left out, see `_rank`) instead of by
whatever basis LAPACK picks for a null space. On CPUs the cost is about 1.2-2x a float32
SVD. Results are the same on every run for a given torch build and thread count.

None of these primitives returns one of its inputs: the executor may update a result in
place when it is the last user, which must never reach an input still in use.
"""

from __future__ import annotations

import math

import torch

from . import Param, primitive
from .common import FRACTION, NON_NEGATIVE, sum_of

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
           Param("mask_lambda", "number", range=NON_NEGATIVE))
def tall_mask(x: torch.Tensor, merged: torch.Tensor, mask_lambda: float) -> torch.Tensor:
    """The TALL mask of a task vector `x` against the merged vector: 1 where
    |x| >= mask_lambda * |merged - x|, else 0 (Wang et al. 2024)."""
    return (x.abs() >= mask_lambda * (merged - x).abs()).to(x.dtype)


@primitive("at_least", Param("xs", "tensors"), Param("k", "number", range=NON_NEGATIVE),
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
    top k singular triplets; CART). A copy of `x` when k is the full rank, zeros when k
    is 0, and a copy of any tensor that is not a matrix."""
    if not _is_matrix(x):
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
    """The matrix `x` with its singular values replaced by their mean (Iso-C):
    mean(s) * U V^T from x = U diag(s) V^T. Singular values that are zero (numerically:
    see `_rank`) stay zero and do not count in the mean, so the nuclear norm is kept;
    for a matrix of full rank this is the mean of all min(m, n). A copy of any tensor that
    is not a matrix."""
    if not _is_matrix(x):
        return x.clone()
    u, s, vh = _svd(x)
    if u is None:
        return _nan_like(x)
    r = _rank(s, x.shape)
    if r == 0:
        return torch.zeros_like(x)
    return (s[:r].mean() * (u[:, :r] @ vh[:r])).to(x.dtype)


@primitive("tsv_merge", Param("xs", "tensors"), Param("rank", "number", range=FRACTION),
           maps=False, whole=True)
def tsv_merge(xs: list[torch.Tensor], rank: float) -> torch.Tensor:
    """TSV-M (Gargiulo et al. 2025) on the list of matrices `xs`: keep the top
    k = keep(rank, min(m, n)) singular triplets of each (those with a nonzero singular
    value), stack their left and right singular vectors, replace each stack by its
    orthonormal polar factor (orthogonal Procrustes: P Q^T from P D Q^T), and rebuild
    with the kept singular values. For tensors that are not matrices: the sum of `xs`."""
    if not _is_matrix(xs[0]):
        return sum_of(xs)
    k = keep(rank, min(xs[0].shape))
    us, ss, vs = [], [], []
    for x in xs:
        u, s, vh = _svd(x)
        if u is None:
            return _nan_like(x)
        kept = min(k, _rank(s, x.shape))
        us.append(u[:, :kept])
        ss.append(s[:kept])
        vs.append(vh[:kept].mT)
    s = torch.cat(ss)
    if not len(s):
        return torch.zeros_like(xs[0])
    return ((_polar(torch.cat(us, 1)) * s) @ _polar(torch.cat(vs, 1)).mT).to(xs[0].dtype)


@primitive("iso_cts_merge", Param("xs", "tensors"),
           Param("common", "number", range=FRACTION), maps=False, whole=True)
def iso_cts_merge(xs: list[torch.Tensor], common: float) -> torch.Tensor:
    """Iso-CTS (Marczak et al. 2025) on the list of T matrices `xs`, r = min(m, n):
    the top k singular triplets of sum(xs) (the common subspace) and, for each x, the top
    s of x with the common left subspace projected out (x - U_k U_k^T x), where
    s = min(round((r - floor(common * r)) / T), r // T) and k = r - T s (round: half to
    even); both stacks made orthonormal (Procrustes, as in TSV-M), every direction given
    the mean of the kept singular values. Directions with a zero singular value are left
    out. common=1 is Iso-C. For tensors that are not matrices: the sum of `xs`."""
    total = sum_of(xs)
    if not _is_matrix(total):
        return total
    r, tasks = min(total.shape), len(xs)
    specific = min(round((r - keep(common, r, at_least_one=False)) / tasks), r // tasks)
    u, s, vh = _svd(total)
    if u is None:
        return _nan_like(total)
    k = min(r - tasks * specific, _rank(s, total.shape))
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].mT]
    for x in xs if specific else ():
        x = x.to(u.dtype)
        pu, ps, pvh = _svd(x - us[0] @ (us[0].mT @ x))
        # what the projection leaves of a direction inside the common subspace is
        # rounding noise on the scale of x, not of the (maybe much smaller) remainder
        kept = min(specific, _rank(ps, x.shape, scale=torch.linalg.matrix_norm(x)))
        us.append(pu[:, :kept])
        ss.append(ps[:kept])
        vs.append(pvh[:kept].mT)
    s = torch.cat(ss)
    if not len(s):
        return torch.zeros_like(total)
    isotropic_ = s.mean() * (_polar(torch.cat(us, 1)) @ _polar(torch.cat(vs, 1)).mT)
    return isotropic_.to(total.dtype)


def keep(fraction: float, full: int, at_least_one: bool = True) -> int:
    """How many of `full` singular directions a fraction keeps: floor(fraction * full),
    at least 1 when fraction > 0 (as `trim` keeps at least one entry), 0 at fraction 0.
    The 1e-9 guards floor against a product such as (1/3) * 3 landing just below 1."""
    if fraction <= 0:
        return 0
    k = min(full, math.floor(fraction * full + 1e-9))
    return max(1, k) if at_least_one else k


def _is_matrix(x: torch.Tensor) -> bool:
    return x.dim() == 2 and x.numel() > 0


def _svd(x: torch.Tensor):
    """The thin SVD in float64: (U, s, V^T), or three Nones when `x` holds NaN or
    infinite values (the caller then returns NaNs, which the run reports)."""
    work = x.to(torch.float64)
    if not bool(torch.isfinite(work).all()):
        return None, None, None
    return torch.linalg.svd(work, full_matrices=False)


def _rank(s: torch.Tensor, shape, scale: torch.Tensor | None = None) -> int:
    """How many of the singular values `s` (descending) are nonzero: above
    max(m, n) * eps(float64) * s_1, the usual numerical-rank tolerance (numpy's and
    torch's matrix_rank), or that times `scale` / s_1 for a matrix computed from one of
    norm `scale`. Below it a singular value is rounding noise and its singular vectors
    are an arbitrary basis of a null space, which must not reach the result."""
    if not len(s) or s[0] == 0:
        return 0
    tolerance = max(shape) * torch.finfo(torch.float64).eps * (s[0] if scale is None else scale)
    return int((s > tolerance).sum())


def _polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor of `a`: P Q^T from the SVD a = P D Q^T, over the
    nonzero singular values. For a stack of full column rank this is the nearest matrix
    with orthonormal columns (the orthogonal Procrustes solution); otherwise it is the
    partial isometry of the polar decomposition, which, unlike the full P Q^T, is unique:
    two copies of one direction become two halves of it rather than one of them turning
    into an arbitrary new direction. The SVD's sign and rotation choices cancel in P Q^T."""
    p, d, qh = torch.linalg.svd(a, full_matrices=False)
    r = _rank(d, a.shape)
    return p[:, :r] @ qh[:r]


def _nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, math.nan)
