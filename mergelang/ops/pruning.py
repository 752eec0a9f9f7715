"""Pruning beyond TIES and DARE: the primitives of breadcrumbs, DELLA, SCE and RAM, and of
the TIES options (zero votes to the majority sign, the disjoint mean, DARE-TIES as in the
DARE paper).

Every primitive here gives the same bits whether its tensor is computed whole or in row
blocks. A selection by rank over a whole tensor (breadcrumbs' band of magnitudes, SCE's
top variances) is found by the exact selection of selection.py, ties broken by row-major
position; per-model statistics (SCE's energies, RAM's counts, a majority sign)
are exact integer counts or `math.fsum`s of per-row float64 sums; DELLA's ranks are
within a row, and rows are never split (a 1-D tensor is one row: its magnitudes are
gathered by a reduction when it is split).
"""

from __future__ import annotations

import math

import torch

from ..reduce import Chunk, L1Ratio, Reduction, reduce_whole, row_sums
from ..selection import OrderStatistics, keep_band, keep_top, top_cut
from . import Param, primitive
from .common import DENSITY, NON_NEGATIVE, sum_of, with_stats
from .sparsify import top_k, trim

# --- breadcrumbs ----------------------------------------------------------------------


def _band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """mergekit's magnitude_outliers counts: keep ascending ranks [bottom, bottom + target)."""
    target = int(density * numel)
    top = int(gamma * numel)
    return max(0, numel - target - top), target


def _band_ranks(numel: int, density: float, gamma: float) -> OrderStatistics | None:
    bottom, target = _band(numel, density, gamma)
    if density >= 1 or target <= 0 or target >= numel:
        return None
    return OrderStatistics(numel, [bottom, bottom + target - 1])


@primitive("trim_outliers", Param("x", "tensor"), DENSITY,
           Param("gamma", "number", 0.01, range=(0.0, 1.0)), reduction=_band_ranks)
def trim_outliers(x: torch.Tensor, density: float, gamma: float = 0.01, *,
                  chunk: Chunk | None = None) -> torch.Tensor:
    """Model Breadcrumbs: keep a band of magnitudes, dropping the largest (outliers) and
    the smallest entries: mergekit 0.1.5's `magnitude_outliers`.

    With n entries, target = int(density * n), top = int(gamma * n) and
    bottom = max(0, n - target - top), the entries at ranks [bottom, bottom + target) of
    the ascending order of |x| are kept. Ties in magnitude are ordered by row-major
    position (a stable sort), so the earlier of two equal entries has the lower rank.
    density >= 1 returns x unchanged; target = 0 gives zeros.
    """
    numel = x.numel() if chunk is None else chunk.numel
    bottom, target = _band(numel, density, gamma)
    if density >= 1 or target >= numel:
        return x.clone()
    if target <= 0:
        return x * torch.zeros_like(x)
    chunk = with_stats(chunk, x, [x], lambda: _band_ranks(numel, density, gamma))
    return x * keep_band(x.abs().float(), chunk.stats.ranks, bottom, bottom + target,
                         chunk.state)


def _reference_over_x(numel: int, rescale: str) -> L1Ratio | None:
    return L1Ratio(lambda x, reference, chunk: (reference, x)) if rescale == "l1" else None


@primitive("match_norm", Param("x", "tensor"), Param("reference", "tensor"),
           Param("rescale", "string", "l1", choices=("l1", "none")), reduction=_reference_over_x)
def match_norm(x: torch.Tensor, reference: torch.Tensor, rescale: str = "l1", *,
               chunk: Chunk | None = None) -> torch.Tensor:
    """x scaled so its L1 norm is that of `reference`: x * ‖reference‖₁ / ‖x‖₁, left as it
    is when either norm is below 1e-7 (mergekit's `rescale: true` after a sparsification:
    `reference` is the tensor before it). rescale="none" returns x.
    """
    if rescale == "none":
        return x.clone()
    chunk = with_stats(chunk, x, [x, reference], lambda: _reference_over_x(x.numel(), "l1"))
    return x * chunk.stats


# --- DELLA ----------------------------------------------------------------------------


def _keep_probability(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability per entry, from the rank of |x| within its row: rows are
    along dimension 1 (mergekit's argsort(dim=1)); a tensor of fewer dimensions is one
    row. Rank 1 (smallest) gets density - epsilon, the largest density + epsilon, linear
    in between; ties are ranked by position. A row of one entry gets density. Clipped to
    [0, 1]."""
    t = x if x.dim() >= 2 else x.reshape(1, -1)
    m = t.shape[1]
    if m == 1:
        return torch.full_like(x, min(max(density, 0.0), 1.0), dtype=torch.float32)
    order = torch.argsort(t.abs().float(), dim=1, stable=True)
    shape = [1] * t.dim()
    shape[1] = m
    positions = torch.arange(1, m + 1, dtype=torch.float32, device=t.device).reshape(shape)
    ranks = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    ranks.scatter_(1, order, positions.expand(t.shape))
    rank_norm = ((ranks - 1) / (m - 1)).clamp(0, 1)  # as mergekit: (r - min) / (max - min)
    probability = (density - epsilon) + rank_norm * 2 * epsilon
    return probability.clamp(0, 1).reshape(x.shape)


class _MagpruneStats(Reduction):
    """What DELLA's magprune needs beyond one block of rows: for a tensor of fewer than
    two dimensions split into blocks, its keep probabilities (its one row is split);
    with rescale="l1", the ratio ‖x‖₁ / ‖kept‖₁."""

    def __init__(self, density: float, epsilon: float, l1: bool):
        self.density, self.epsilon = density, epsilon
        self.l1 = L1Ratio(self._kept) if l1 else None
        self.parts: list[torch.Tensor] = []
        self.random = None
        self.numel = 0

    def _kept(self, x: torch.Tensor, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        return x, _draw(x, chunk).lt(_keep_probability(x, self.density, self.epsilon))

    def sweeps(self, chunks: int) -> int:
        return 1 if chunks > 1 or self.l1 is not None else 0

    def add(self, x: torch.Tensor, chunk: Chunk) -> None:
        if x.dim() < 2:
            self.parts.append(x.detach().float().reshape(-1).clone())
            self.random, self.numel = chunk.random, chunk.numel
        elif self.l1 is not None:
            self.l1.add(x, chunk)

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> dict:
        probability = None
        if self.parts:
            x = torch.cat(self.parts)
            probability = _keep_probability(x, self.density, self.epsilon)
            if self.l1 is not None:  # each entry is a row of its own: summed exactly
                drawn = self.random.uniform(0, self.numel, self.numel).to(x.device)
                self.l1.add_parts(x.reshape(-1, 1), drawn.lt(probability).reshape(-1, 1))
        return {"probability": probability,
                "ratio": self.l1.result() if self.l1 is not None else None}


def _draw(x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    return chunk.random.uniform(chunk.offset, x.numel(), chunk.numel).reshape(x.shape).to(
        x.device)


def _magprune_stats(numel: int, density: float, epsilon: float,
                    rescale: str) -> Reduction | None:
    if density >= 1 or density <= 0:
        return None
    return _MagpruneStats(density, epsilon, rescale == "l1")


@primitive("magprune", Param("x", "tensor"), DENSITY,
           Param("epsilon", "number", 0.15, range=(0.0, 1.0)),
           Param("rescale", "string", "probability", choices=("probability", "l1", "none")),
           random=True, reduction=_magprune_stats)
def magprune(x: torch.Tensor, density: float, epsilon: float = 0.15,
             rescale: str = "probability", *, chunk: Chunk) -> torch.Tensor:
    """DELLA's MAGPRUNE: keep each entry with a probability that grows with its magnitude
    rank in its row, from density - epsilon (smallest) to density + epsilon (largest),
    then rescale: "probability" divides each kept entry by its own keep probability (the
    DELLA paper: the expectation is kept), "l1" matches the L1 norm of x (mergekit 0.1.5),
    "none" leaves them. Rows are along dimension 1 as in mergekit; a 1-D tensor is one
    row. density >= 1 returns x; density = 0 gives zeros.
    """
    if density >= 1:
        return x.clone()
    if density <= 0:
        return torch.zeros_like(x)
    whole = chunk.numel == x.numel()
    if chunk.stats is None and (rescale == "l1" or (x.dim() < 2 and not whole)):
        assert whole, "magprune: a block of a tensor needs the reduction's result"
        chunk.stats = reduce_whole(_MagpruneStats(density, epsilon, rescale == "l1"), [x],
                                   chunk)
    stats = chunk.stats or {}
    if stats.get("probability") is not None:
        p = stats["probability"][chunk.offset:chunk.offset + x.numel()].reshape(x.shape)
    else:
        p = _keep_probability(x, density, epsilon)
    keep = _draw(x, chunk).lt(p)
    kept = x * keep
    if rescale == "probability":
        return kept / torch.where(keep, p, torch.ones_like(p))
    if rescale == "l1":
        return kept * stats["ratio"]
    return kept


# --- SCE ------------------------------------------------------------------------------


def _variance(xs: list[torch.Tensor]) -> torch.Tensor:
    """The population variance across the list, per entry, computed elementwise in a fixed
    order (so a block of rows gets the bits the whole tensor would)."""
    mean = sum_of(xs) / len(xs)
    return sum_of([(x - mean) * (x - mean) for x in xs]) / len(xs)


def _top_variance_k(nonzero: int, density: float) -> int:
    return int(nonzero * density)


def _variance_ranks(numel: int, density: float) -> Reduction | None:
    if density >= 1 or density <= 0:
        return None

    def wanted(nonzero: int) -> list[int]:
        k = _top_variance_k(nonzero, density)
        return [numel - k] if k > 0 else []
    return OrderStatistics(numel, wanted, values=_variance)


@primitive("top_variance", Param("xs", "tensors"), DENSITY, reduction=_variance_ranks,
           maps=False)
def top_variance(xs: list[torch.Tensor], density: float, *,
                 chunk: Chunk | None = None) -> torch.Tensor:
    """SCE's selection: a 0/1 mask of the k entries whose values vary most across the list
    (population variance), k = int(density * the number of entries with nonzero
    variance) (mergekit 0.1.5's sce_mask). Ties in variance at the cut-off keep the
    earlier entries (row-major). density >= 1 gives ones, density = 0 zeros.
    """
    x = xs[0]
    if density >= 1:
        return torch.ones_like(x)
    if density <= 0:
        return torch.zeros_like(x)
    numel = x.numel() if chunk is None else chunk.numel
    chunk = with_stats(chunk, x, [xs], lambda: _variance_ranks(numel, density))
    k = _top_variance_k(chunk.stats.nonzero, density)
    if k <= 0:
        return torch.zeros_like(x)
    cut = top_cut(numel, k, chunk.stats.ranks[numel - k])
    return keep_top(_variance(xs).float().abs(), *cut, chunk.state).to(x.dtype)


class _Energies(Reduction):
    """Σ x² and Σ over the list of Σ xs_j², summed exactly."""

    def __init__(self, numel: int):
        self.numel = numel
        self.own: list[float] = []
        self.total: list[float] = []

    def add(self, x: torch.Tensor, xs: list[torch.Tensor], chunk: Chunk) -> None:
        self.own += row_sums(x.double().square())
        for other in xs:
            self.total += row_sums(other.double().square())

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> tuple[float, float]:
        return math.fsum(self.own) / self.numel, math.fsum(self.total) / self.numel


@primitive("energy_share", Param("x", "tensor"), Param("xs", "tensors"),
           reduction=lambda numel: _Energies(numel))
def energy_share(x: torch.Tensor, xs: list[torch.Tensor], *,
                 chunk: Chunk | None = None) -> torch.Tensor:
    """SCE's weight of x: mean(x²) / Σ_j mean(xs_j²) over the whole tensor, as a tensor
    filled with that number; 1 / len(xs) when the summed means are below 1e-6 (mergekit
    0.1.5's sce_weight). `x` is normally one of `xs`; it maps over a list."""
    own, total = with_stats(chunk, x, [x, xs], lambda: _Energies(x.numel())).stats
    share = 1 / len(xs) if abs(total) < 1e-6 else own / total
    return torch.full_like(x, share)


@primitive("clamp_min", Param("x", "tensor"), Param("floor", "number"), entrywise=True)
def clamp_min(x: torch.Tensor, floor: float) -> torch.Tensor:
    """max(x, floor) per entry (a divisor kept away from 0, as SCE's clamp(min=1e-6))."""
    return x.clamp(min=floor)


# --- RAM ------------------------------------------------------------------------------


@primitive("above", Param("x", "tensor"), Param("threshold", "number", range=NON_NEGATIVE),
           entrywise=True)
def above(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 where |x| > threshold, else 0 (RAM: the entries a task changed)."""
    return (x.abs() > threshold).to(x.dtype)


class _SharedUnique(Reduction):
    """How many of the entries x marks are marked by no other task (count == 1) and how
    many by others too (count > 1): exact integers."""

    def __init__(self):
        self.shared = self.unique = 0

    def add(self, moved: torch.Tensor, count: torch.Tensor, chunk: Chunk) -> None:
        marked = moved != 0
        self.unique += int((marked & (count == 1)).sum())
        self.shared += int((marked & (count > 1)).sum())

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> tuple[int, int]:
        return self.shared, self.unique


def _ram_lambda(shared: int, unique: int, r: float, alpha: float, epsilon: float) -> float:
    # the float32 arithmetic of mergekit 0.1.5's ramplus_tl, on one model's counts
    rho = torch.tensor(shared) / torch.tensor(unique).clamp(min=epsilon)
    return float(1 + r * rho.clamp(min=0, max=alpha))


@primitive("ram_boost", Param("moved", "tensor"), Param("count", "tensor"),
           Param("r", "number", 0.1), Param("alpha", "number", 0.2),
           Param("epsilon", "number", 1e-5, range=NON_NEGATIVE),
           reduction=lambda numel: _SharedUnique())
def ram_boost(moved: torch.Tensor, count: torch.Tensor, r: float = 0.1, alpha: float = 0.2,
              epsilon: float = 1e-5, *, chunk: Chunk | None = None) -> torch.Tensor:
    """RAM+ (tensor-local): the factor for the entries only this task changed.

    `moved` marks the entries this task changed, `count` how many tasks changed each
    entry. Over the tensor, rho = shared / max(unique, epsilon) (this task's entries that
    others changed too, over those only it changed), and the factor is
    λ = 1 + r * clamp(rho, 0, alpha) where count == 1, and 1 elsewhere (mergekit 0.1.5's
    ramplus_tl). Maps over a list of masks.
    """
    shared, unique = with_stats(chunk, moved, [moved, count], _SharedUnique).stats
    factor = _ram_lambda(shared, unique, r, alpha, epsilon)
    return torch.where(count == 1, factor, 1.0).to(moved.dtype)


# --- TIES options ---------------------------------------------------------------------


def _votes(xs: list[torch.Tensor], method: str) -> torch.Tensor:
    return sum_of(xs if method == "sum" else [x.sign() for x in xs])


class _Majority(Reduction):
    """The tensor's majority sign: +1 when at least as many entries elect + as -."""

    def __init__(self, method: str):
        self.method = method
        self.plus = self.minus = 0

    def add(self, xs: list[torch.Tensor], chunk: Chunk) -> None:
        votes = _votes(xs, self.method)
        self.plus += int((votes > 0).sum())
        self.minus += int((votes < 0).sum())

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> float:
        return 1.0 if self.plus >= self.minus else -1.0


@primitive("elect_sign_zeros", Param("xs", "tensors"),
           Param("method", "string", "sum", choices=("sum", "count")),
           Param("zeros", "string", "majority", choices=("plus", "majority")),
           reduction=lambda numel, method, zeros:
               _Majority(method) if zeros == "majority" else None,
           maps=False)
def elect_sign_zeros(xs: list[torch.Tensor], method: str = "sum", zeros: str = "majority",
                     *, chunk: Chunk | None = None) -> torch.Tensor:
    """elect_sign, choosing what an entry whose vote is exactly 0 elects: "plus" gives +1
    (mergekit, = elect_sign); "majority" gives the majority of the signs elected over the
    whole tensor (the TIES paper's resolve_zero_signs; a tensor with as many + as - gives
    +1, where the paper's code would leave 0).
    """
    votes = _votes(xs, method)
    if zeros == "plus":
        return torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    majority = with_stats(chunk, votes, [xs], lambda: _Majority(method)).stats
    elected = torch.where(votes > 0, 1.0, torch.where(votes < 0, -1.0, majority))
    return elected.to(votes.dtype)


@primitive("disjoint_divisor", Param("votes", "tensors"),
           Param("aggregate", "string", "weighted", choices=("weighted", "mean", "sum")),
           maps=False)
def disjoint_divisor(votes: list[torch.Tensor], aggregate: str = "weighted") -> torch.Tensor:
    """The divisor of TIES's disjoint merge: Σ votes with 0 replaced by 1, where `votes`
    are the weights of the agreeing entries (aggregate="weighted", mergekit) or their 0/1
    agreement (aggregate="mean", the TIES paper's disjoint mean); 1 for "sum".
    """
    if aggregate == "sum":
        return torch.ones_like(votes[0])
    total = sum_of(votes)
    return torch.where(total == 0, torch.ones_like(total), total)


def _dare_trim(numel: int, density: float, variant: str) -> Reduction | None:
    return top_k(numel, density, "tensor") if variant == "paper" else None


@primitive("trim_after_drop", Param("x", "tensor"), DENSITY,
           Param("variant", "string", "paper", choices=("mergekit", "paper")),
           reduction=_dare_trim)
def trim_after_drop(x: torch.Tensor, density: float, variant: str = "paper", *,
                    chunk: Chunk | None = None) -> torch.Tensor:
    """DARE-TIES's trim step: variant="paper" trims the dropped delta to its top `density`
    by magnitude (the DARE paper runs all of TIES after the drop), "mergekit" leaves it
    (the drop replaces the trim)."""
    if variant != "paper":
        return x.clone()
    return trim(x, density, chunk=chunk)
