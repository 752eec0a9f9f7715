"""Breadcrumbs, DELLA, SCE, RAM and the TIES options (stdlib/breadcrumbs.merge, della.merge,
sce.merge, ram.merge, ties.merge, dare.merge on mergelang/ops/pruning.py).

Deterministic methods are checked against references written here from the definitions
(mergekit 0.1.5's code read literally, with a stable sort where it sorts, and the TIES
paper's resolve_sign / disjoint_merge) and against hand-computed cases; random ones by
their statistics. Every primitive with a reduction or randomness gives the same bytes
computed whole or in row blocks.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelang
from mergelang.ops import PRIMITIVES
from mergelang.ops.pruning import magprune, top_variance, trim_outliers
from mergelang.reduce import Chunk, RandomStream
from mergelang.selection import (
    ModelKthMagnitude,
    OrderStatistics,
    Rank,
    keep_band,
    keep_top,
    top_cut,
)
from tests.helpers import four_models, ref_consensus, same_bytes_in_chunks


def family(shape=(8, 16), n=3, seed=0, sparse=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = []
    for _ in range(n):
        d = torch.randn(shape, generator=g) * 0.1
        if sparse:
            d = torch.where(torch.rand(shape, generator=g) < sparse, 0.0, d)
        deltas.append(d)
    return base, deltas


def inputs(deltas):
    return {f"d{i}": d for i, d in enumerate(deltas)}


def args(deltas):
    return ", ".join(f"d{i}" for i in range(len(deltas)))


def column(values, like):
    return torch.tensor(values, dtype=like.dtype).view(-1, *[1] * like.dim())


# --- references -----------------------------------------------------------------------


def ref_trim(d, density):
    flat = d.flatten()
    k = max(1, int(density * flat.numel())) if density > 0 else 0
    mask = torch.zeros_like(flat)
    mask[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = 1
    return (flat * mask).view_as(d)


def ref_band(d, density, gamma):
    """mergekit's magnitude_outliers, with a stable ascending sort."""
    if density >= 1:
        return d
    n = d.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.sort(d.abs().flatten(), stable=True).indices
    mask = torch.zeros(n)
    mask[order[bottom:bottom + target]] = 1
    return d * mask.view_as(d)


def ref_l1(kept, d):
    before, after = d.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def ref_ties_paper(deltas, density):
    """The TIES paper's code: trim, resolve_sign with zeros to the majority, disjoint mean."""
    t = torch.stack([ref_trim(d, density) for d in deltas])
    sign = torch.sign(t.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, t > 0, t < 0)
    selected = t * keep
    return selected.sum(0) / (selected != 0).sum(0).float().clamp(min=1)


def ref_sce(deltas, select_topk):
    tv = torch.stack(deltas)
    if select_topk < 1:
        var = tv.var(0, unbiased=False)
        k = int(int((var != 0).sum()) * select_topk)
        mask = torch.zeros(var.numel())
        mask[torch.argsort(var.flatten(), descending=True, stable=True)[:k]] = 1
        tv = tv * mask.view_as(var)
    agree = tv.sign() == torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    energy = tv.square().flatten(1).mean(1)
    total = float(energy.sum())
    w = torch.full_like(energy, 1 / len(deltas)) if abs(total) < 1e-6 else energy / total
    ew = w.view(-1, *[1] * deltas[0].dim()) * agree
    return (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


def ref_ram(deltas, epsilon=1e-5, r=None, alpha=None):
    tv = torch.stack(deltas).flatten(1)
    moved = tv.abs() > epsilon
    count = moved.sum(0, keepdim=True)
    unique, overlap = count == 1, count > 1
    lam = torch.ones(len(deltas), 1)
    if r is not None:
        shared = (moved & overlap).sum(1)
        only = (moved & unique).sum(1)
        lam = (1 + r * (shared / only.clamp(min=epsilon)).clamp(0, alpha)).unsqueeze(1)
    z = tv * moved
    merged = (z * unique * lam + z * overlap / count.clamp(min=1)).sum(0)
    return merged.view_as(deltas[0])


# --- breadcrumbs ----------------------------------------------------------------------


def test_breadcrumbs_keeps_the_band_on_a_hand_computed_case():
    d = torch.tensor([0.1, -0.5, 0.3, 2.0, -0.2, 0.4, 0.05, -1.0, 0.6, 0.7])
    # n = 10, target = 5, top = 1, bottom = 4: drop 0.05, 0.1, 0.2, 0.3 and the outlier 2.0
    out = mergelang.evaluate("breadcrumbs(d, density=0.5, gamma=0.1)", d=d)
    torch.testing.assert_close(out, torch.tensor([0, -0.5, 0, 0, 0, 0.4, 0, -1.0, 0.6, 0.7]))
    # target + top > n: bottom = max(0, 10 - 9 - 2) = 0, only the largest entry goes
    out = mergelang.evaluate("breadcrumbs(d, density=0.9, gamma=0.2)", d=d)
    torch.testing.assert_close(out, torch.where(d.abs() == 2.0, 0.0, d))
    # density 1 keeps everything (gamma is not applied), a density below 1/n nothing
    assert torch.equal(mergelang.evaluate("breadcrumbs(d, density=1)", d=d), d)
    assert not mergelang.evaluate("breadcrumbs(d, density=0.05)", d=d).any()


def test_breadcrumbs_ties_in_magnitude_follow_a_stable_ascending_order():
    x = torch.tensor([1.0, -1.0, 1.0, 1.0, 2.0, -2.0])
    # ranks: the four 1s get 0..3 in order, the 2s 4 and 5. target 3, bottom 3 -> ranks 3..5
    torch.testing.assert_close(trim_outliers(x, 0.5, 0.0),
                               torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0, -2.0]))
    # top = 1, bottom = 2 -> ranks 2..4: the third and fourth 1 and the first 2
    torch.testing.assert_close(trim_outliers(x, 0.5, 1 / 6 + 1e-9),
                               torch.tensor([0.0, 0.0, 1.0, 1.0, 2.0, 0.0]))
    g = torch.Generator().manual_seed(1)
    y = torch.randint(-3, 4, (9, 7), generator=g).float()  # many ties
    for density, gamma in [(0.3, 0.1), (0.5, 0.0), (0.9, 0.05), (0.99, 0.5), (0.02, 0.01)]:
        torch.testing.assert_close(trim_outliers(y, density, gamma), ref_band(y, density, gamma))


@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.5, 0.1), (0.9, 0.05)])
def test_breadcrumbs_matches_the_reference(density, gamma):
    base, deltas = family()
    w = [1.0, 0.7, -0.4]
    expr = (f"breadcrumbs({args(deltas)}, weights=[1.0, 0.7, -0.4], density={density}, "
            f"gamma={gamma}, lambda=1.5")
    crumbs = [ref_band(d, density, gamma) for d in deltas]
    expected = 1.5 * sum(wi * c for wi, c in zip(w, crumbs, strict=True))
    torch.testing.assert_close(mergelang.evaluate(expr + ")", **inputs(deltas)), expected)
    normalized = mergelang.evaluate(expr + ", normalize=true)", **inputs(deltas))
    torch.testing.assert_close(normalized, expected / sum(w))
    l1 = mergelang.evaluate(expr + ', rescale="l1")', **inputs(deltas))
    expected = 1.5 * sum(wi * ref_l1(c, d) for wi, c, d in zip(w, crumbs, deltas, strict=True))
    torch.testing.assert_close(l1, expected)


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_ties_matches_the_reference(normalize):
    base, deltas = family()
    w = column([1.0, 0.5, 2.0], deltas[0])
    out = mergelang.evaluate(
        f"base + breadcrumbs_ties({args(deltas)}, weights=[1.0, 0.5, 2.0], density=0.4, "
        f"gamma=0.05, normalize={str(normalize).lower()})", base=base, **inputs(deltas))
    crumbs = torch.stack([ref_band(d, 0.4, 0.05) for d in deltas])
    torch.testing.assert_close(out, base + ref_consensus(crumbs * w, w, normalize))


# --- DELLA ----------------------------------------------------------------------------


def ranks_in_rows(x):
    """1-based rank of |x| within each row (along dim 1), ties by position."""
    order = torch.argsort(x.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).float() + 1


def della_probability(x, density, epsilon):
    t = x if x.dim() >= 2 else x.reshape(1, -1)
    m = t.shape[1]
    p = (density - epsilon) + 2 * epsilon * (ranks_in_rows(t) - 1) / (m - 1)
    return p.reshape(x.shape)


def test_della_keep_probability_grows_with_the_magnitude_rank():
    m, rows = 11, 6000
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randperm(m, generator=g) for _ in range(rows)]).float() + 1
    out = magprune(x, 0.5, 0.2, "none", chunk=Chunk.whole(x, RandomStream(0, "t", "s")))
    kept = out != 0
    for rank in range(1, m + 1):  # x == rank: its rank in its row
        rate = kept[x == rank].float().mean().item()
        assert abs(rate - (0.3 + 0.4 * (rank - 1) / (m - 1))) < 0.025, rank
    assert abs(kept.float().mean().item() - 0.5) < 0.01
    torch.testing.assert_close(out[kept], x[kept])  # rescale="none"


def test_della_rescale_by_probability_keeps_the_expectation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 40, generator=g)
    out = magprune(x, 0.4, 0.15, chunk=Chunk.whole(x, RandomStream(3, "t", "s")))
    kept = out != 0
    p = della_probability(x, 0.4, 0.15)
    torch.testing.assert_close(out[kept], x[kept] / p[kept])  # each divided by its own p
    ratio = (out / x).mean().item()  # E[keep / p] = 1
    assert abs(ratio - 1) < 0.03
    assert abs(kept.float().mean().item() - 0.4) < 0.01


def test_della_ranks_a_1d_tensor_as_one_row_and_a_row_of_one_at_density():
    g = torch.Generator().manual_seed(4)
    v = torch.randn(301, generator=g)
    out = magprune(v, 0.5, 0.3, chunk=Chunk.whole(v, RandomStream(0, "v", "s")))
    kept = out != 0
    torch.testing.assert_close(out[kept], v[kept] / della_probability(v, 0.5, 0.3)[kept])
    single = torch.randn(400, 1, generator=g)
    out = magprune(single, 0.3, 0.2, chunk=Chunk.whole(single, RandomStream(0, "s", "s")))
    kept = out != 0
    torch.testing.assert_close(out[kept], single[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.08


def test_della_l1_rescale_matches_the_norm_as_mergekit():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 64, generator=g)
    out = magprune(x, 0.3, 0.1, "l1", chunk=Chunk.whole(x, RandomStream(0, "t", "s")))
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    kept = out != 0
    scale = out[kept] / x[kept]
    torch.testing.assert_close(scale, torch.full_like(scale, scale[0].item()))


def test_della_without_a_drop_is_ties_consensus_and_della_linear_is_the_weighted_sum():
    base, deltas = family()
    w = column([1.0, 0.6, 0.3], deltas[0])
    stacked = torch.stack(deltas)
    out = mergelang.evaluate(f"della({args(deltas)}, weights=[1.0, 0.6, 0.3], density=1)",
                             **inputs(deltas))
    torch.testing.assert_close(out, ref_consensus(stacked * w, w, normalize=True))
    out = mergelang.evaluate(f"della_linear({args(deltas)}, weights=[1.0, 0.6, 0.3], "
                             "density=1, lambda=2)", **inputs(deltas))
    torch.testing.assert_close(out, 2 * (stacked * w).sum(0))


def test_della_linear_statistics_through_the_language():
    g = torch.Generator().manual_seed(6)
    d = torch.randn(300, 50, generator=g)
    out = mergelang.evaluate("della_linear(d, density=0.3, epsilon=0.1)", d=d, seed=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(out[kept], d[kept] / della_probability(d, 0.3, 0.1)[kept])
    again = mergelang.evaluate("della_linear(d, density=0.3, epsilon=0.1)", d=d, seed=1)
    assert torch.equal(out, again)
    other = mergelang.evaluate("della_linear(d, density=0.3, epsilon=0.1)", d=d, seed=2)
    assert not torch.equal(out, other)


# --- SCE ------------------------------------------------------------------------------


def test_sce_on_a_hand_computed_case():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([1.0, 2.0, 0.0, -1.0])
    # weights: mean squares 3.5 and 1.5 -> 0.7, 0.3; signs elected: + everywhere (a sum of
    # 0 elects +). Entry 0: both agree, (0.7 + 0.3) / 1; entry 1: b only; entry 3: a only.
    torch.testing.assert_close(mergelang.evaluate("sce(a, b)", a=a, b=b),
                               torch.tensor([1.0, 2.0, 0.0, 3.0]))
    # variances [0, 4, 0, 4]: two nonzero, k = int(2 * 0.5) = 1; the tie goes to entry 1.
    # Then both weights are 0.5, + is elected at a sum of 0, and b agrees: 0.5 * 2 / 0.5.
    torch.testing.assert_close(mergelang.evaluate("sce(a, b, select_topk=0.5)", a=a, b=b),
                               torch.tensor([0.0, 2.0, 0.0, 0.0]))
    # one delta: no variance, nothing selected; with nothing left the weights are uniform
    assert not mergelang.evaluate("sce(a, select_topk=0.5)", a=a).any()


@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.25, 0.0])
def test_sce_matches_the_reference(select_topk):
    base, deltas = family(n=3)
    out = mergelang.evaluate(f"base + sce({args(deltas)}, select_topk={select_topk})",
                             base=base, **inputs(deltas))
    torch.testing.assert_close(out, base + ref_sce(deltas, select_topk))


def test_top_variance_ties_keep_the_earlier_entries():
    g = torch.Generator().manual_seed(7)
    # four models of small integers: the variances are exact, and few distinct (many ties)
    xs = [torch.randint(-2, 3, (6, 5), generator=g).float() for _ in range(4)]
    var = torch.stack(xs).var(0, unbiased=False)
    for density in (0.1, 0.5, 0.9):
        k = int(int((var != 0).sum()) * density)
        expected = torch.zeros(var.numel())
        expected[torch.argsort(var.flatten(), descending=True, stable=True)[:k]] = 1
        torch.testing.assert_close(top_variance(xs, density), expected.view_as(var))


# --- RAM ------------------------------------------------------------------------------


def test_ram_on_a_hand_computed_case():
    a = torch.tensor([0.0, 1e-6, 2.0, 3.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    c = torch.tensor([1.0, 0.0, 0.0, -3.0, 5.0, -1.0, 0.0])
    # moved (|d| > 1e-5): a at 2, 3; b at 2; c at 0, 3, 4, 5. Counts [1, 0, 2, 2, 1, 1, 0]
    expected = torch.tensor([1.0, 0.0, 3.0, 0.0, 5.0, -1.0, 0.0])
    torch.testing.assert_close(mergelang.evaluate("ram(a, b, c)", a=a, b=b, c=c), expected)
    # ramplus_tl: c has 3 unique and 1 shared entry: rho = 1/3, lambda = 1 + 0.3 * 1/3 on
    # its unique entries; a and b have none (rho clamps to alpha, and is not used)
    out = mergelang.evaluate("ramplus_tl(a, b, c, r=0.3, alpha=0.5)", a=a, b=b, c=c)
    lam = 1 + 0.3 * (1 / 3)
    torch.testing.assert_close(out, torch.tensor([lam, 0.0, 3.0, 0.0, 5 * lam, -lam, 0.0]))
    out = mergelang.evaluate("ramplus_tl(a, b, c, r=0.3, alpha=0.2)", a=a, b=b, c=c)
    lam = 1 + 0.3 * 0.2  # rho = 1/3 clamped to alpha
    torch.testing.assert_close(out, torch.tensor([lam, 0.0, 3.0, 0.0, 5 * lam, -lam, 0.0]))


def test_ram_and_ramplus_match_the_reference():
    base, deltas = family(n=3, sparse=0.6)
    out = mergelang.evaluate(f"base + ram({args(deltas)})", base=base, **inputs(deltas))
    torch.testing.assert_close(out, base + ref_ram(deltas))
    out = mergelang.evaluate(f"base + ramplus_tl({args(deltas)}, r=0.5, alpha=0.4, "
                             "epsilon=0.01)", base=base, **inputs(deltas))
    torch.testing.assert_close(out, base + ref_ram(deltas, 0.01, 0.5, 0.4))


# --- TIES options ---------------------------------------------------------------------


def test_zero_votes_go_to_plus_or_to_the_majority_sign():
    a = torch.tensor([1.0, 2.0, -3.0, 1.0, -2.0])
    b = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0])
    # votes (sums): [0, 1, -4, 0, -3]: + once, - twice, so the majority is -
    out = mergelang.evaluate("ties(a, b, density=1)", a=a, b=b)
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, -2.0, 1.0, -1.5]))
    out = mergelang.evaluate('ties(a, b, density=1, zeros="majority")', a=a, b=b)
    torch.testing.assert_close(out, torch.tensor([-1.0, 2.0, -2.0, -1.0, -1.5]))
    # by count: [0, 0, -2, 0, -2]: entries 0, 1, 3 tie; the majority of the others is -
    out = mergelang.evaluate('ties(a, b, density=1, method="count", zeros="majority")',
                             a=a, b=b)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, -2.0, -1.0, -1.5]))
    # as many + as - elected: the zero votes elect + (the paper's code would leave 0)
    out = mergelang.evaluate('ties(a, b, density=1, zeros="majority")', a=a[:4], b=b[:4])
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, -2.0, 1.0]))


def test_disjoint_aggregation_weighted_mean_and_sum():
    a = torch.tensor([2.0, 1.0, -1.0])
    b = torch.tensor([4.0, -3.0, 0.0])
    # weighted deltas: a -> [2, 1, -1], b (weight 0.5) -> [2, -1.5, 0]
    # signs: [+, -, -]; agreeing: entry 0 both, entry 1 b, entry 2 a
    expr = "ties(a, b, weights=[1, 0.5], density=1"
    torch.testing.assert_close(mergelang.evaluate(expr + ")", a=a, b=b),
                               torch.tensor([4 / 1.5, -1.5 / 0.5, -1.0]))  # weighted
    torch.testing.assert_close(mergelang.evaluate(expr + ', aggregate="mean")', a=a, b=b),
                               torch.tensor([2.0, -1.5, -1.0]))
    torch.testing.assert_close(mergelang.evaluate(expr + ', aggregate="sum")', a=a, b=b),
                               torch.tensor([4.0, -1.5, -1.0]))
    same = mergelang.evaluate(expr + ", normalize=false)", a=a, b=b)
    assert torch.equal(same, mergelang.evaluate(expr + ', aggregate="sum")', a=a, b=b))
    # an explicit aggregate wins over normalize
    torch.testing.assert_close(
        mergelang.evaluate(expr + ', normalize=false, aggregate="mean")', a=a, b=b),
        torch.tensor([2.0, -1.5, -1.0]))
    explicit = mergelang.evaluate(expr + ', aggregate="weighted")', a=a, b=b)
    assert torch.equal(explicit, mergelang.evaluate(expr + ")", a=a, b=b))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_with_the_paper_options_is_the_papers_ties(density):
    _, deltas = family(shape=(12, 10), n=3, seed=3)
    # exact zero votes: entries where the deltas cancel
    deltas[1][0, :5] = -deltas[0][0, :5]
    deltas[2][0, :5] = 0.0
    out = mergelang.evaluate(f'ties({args(deltas)}, density={density}, zeros="majority", '
                             'aggregate="mean")', **inputs(deltas))
    torch.testing.assert_close(out, ref_ties_paper(deltas, density))


def test_dare_ties_paper_variant_drops_then_trims():
    base, deltas = family(shape=(16, 16))
    # without a drop, the paper's variant is TIES with the trim density (unnormalized here)
    out = mergelang.evaluate(f'dare_ties({args(deltas)}, weights=[1, 0.5, 2], density=1, '
                             f'variant="paper", trim_density=0.3)', **inputs(deltas))
    w = column([1, 0.5, 2], deltas[0])
    trimmed = torch.stack([ref_trim(d, 0.3) for d in deltas])
    torch.testing.assert_close(out, ref_consensus(trimmed * w, w, normalize=False))
    # with a drop: the survivors of the drop, rescaled by 1/density, then their top 30%
    d = torch.randn(40, 50, generator=torch.Generator().manual_seed(8))
    kept = mergelang.evaluate('dare_ties(d, density=0.5, variant="paper", trim_density=0.3)',
                              d=d, seed=4)
    mask = kept != 0
    assert int(mask.sum()) == int(0.3 * d.numel())
    torch.testing.assert_close(kept[mask], d[mask] / 0.5)
    # the mergekit variant (the default) is the drop alone
    plain = mergelang.evaluate("dare_ties(d, density=0.5)", d=d, seed=4)
    assert abs((plain != 0).float().mean().item() - 0.5) < 0.03


def test_options_are_checked_when_the_script_is_compiled():
    a, b = torch.ones(3), torch.ones(3)
    for expr, message in [('ties(a, b, aggregate="median")', "aggregate must be one of"),
                          ('ties(a, b, zeros="minus")', "zeros must be one of"),
                          ('dare_ties(a, b, variant="Paper")', "variant must be one of"),
                          ('della(a, b, rescale="l2")', "rescale must be one of"),
                          ('breadcrumbs(a, b, rescale="l2")', "rescale must be one of"),
                          ("breadcrumbs(a, b, gamma=1.5)", "gamma must be in [0, 1]")]:
        with pytest.raises(mergelang.MergeError, match=message.replace("[", r"\[")):
            mergelang.evaluate(expr, a=a, b=b)


def test_the_primitives_are_ours():
    # a registry name taken twice silently replaces one primitive with another
    for name in ("trim_outliers", "match_norm", "magprune", "top_variance", "energy_share",
                 "clamp_min", "above", "ram_boost", "elect_sign_zeros", "disjoint_divisor",
                 "trim_after_drop"):
        assert PRIMITIVES[name].fn.__module__ == "mergelang.ops.pruning", name


# --- chunked execution ----------------------------------------------------------------


def quantised(seed):
    """Values on a coarse grid (magnitudes, variances and votes tie often), with a 2-D
    tensor, a 1-D one and a scalar."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randint(-6, 7, (29, 8), generator=g).float() / 4,
        "layers.0.w": torch.randint(-6, 7, (33, 5), generator=g).float() / 4,
        "layers.0.norm": torch.randint(-6, 7, (41,), generator=g).float() / 4,
        "scale": torch.tensor(0.5 + seed),
    }


CHUNKED = [
    "base + breadcrumbs(a - base, b - base, c - base, density=0.5, gamma=0.1)",
    'base + breadcrumbs_ties(a - base, b - base, density=0.6, gamma=0.05, rescale="l1", '
    'normalize=true)',
    "base + trim_outliers(trim_outliers(a - base, 0.7, 0.1) + b - base, 0.5, 0.2)",
    "base + della(a - base, b - base, c - base, density=0.4, epsilon=0.2)",
    'base + della_linear(a - base, b - base, density=0.6, epsilon=0.3, rescale="l1")',
    "base + sce(a - base, b - base, c - base, select_topk=0.4)",
    "base + ramplus_tl(a - base, b - base, c - base, r=0.5, alpha=0.3)",
    'base + ties(a - base, b - base, c - base, density=0.5, zeros="majority", '
    'aggregate="mean")',
    'base + dare_ties(a - base, b - base, c - base, density=0.6, variant="paper", '
    'trim_density=0.3)',
]


@pytest.mark.parametrize("expression", CHUNKED)
def test_chunked_execution_gives_the_same_bytes(tmp_path, expression):
    p = four_models(tmp_path, expression, quantised, seed=3)
    whole = same_bytes_in_chunks(p)
    for name in whole:
        assert whole[name].isfinite().all()
    p.bound.close()


@pytest.mark.parametrize("ranks", [[0], [0, 9999], [4321, 4321], [5000, 7000], [9999]])
def test_order_statistics_in_chunks_equal_the_whole(ranks):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5000, generator=g),
                   torch.randint(-3, 4, (5000,), generator=g).float()]).reshape(100, 100)
    whole = OrderStatistics(x.numel(), lambda nonzero: ranks)
    whole.add(x, Chunk.whole(x))
    assert whole.finish_sweep()
    chunked = OrderStatistics(x.numel(), lambda nonzero: ranks)
    for _ in range(chunked.sweeps(7)):
        for rows in torch.split(x, 15):
            chunked.add(rows, Chunk.whole(rows))
        done = chunked.finish_sweep()
    assert done and whole.result() == chunked.result()
    ordered = torch.sort(x.abs().flatten()).values
    found, nonzero = whole.result()
    assert nonzero == int((x != 0).sum())
    for r in ranks:
        value, less, equal = found[r]
        assert value == float(ordered[r])
        assert less == int((ordered < value).sum()) and equal == int((ordered == value).sum())


# --- the selection engine (mergelang/selection.py) -------------------------------------


def select(reduction, parts, tensors=None):
    """Feed a reduction the row blocks `parts` (one chunk each, of tensors named by
    `tensors`) for as many sweeps as it asks, and return its result."""
    names = tensors or [""] * len(parts)
    for _ in range(reduction.sweeps(len(parts))):
        for part, name in zip(parts, names, strict=True):
            reduction.add(part, Chunk(part.numel(), 0, tensor=name))
        done = reduction.finish_sweep()
    assert reduction.sweeps(len(parts)) == 0 or done
    return reduction.result()


def tied(seed, shape):
    """Values on a coarse grid (most of them tie), a fifth of them zero, NaN-free, with
    some extremes: large, tiny (denormal) and negative."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-4, 5, shape, generator=g).float() / 8
    x = torch.where(torch.rand(shape, generator=g) < 0.2, 0.0, x)
    extremes = torch.tensor([3e38, 1e-40, -2.5, 7.0, -1e-3])
    flat = x.reshape(-1)
    at = torch.randint(0, flat.numel(), (min(5, flat.numel()),), generator=g)
    flat[at] = extremes[:len(at)]
    return x


SPLITS = [None, 1, 3, 7]  # None: the whole tensor in one chunk; else rows per chunk


def blocks(x, rows):
    return [x] if rows is None else list(torch.split(x, rows))


@pytest.mark.parametrize("magnitudes", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_every_rank_equals_a_stable_sort_in_any_chunking(seed, magnitudes):
    x = tied(seed, (11, 5))
    n = x.numel()
    values = (x.abs() if magnitudes else x).reshape(-1)
    ordered = torch.sort(values, stable=True).values
    expected = {r: Rank(float(ordered[r]), int((values < ordered[r]).sum()),
                        int((values == ordered[r]).sum())) for r in range(n)}
    for rows in SPLITS:
        found = select(OrderStatistics(n, range(n), magnitudes=magnitudes), blocks(x, rows))
        assert found.ranks == expected and found.nonzero is None, rows


@pytest.mark.parametrize("seed", range(3))
def test_ranks_chosen_from_the_count_of_nonzero_values(seed):
    x = tied(seed, (9, 4))
    nonzero = int((x != 0).sum())
    seen = []

    def wanted(count):
        seen.append(count)
        return [x.numel() - 1 - count // 2]
    results = [select(OrderStatistics(x.numel(), wanted), blocks(x, rows)) for rows in SPLITS]
    assert set(seen) == {nonzero}
    assert all(r == results[0] for r in results) and results[0].nonzero == nonzero
    empty = select(OrderStatistics(x.numel(), lambda count: []), blocks(x, 2))
    assert empty.ranks == {} and empty.nonzero == nonzero


def test_a_tensor_of_zeros_and_a_tensor_without_ranks():
    zeros = torch.zeros(6, 3)
    found = select(OrderStatistics(18, [0, 17]), blocks(zeros, 4)).ranks
    assert found == {0: Rank(0.0, 0, 18), 17: Rank(0.0, 0, 18)}
    nothing = OrderStatistics(18, [])
    assert nothing.sweeps(3) == 0 and nothing.result().ranks == {}
    with pytest.raises(ValueError):
        OrderStatistics(18, [18])


def stable_top(values, k):
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.sort(values, descending=True, stable=True).indices[:k]] = True
    return keep


def stable_band(values, lo, hi):
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[torch.sort(values, stable=True).indices[lo:hi]] = True
    return keep


@pytest.mark.parametrize("seed", range(3))
def test_ties_at_the_cut_off_go_as_in_a_stable_sort_in_any_chunking(seed):
    x = tied(seed, (13, 4))
    n = x.numel()
    magnitude = x.abs()
    for rows in SPLITS:
        for k in (1, 5, n // 2, n - 1):
            found = select(OrderStatistics(n, [n - k]), blocks(x, rows)).ranks
            cut = top_cut(n, k, found[n - k])
            state: dict = {}
            got = torch.cat([keep_top(part.abs(), *cut, state).reshape(-1)
                             for part in blocks(x, rows)])
            assert torch.equal(got, stable_top(magnitude.reshape(-1), k)), (rows, k)
        for lo, hi in ((0, 1), (3, 17), (10, n), (n - 1, n), (5, 6)):
            found = select(OrderStatistics(n, [lo, hi - 1]), blocks(x, rows)).ranks
            state = {}
            got = torch.cat([keep_band(part.abs(), found, lo, hi, state).reshape(-1)
                             for part in blocks(x, rows)])
            assert torch.equal(got, stable_band(magnitude.reshape(-1), lo, hi)), (rows, lo, hi)


@pytest.mark.parametrize("rows", SPLITS)
def test_a_whole_model_top_k_gives_each_tensor_its_share_of_the_ties(rows):
    tensors = {"a": tied(1, (5, 4)), "b": tied(2, (7, 3)), "c": tied(3, (2, 2))}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    n = flat.numel()
    for k in (1, 9, n // 3, n - 2):
        parts, names = [], []
        for name, t in tensors.items():
            for part in blocks(t, rows):
                parts.append(part)
                names.append(name)
        selection = ModelKthMagnitude(k, n)
        select(selection, parts, names)
        expected = torch.split(stable_top(flat.abs(), k), [t.numel() for t in tensors.values()])
        for (name, t), want in zip(tensors.items(), expected, strict=True):
            state: dict = {}
            cut = selection.result_for(name)
            got = torch.cat([keep_top(part.abs(), *cut, state).reshape(-1)
                             for part in blocks(t, rows)])
            assert torch.equal(got, want), (k, name)


@st.composite
def tensors_with_ties(draw):
    """A small tensor whose values come from a few distinct ones (zero among them, signs
    mixed), and a number of rows per chunk (None: one chunk)."""
    rows, cols = draw(st.integers(1, 9)), draw(st.integers(1, 5))
    pool = draw(st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, -2.0, 1e-40, 3e38, -7.25]),
                         min_size=1, max_size=4, unique=True))
    values = draw(st.lists(st.sampled_from(pool), min_size=rows * cols,
                           max_size=rows * cols))
    split = draw(st.one_of(st.none(), st.integers(1, rows)))
    return torch.tensor(values).reshape(rows, cols), split


@settings(max_examples=60, deadline=None)
@given(tensors_with_ties(), st.booleans(), st.data())
def test_the_selection_is_a_stable_sort(case, magnitudes, data):
    x, rows = case
    n = x.numel()
    values = (x.abs() if magnitudes else x).reshape(-1)
    order = torch.sort(values, stable=True)
    found = select(OrderStatistics(n, range(n), magnitudes=magnitudes), blocks(x, rows)).ranks
    for r in range(n):
        value = order.values[r]
        assert found[r] == (float(value), int((values < value).sum()),
                            int((values == value).sum()))
    k = data.draw(st.integers(1, n))
    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    key = [part.abs() if magnitudes else part for part in blocks(x, rows)]
    state: dict = {}
    top = torch.cat([keep_top(part, *top_cut(n, k, found[n - k]), state).reshape(-1)
                     for part in key])
    assert torch.equal(top, stable_top(values, k))
    state = {}
    band = torch.cat([keep_band(part, found, lo, hi, state).reshape(-1) for part in key])
    assert torch.equal(band, stable_band(values, lo, hi))

