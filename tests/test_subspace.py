"""The data-free methods beyond mergekit: magmax, tsv, iso_c / iso_cts, cart, TALL masks and
consensus (stdlib/*.merge on mergelang/ops/subspace.py).

Each is checked on small tensors against a closed form or an independent computation in
float64 (an eigen-decomposition whitening for the Procrustes step, a plain SVD truncation
for the low-rank parts), on 1-D tensors (biases, norms), and through the streaming
executor with a tiny memory budget, which must not split the tensors the decompositions
need whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mergelang
from mergelang.execute import Collector, execute
from mergelang.schedule import schedule


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def whiten(a: torch.Tensor) -> torch.Tensor:
    """a (a^T a)^(-1/2): the orthonormal-column matrix nearest to a full-column-rank a,
    computed by an eigen-decomposition rather than the SVD the primitive uses."""
    a = a.double()
    values, vectors = torch.linalg.eigh(a.mT @ a)
    return a @ (vectors @ torch.diag(values.rsqrt()) @ vectors.mT)


def truncate(x: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def close(out: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(out.double(), expected.double(), atol=tol, rtol=tol)


# magmax

def test_magmax_keeps_the_entry_of_largest_magnitude():
    a = torch.tensor([1.0, -4.0, 0.5, 2.0, -3.0])
    b = torch.tensor([-2.0, 3.0, 0.25, -2.0, 0.0])
    c = torch.tensor([0.5, 1.0, -0.75, 1.0, 0.0])
    out = mergelang.evaluate("magmax(a, b, c, lambda=1.0)", a=a, b=b, c=c)
    # per entry: b, a, c, a (|2| = |-2|: the earlier delta wins), a
    assert torch.equal(out, torch.tensor([-2.0, -4.0, -0.75, 2.0, -3.0]))
    assert torch.equal(mergelang.evaluate("magmax(a, b, c)", a=a, b=b, c=c), 0.5 * out)


def test_magmax_weights_scale_before_the_selection():
    a, b = torch.tensor([[1.0, -4.0], [2.0, 0.0]]), torch.tensor([[-3.0, 1.0], [1.0, 1.0]])
    out = mergelang.evaluate("magmax(a, b, weights=[0.5, 1.0], lambda=1.0)", a=a, b=b)
    assert torch.equal(out, torch.tensor([[-3.0, -2.0], [1.0, 1.0]]))


# tsv

def block(rows: slice, cols: slice, values: torch.Tensor, shape=(8, 6)) -> torch.Tensor:
    x = torch.zeros(shape)
    x[rows, cols] = values
    return x


def test_tsv_of_deltas_in_orthogonal_subspaces_is_their_sum():
    # rank 2 each, in disjoint rows and columns: the stacked singular vectors are already
    # orthonormal, and k = floor(6 / 2) = 3 keeps all of each delta
    a = block(slice(0, 2), slice(0, 2), torch.tensor([[3.0, 1.0], [-1.0, 2.0]]))
    b = block(slice(4, 7), slice(3, 6), randn(3, 3, seed=1) @ torch.diag(torch.tensor(
        [1.0, 0.5, 0.0])) @ randn(3, 3, seed=2))
    assert close(mergelang.evaluate("tsv(a, b)", a=a, b=b), a + b)
    assert close(mergelang.evaluate("tsv(a, b, lambda=0.5)", a=a, b=b), 0.5 * (a + b))


def test_tsv_matches_truncation_then_whitening():
    a, b = randn(8, 6, seed=3), randn(8, 6, seed=4)
    parts = [torch.linalg.svd(x.double(), full_matrices=False) for x in (2 * a, b)]
    k = 3  # rank defaults to 1/T: floor(6 / 2)
    u = torch.cat([p.U[:, :k] for p in parts], 1)
    s = torch.cat([p.S[:k] for p in parts])
    v = torch.cat([p.Vh[:k].mT for p in parts], 1)
    expected = whiten(u) @ torch.diag(s) @ whiten(v).mT
    out = mergelang.evaluate("tsv(a, b, weights=[2, 1])", a=a, b=b)
    assert close(out, expected)
    # rank=1/3 keeps 2 directions of each
    k = 2
    u = torch.cat([p.U[:, :k] for p in parts], 1)
    v = torch.cat([p.Vh[:k].mT for p in parts], 1)
    s = torch.cat([p.S[:k] for p in parts])
    out = mergelang.evaluate("tsv(a, b, weights=[2, 1], rank=1/3)", a=a, b=b)
    assert close(out, whiten(u) @ torch.diag(s) @ whiten(v).mT)


def test_tsv_of_a_delta_with_itself_is_its_truncation():
    # the stack [U, U] is rank-deficient: its polar factor over the nonzero singular values
    # makes the two copies halves of one direction (not a new, arbitrary direction)
    a = randn(8, 6, seed=31)
    assert close(mergelang.evaluate("tsv(a, a)", a=a), truncate(a, 3))
    assert close(mergelang.evaluate("tsv(a, a, rank=1)", a=a), a)


def test_tsv_keeps_at_least_one_direction_and_handles_overfull_stacks():
    a, b, c = randn(2, 5, seed=5), randn(2, 5, seed=6), randn(2, 5, seed=7)
    # r = 2 < T = 3: one direction each (the authors' int(r / T) would keep none), and the
    # stack of 3 left vectors in R^2 gets orthonormal rows
    out = mergelang.evaluate("tsv(a, b, c)", a=a, b=b, c=c)
    assert out.shape == (2, 5) and torch.isfinite(out).all() and out.abs().sum() > 0
    assert torch.equal(mergelang.evaluate("tsv(a, b, rank=0)", a=a, b=b), torch.zeros(2, 5))


# iso_c, iso_cts

def test_iso_c_flattens_the_spectrum_of_the_sum_to_its_mean():
    a, b = randn(7, 5, seed=8), randn(7, 5, seed=9)
    total = a + 0.5 * b
    out = mergelang.evaluate("iso_c(a, b, weights=[1, 0.5])", a=a, b=b)
    mean = singular_values(total).mean()
    assert close(singular_values(out), mean.expand(5))
    assert close(out, mean * whiten(total))  # same singular vectors, spectrum flattened
    assert close(mergelang.evaluate("iso_c(a, b, weights=[1, 0.5], lambda=1.5)", a=a, b=b),
                 1.5 * out)
    # a wide matrix: the mean is over min(m, n) = 3 singular values
    w = randn(3, 9, seed=10)
    assert close(singular_values(mergelang.evaluate("iso_c(w)", w=w)),
                 singular_values(w).mean().expand(3))


def test_iso_c_leaves_the_null_space_of_a_low_rank_sum_alone():
    g = torch.Generator().manual_seed(32)
    a = (torch.randint(-4, 5, (7, 2), generator=g) @ torch.randint(-4, 5, (2, 5), generator=g)
         ).float()   # exactly rank 2 (small integers)
    out = mergelang.evaluate("iso_c(a, a)", a=a)
    mean = singular_values(2 * a)[:2].mean()
    assert close(singular_values(out), torch.tensor([mean, mean, 0, 0, 0]))
    u, _, vh = torch.linalg.svd(a.double())
    assert close(out, mean * u[:, :2] @ vh[:2])


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    a, b = randn(8, 6, seed=11), randn(8, 6, seed=12)
    assert close(mergelang.evaluate("iso_cts(a, b, common=1.0)", a=a, b=b),
                 mergelang.evaluate("iso_c(a, b)", a=a, b=b))
    # more tasks than the rank leaves no room for task-specific directions
    x, y, z = randn(2, 5, seed=34), randn(2, 5, seed=35), randn(2, 5, seed=36)
    assert close(mergelang.evaluate("iso_cts(x, y, z, common=0.0)", x=x, y=y, z=z),
                 mergelang.evaluate("iso_c(x, y, z)", x=x, y=y, z=z))


def test_iso_cts_common_and_task_specific_directions():
    a, b = randn(8, 6, seed=13), randn(8, 6, seed=14)
    # r = 6, common=0.5: floor(3) -> s = round(3 / 2) = 2 per task, k = 6 - 4 = 2 common
    u, s, vh = torch.linalg.svd((a + b).double(), full_matrices=False)
    us, ss, vs = [u[:, :2]], [s[:2]], [vh[:2].mT]
    for x in (a, b):
        rest = x.double() - u[:, :2] @ (u[:, :2].mT @ x.double())
        pu, ps, pvh = torch.linalg.svd(rest, full_matrices=False)
        us.append(pu[:, :2])
        ss.append(ps[:2])
        vs.append(pvh[:2].mT)
    expected = torch.cat(ss).mean() * whiten(torch.cat(us, 1)) @ whiten(torch.cat(vs, 1)).mT
    out = mergelang.evaluate("iso_cts(a, b, common=0.5)", a=a, b=b)
    assert close(out, expected)
    assert close(singular_values(out), torch.cat(ss).mean().expand(6))


# cart

def test_cart_at_full_rank_is_the_weight_average():
    a, b, c = randn(5, 4, seed=15), randn(5, 4, seed=16), randn(5, 4, seed=17)
    mean = (a + b + c) / 3
    assert close(mergelang.evaluate("cart(a, b, c, rank=1.0)", a=a, b=b, c=c), mean, 1e-6)
    assert close(mergelang.evaluate("cart(a, b, c, rank=0)", a=a, b=b, c=c), mean, 1e-6)
    assert close(mergelang.evaluate("cart(a, b, c, lambda=0)", a=a, b=b, c=c), mean, 1e-6)


def test_cart_adds_low_rank_centered_deltas_to_the_mean():
    a, b, c = randn(10, 8, seed=18), randn(10, 8, seed=19), randn(10, 8, seed=20)
    mean = (a + b + c) / 3
    for rank, k in ((0.08, 1), (0.25, 2), (0.5, 4)):  # k = max(1, floor(rank * 8))
        expected = mean + 0.7 * sum(truncate(x - mean, k) for x in (a, b, c))
        out = mergelang.evaluate(f"cart(a, b, c, rank={rank}, lambda=0.7)", a=a, b=b, c=c)
        assert close(out, expected), rank


def test_cart_reads_no_base():
    base, a, b = randn(6, 6, seed=21), randn(6, 6, seed=22), randn(6, 6, seed=23)
    on_deltas = mergelang.evaluate("base + cart(a - base, b - base, rank=0.5)",
                                   base=base, a=a, b=b)
    assert close(mergelang.evaluate("cart(a, b, rank=0.5)", a=a, b=b), on_deltas)


# TALL masks, consensus

def test_tall_masks_and_consensus_k_from_1_to_t():
    a = torch.tensor([3.0, 0.0, 1.0, -2.0, 0.1])
    b = torch.tensor([1.0, 2.0, 1.0, 2.0, 0.0])
    c = torch.tensor([0.0, 0.0, 1.0, -2.0, 0.0])
    merged = a + b + c  # [4, 2, 3, -2, 0.1]
    # |d| >= 0.5 |merged - d|:   a: [1, 0, 1, 1, 1]   b: [0, 1, 1, 1, 0]   c: [0, 0, 1, 1, 0]
    masks = {"a": [1, 0, 1, 1, 1], "b": [0, 1, 1, 1, 0], "c": [0, 0, 1, 1, 0]}
    for name, mask in masks.items():
        out = mergelang.evaluate(f"tall_mask({name}, a + b + c, 0.5)", a=a, b=b, c=c)
        assert out.tolist() == mask, name
        out = mergelang.evaluate(f"tall({name}, a + b + c, mask_lambda=0.5)", a=a, b=b, c=c)
        assert torch.equal(out, merged * torch.tensor(mask, dtype=torch.float32))
    counts = torch.tensor([1, 1, 3, 3, 1])
    for k in range(0, 5):
        out = mergelang.evaluate(f"consensus_ta(a, b, c, k={k}, mask_lambda=0.5)", a=a, b=b, c=c)
        assert torch.equal(out, merged * (counts >= k)), k
    # k = 1 keeps what any task needs (drops only "catastrophic" entries); k = T what all do
    out = mergelang.evaluate("consensus([a, b, c], a + b + c, k=3, mask_lambda=0.5)",
                             a=a, b=b, c=c)
    assert torch.equal(out, torch.tensor([0.0, 0.0, 3.0, -2.0, 0.0]))


def test_consensus_mask_lambda_per_task_and_the_default():
    a, b = torch.tensor([1.0, 1.0, 0.2]), torch.tensor([1.0, 0.5, 1.0])
    # merged = [2, 1.5, 1.2]; a: |a| >= l |b|, b: |b| >= l |a|
    out = mergelang.evaluate("consensus_mask([a, b], a + b, k=2, mask_lambda=[2.0, 0.4])",
                             a=a, b=b)
    assert out.tolist() == [0.0, 1.0, 0.0]   # a's mask [0, 1, 0] with lambda 2; b's [1, 1, 1]
    out = mergelang.evaluate("consensus_mask([a, b], a + b)", a=a, b=b)
    assert out.tolist() == [1.0, 1.0, 0.0]   # 0.4: a [1, 1, 0], b [1, 1, 1]


def test_consensus_ties_masks_the_ties_merge():
    a = torch.tensor([3.0, -1.0, 0.5, 2.0])
    b = torch.tensor([2.0, 1.0, -0.5, 0.1])
    ties = mergelang.evaluate("ties(a, b, density=1.0, normalize=false)", a=a, b=b)
    mask = mergelang.evaluate("consensus_mask([a, b], ties(a, b, density=1.0, "
                              "normalize=false))", a=a, b=b)
    out = mergelang.evaluate("consensus_ties(a, b, density=1.0)", a=a, b=b)
    assert torch.equal(out, ties * mask)


# biases, norms and other tensors that are not matrices

def test_one_dimensional_tensors():
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 2.0, -1.0])
    mean = (a + b) / 2
    assert torch.equal(mergelang.evaluate("tsv(a, b)", a=a, b=b), mean)
    assert torch.equal(mergelang.evaluate("iso_c(a, b)", a=a, b=b), mean)
    assert torch.equal(mergelang.evaluate("iso_cts(a, b)", a=a, b=b), mean)
    assert torch.equal(mergelang.evaluate("cart(a, b)", a=a, b=b), mean)
    assert torch.equal(mergelang.evaluate("tsv(a, b, weights=[3, 1], lambda=2)", a=a, b=b),
                       2 * (3 * a + b) / 4)
    assert torch.equal(mergelang.evaluate("magmax(a, b, lambda=1)", a=a, b=b),
                       torch.tensor([3.0, -2.0, 3.0]))
    assert torch.equal(mergelang.evaluate("low_rank(a, 0.1)", a=a), a)
    assert torch.equal(mergelang.evaluate("isotropic(a)", a=a), a)
    cube = randn(2, 3, 4, seed=24)
    assert torch.equal(mergelang.evaluate("iso_c(x, x)", x=cube), cube)


def test_results_never_alias_an_input():
    # the executor updates a last-use result in place: a primitive that handed back its
    # input would corrupt `a` for the `+ a` that follows
    a, b = randn(4, 3, seed=25), torch.tensor([1.0, 2.0])
    assert close(mergelang.evaluate("matrix_or(a, a) * 2 + a", a=a), 3 * a)
    assert close(mergelang.evaluate("low_rank(a, 1.0) * 2 + a", a=a), 3 * a)
    assert close(mergelang.evaluate("isotropic(b) * 2 + b", b=b), 3 * b)


def test_half_precision_and_float64_compute():
    a, b = randn(6, 4, seed=26), randn(6, 4, seed=27)
    reference = mergelang.evaluate("tsv(a, b)", a=a.double(), b=b.double(), dtype="float64")
    assert reference.dtype == torch.float64
    half = mergelang.evaluate("tsv(a, b)", a=a, b=b, dtype="bfloat16")
    assert close(half, reference, 0.1)


def test_svd_results_are_deterministic_and_nan_propagates():
    a, b = randn(9, 7, seed=28), randn(9, 7, seed=29)
    for method in ("tsv", "iso_c", "iso_cts", "cart"):
        one = mergelang.evaluate(f"{method}(a, b)", a=a, b=b)
        assert torch.equal(one, mergelang.evaluate(f"{method}(a, b)", a=a, b=b)), method
    bad = a.clone()
    bad[0, 0] = float("nan")
    assert torch.isnan(mergelang.evaluate("iso_c(a, b)", a=bad, b=b)).all()


def test_parameters_may_be_per_tensor_values():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    a = {n: randn(6, 4, seed=60 + i) for i, n in enumerate(names)}
    b = {n: randn(6, 4, seed=70 + i) for i, n in enumerate(names)}
    out = mergelang.evaluate("cart(a, b, rank=gradient([0.25, 1.0]))", a=a, b=b)
    first, last = names
    mean = (a[first] + b[first]) / 2
    assert close(out[first], mean + sum(truncate(x[first] - mean, 1) for x in (a, b)))
    assert close(out[last], (a[last] + b[last]) / 2)   # depth 1: rank 1.0, the average


def test_parameters_are_checked_at_the_call():
    a = randn(3, 3, seed=30)
    with pytest.raises(mergelang.MergeError, match=r"rank must be in \[0, 1\]"):
        mergelang.evaluate("cart(a, a, rank=8)", a=a)
    with pytest.raises(mergelang.MergeError, match="common must be in"):
        mergelang.evaluate("iso_cts(a, a, common=1.5)", a=a)


# through the streaming executor

@pytest.mark.parametrize("expression,whole", [
    ("base + tsv(da, db, dc) + iso_c(da, db) + iso_cts(da, db, dc) + cart(a, b, c, rank=0.5)",
     True),
    ("base + magmax(da, db) + consensus_ta(da, db, dc) + tall(da, da + db)", False),
])
def test_through_the_streaming_executor(make_model, tmp_path: Path, expression, whole):
    # decompositions are never split into row blocks, whatever the memory budget;
    # the elementwise methods are, with the same result
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.input_layernorm.weight"]
    for i, name in enumerate(("base", "a", "b", "c")):
        make_model(name, {names[0]: randn(12, 6, seed=40 + i), names[1]: randn(6, seed=50 + i)})
    script = tmp_path / "subspace.merge"
    script.write_text(f"""base = model("base")
a = model("a")
b = model("b")
c = model("c")
da = a - base
db = b - base
dc = c - base
output {expression}
""")
    p = mergelang.load(script).plan()
    matrix = next(k for k in schedule(p, 1) if k.tensor.name == names[0])
    assert len(matrix.chunks) == (1 if whole else 12)
    results = []
    for budget in (10**9, 1):
        collected = Collector(p.tensors)
        execute(p, collected.sink, budget=budget)
        results.append(collected.tensors)
    p.bound.close()
    for name in names:
        assert torch.equal(results[0][name], results[1][name]), name
        assert torch.isfinite(results[0][name]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_as_on_the_cpu():
    a, b, c = randn(64, 48, seed=80), randn(64, 48, seed=81), randn(64, 48, seed=82)
    for method in ("magmax(a, b, c)", "tsv(a, b, c)", "iso_c(a, b, c)", "iso_cts(a, b, c)",
                   "cart(a, b, c)", "consensus_ta(a, b, c)"):
        cpu = mergelang.evaluate(method, a=a, b=b, c=c)
        gpu = mergelang.evaluate(method, a=a, b=b, c=c, device="cuda")
        assert gpu.device.type == "cpu" and close(gpu, cpu, 1e-4), method
