"""Truncated SVD of one delta: B @ A of a given rank, or of the smallest rank that keeps
a share of its energy, and the error made.

Two ways to the top singular vectors, chosen per tensor: the exact SVD (LAPACK, what
mergekit uses) and a randomised range finder (Halko, Martinsson and Tropp 2011,
algorithm 4.4: a Gaussian sketch, a few power iterations re-orthonormalised by QR, then
an exact SVD of the small projected matrix). The randomised one costs O(m n r) instead of
O(m n min(m, n)) and its sketch is drawn from a generator seeded by the tensor, so the
result is the same bytes on every run. Whichever is used, the error reported is
measured, ||delta - B A||_F, never estimated.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

METHODS = ("auto", "exact", "randomised")
OVERSAMPLE = 16     # extra sketch columns beyond the rank (Halko et al. suggest 5-10+)
POWER_ITERATIONS = 4
_RANDOMISED_FROM = 1024  # min(m, n) from which "auto" may sketch
_RANDOMISED_SHARE = 4    # ... and only when rank + oversampling is at most 1/4 of it


@dataclass(frozen=True)
class Factors:
    """delta ~ b @ a, with a (rank x in) and b (out x rank) sharing sqrt(s) as mergekit's
    default (--distribute-scale) does, so PEFT applies them at scale 1."""

    a: torch.Tensor
    b: torch.Tensor
    rank: int
    error: float        # ||delta - b a||_F / ||delta||_F (0 for a zero delta)
    norm: float         # ||delta||_F
    method: str         # "exact" or "randomised"


def choose_method(shape: tuple[int, int], rank: int | None, method: str = "auto") -> str:
    """The SVD used for a tensor: `method` unless "auto"; then the sketch for large
    tensors at a rank well below their size, the exact SVD otherwise (energy alone needs
    the whole spectrum, so it is always exact)."""
    if method != "auto":
        return method
    small = min(shape)
    if rank is None or small < _RANDOMISED_FROM:
        return "exact"
    return "randomised" if (rank + OVERSAMPLE) * _RANDOMISED_SHARE <= small else "exact"


def rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int:
    """The smallest r with s_1^2 + ... + s_r^2 >= energy * total (total: ||delta||_F^2),
    at least 1, at most len(s)."""
    if total <= 0:
        return 1
    kept = torch.cumsum(s.double() ** 2, 0)
    reached = torch.nonzero(kept >= energy * total * (1 - 1e-12))
    return int(reached[0]) + 1 if len(reached) else len(s)


def factorise(delta: torch.Tensor, rank: int | None, energy: float | None = None,
              method: str = "auto", seed: int = 0, name: str = "") -> Factors:
    """B @ A approximating the 2-D `delta` (computed in float32, or float64 if given so):
    of rank `rank`, or with `energy`, of the smallest rank keeping that share of
    ||delta||_F^2 (at most `rank` when both are given). `seed` and `name` seed the
    randomised sketch."""
    work = delta if delta.dtype == torch.float64 else delta.float()
    m, n = work.shape
    limit = min(m, n) if rank is None else min(rank, m, n)
    how = choose_method((m, n), rank, method)
    if how == "randomised":
        u, s, vh = _sketched_svd(work, min(limit + OVERSAMPLE, m, n), seed, name)
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    norm = torch.linalg.matrix_norm(work).item()
    norm_sq = norm * norm
    r = limit if energy is None else min(limit, rank_for_energy(s, norm_sq, energy))
    root = s[:r].clamp_min(0).sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    residual = torch.linalg.matrix_norm((b @ a).sub_(work)).item()  # one m x n buffer
    return Factors(a, b, r, residual / norm if norm > 0 else 0.0, norm, how)


def _sketched_svd(x: torch.Tensor, q: int, seed: int, name: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-q singular triplets of x, approximately, from a randomised range finder."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()))
                                              % 2**63)
    omega = torch.randn(x.shape[1], q, generator=generator, dtype=x.dtype).to(x.device)
    basis = torch.linalg.qr(x @ omega).Q
    for _ in range(POWER_ITERATIONS):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    return basis @ u_small, s, vh
