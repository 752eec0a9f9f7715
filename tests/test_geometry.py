"""The geometric methods (slerp, nuslerp, multislerp, karcher, model_stock, nearswap,
arcee_fusion, passthrough) against closed forms written out here with `math` on small
vectors, and chunked execution against unchunked, bit for bit.

The references follow mergekit 0.1.5's definitions (its eps rules, colinear fallbacks,
the singular Model Stock ratio), computed independently of the primitives.
"""

from __future__ import annotations

import math

import pytest
import torch

import mergelang
from mergelang.ops import geometry, gram
from mergelang.schedule import schedule
from tests.helpers import four_models, same_bytes_in_chunks


def ev(expression: str, **inputs):
    return mergelang.evaluate(expression, **inputs)


def close(out, expected, tol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float32)
    torch.testing.assert_close(out, expected.reshape(out.shape), atol=tol, rtol=tol)


def zipped(*xs):
    return zip(*xs, strict=True)


def dot(u, v):
    return sum(x * y for x, y in zipped(u, v))


def norm(u):
    return math.sqrt(dot(u, u))


def ref_slerp(a, b, t, threshold=0.9995, eps=1e-8):
    na, nb = norm(a), norm(b)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    d = max(-1.0, min(1.0, dot(a, b) / (na * nb)))
    if abs(d) > threshold:
        return [(1 - t) * x + t * y for x, y in zipped(a, b)]
    th = math.acos(d)
    return [(math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
            for x, y in zipped(a, b)]


def ref_nuslerp(a, b, t, eps=1e-8):
    na, nb = max(norm(a), 1e-7), max(norm(b), 1e-7)
    c = max(-1.0, min(1.0, dot(a, b) / (na * nb)))
    if 1 - c * c <= eps * eps:
        return [(1 - t) * x + t * y for x, y in zipped(a, b)]
    th = math.acos(c)
    return [(math.sin((1 - t) * th) * x + math.sin(t * th) * y) / math.sin(th)
            for x, y in zipped(a, b)]


T = torch.tensor

# --- slerp -------------------------------------------------------------------------------


def test_slerp_at_a_right_angle():
    a, b = T([1.0, 0.0, 0.0]), T([0.0, 2.0, 0.0])
    t = 0.3
    close(ev("slerp(a, b, t=0.3)", a=a, b=b),
          [math.sin((1 - t) * math.pi / 2), 2 * math.sin(t * math.pi / 2), 0.0])


def test_slerp_general_angle_and_ends():
    a, b = [1.0, 2.0, 0.5], [-0.5, 1.0, 2.0]
    for t in (0.0, 0.25, 0.5, 0.9, 1.0, 1.5):
        close(ev(f"slerp(a, b, t={t})", a=T(a), b=T(b)), ref_slerp(a, b, t))
    assert torch.equal(ev("slerp(a, b, t=0)", a=T(a), b=T(b)), T(a))
    assert torch.equal(ev("slerp(a, b)", a=T(a), b=T(b)), ev("slerp(a, b, 0.5)", a=T(a), b=T(b)))


def test_slerp_falls_back_to_lerp_near_colinear_and_opposite():
    a = [1.0, 2.0, 3.0]
    for b in ([2.0, 4.0, 6.001], [-3.0, -6.0, -9.0]):
        lerp = [0.7 * x + 0.3 * y for x, y in zipped(a, b)]
        close(ev("slerp(a, b, t=0.3)", a=T(a), b=T(b)), lerp)
    # the threshold: cos 0.9996 is linear, cos 0.9994 is spherical
    for c in (0.9996, 0.9994):
        a2, b2 = [1.0, 0.0], [c, math.sqrt(1 - c * c)]
        expected = ref_slerp(a2, b2, 0.3)
        lerp = [0.7 * x + 0.3 * y for x, y in zipped(a2, b2)]
        assert (expected == lerp) == (c > 0.9995)
        close(ev("slerp(a, b, t=0.3)", a=T(a2), b=T(b2)), expected)
    # dot_threshold is a parameter
    a3, b3 = [1.0, 0.0], [0.8, 0.6]
    close(ev("slerp(a, b, t=0.5, dot_threshold=0.7)", a=T(a3), b=T(b3)), [0.9, 0.3])


def test_slerp_zero_vector_counts_its_norm_as_one():
    # mergekit: a norm <= eps is replaced by 1, so the cosine is 0 and the angle a right one
    a, b = T([0.0, 0.0, 0.0]), T([1.0, -2.0, 2.0])
    t = 0.3
    close(ev("slerp(a, b, t=0.3)", a=a, b=b), (math.sin(t * math.pi / 2) * b).tolist())


def test_slerp_is_per_tensor_and_takes_a_gradient():
    a = {"model.layers.0.w": T([[1.0, 0.0], [0.0, 1.0]]), "model.layers.2.w": T([1.0, 0.0])}
    b = {"model.layers.0.w": T([[0.0, 1.0], [1.0, 1.0]]), "model.layers.2.w": T([0.0, 3.0])}
    out = ev("slerp(a, b, t=gradient([0.2, 1.0]))", a=a, b=b)
    flat_a = a["model.layers.0.w"].flatten().tolist()
    flat_b = b["model.layers.0.w"].flatten().tolist()
    close(out["model.layers.0.w"], ref_slerp(flat_a, flat_b, 0.2))  # one angle per tensor
    close(out["model.layers.2.w"], [0.0, 3.0])


# --- nuslerp -------------------------------------------------------------------------------


def test_nuslerp_weights_give_t():
    a, b = [1.0, 2.0, 0.5], [-0.5, 1.0, 2.0]
    close(ev("nuslerp(a, b, weights=[1.0, 3.0])", a=T(a), b=T(b)), ref_nuslerp(a, b, 0.75))
    close(ev("nuslerp(a, b)", a=T(a), b=T(b)), ref_nuslerp(a, b, 0.5))
    close(ev("nuslerp(a, b, t=0.2, weights=[1.0, 3.0])", a=T(a), b=T(b)), ref_nuslerp(a, b, 0.2))
    # weights summing to (almost) zero: t = 0.5
    close(ev("nuslerp(a, b, weights=[1.0, -1.0])", a=T(a), b=T(b)), ref_nuslerp(a, b, 0.5))


def test_nuslerp_colinear_is_linear_and_zero_norm_is_clamped():
    a, b = [1.0, 2.0], [-2.0, -4.0]
    lerp = [0.75 * x + 0.25 * y for x, y in zipped(a, b)]
    close(ev("nuslerp(a, b, t=0.25)", a=T(a), b=T(b)), lerp)
    # a zero vector: its norm is clamped to 1e-7, the cosine is 0
    close(ev("nuslerp(a, b, t=0.25)", a=T([0.0, 0.0]), b=T([3.0, 4.0])),
          [math.sin(0.25 * math.pi / 2) * 3, math.sin(0.25 * math.pi / 2) * 4])


def test_nuslerp_flatten_rows_and_columns():
    a = [[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]]
    b = [[0.0, 1.0, 1.0], [0.0, 2.0, 2.0]]
    t = 0.4
    flat = ref_nuslerp(sum(a, []), sum(b, []), t)
    rows = [ref_nuslerp(ra, rb, t) for ra, rb in zipped(a, b)]   # row 1 is colinear: linear
    assert rows[1] == [(1 - t) * x + t * y for x, y in zipped(a[1], b[1])]
    cols = list(zipped(*[ref_nuslerp([a[0][j], a[1][j]], [b[0][j], b[1][j]], t) for j in range(3)]))
    ta, tb = T(a), T(b)
    close(ev("nuslerp(a, b, t=0.4)", a=ta, b=tb), flat)
    close(ev("nuslerp(a, b, t=0.4, flatten=false)", a=ta, b=tb), rows)
    close(ev("nuslerp(a, b, t=0.4, flatten=false, row_wise=true)", a=ta, b=tb), cols)
    # row_wise only matters without flattening
    close(ev("nuslerp(a, b, t=0.4, row_wise=true)", a=ta, b=tb), flat)


def test_nuslerp_rows_of_a_three_dimensional_tensor_and_a_vector():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    out = ev("nuslerp(a, b, t=0.3, flatten=false)", a=a, b=b)
    for i in range(2):
        for j in range(3):
            close(out[i, j], ref_nuslerp(a[i, j].tolist(), b[i, j].tolist(), 0.3))
    cols = ev("nuslerp(a, b, t=0.3, flatten=false, row_wise=true)", a=a, b=b)
    for j in range(3):
        for k in range(4):
            close(cols[:, j, k], ref_nuslerp(a[:, j, k].tolist(), b[:, j, k].tolist(), 0.3))
    v, w = [1.0, -1.0, 0.5], [0.2, 0.3, -2.0]   # one dimension: one vector
    close(ev("nuslerp(v, w, t=0.3, flatten=false, row_wise=true)", v=T(v), w=T(w)),
          ref_nuslerp(v, w, 0.3))


def test_nuslerp_around_a_base_is_a_task_vector_slerp():
    base, a, b = [1.0, 1.0, 1.0], [2.0, 1.0, 0.0], [1.0, 3.0, 1.5]
    da = [x - y for x, y in zipped(a, base)]
    db = [x - y for x, y in zipped(b, base)]
    expected = [x + y for x, y in zipped(base, ref_nuslerp(da, db, 1 / 3))]
    close(ev("base + nuslerp(a - base, b - base, weights=[2.0, 1.0])",
             base=T(base), a=T(a), b=T(b)), expected)


# --- multislerp ----------------------------------------------------------------------------


def ref_multislerp(xs, w, normalize=True, eps=1e-8):
    if normalize:
        w = [x / sum(w) for x in w]
    units = [[v / (norm(x) + eps) for v in x] for x in xs]
    mean = [sum(wi * u[k] for wi, u in zipped(w, units)) for k in range(len(xs[0]))]
    scale = sum(wi * norm(x) for wi, x in zipped(w, xs))
    return [scale * m / norm(mean) for m in mean]


def test_multislerp_closed_form():
    xs = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 3.0]]
    inputs = {"a": T(xs[0]), "b": T(xs[1]), "c": T(xs[2])}
    close(ev("multislerp(a, b, c)", **inputs), ref_multislerp(xs, [1, 1, 1]))
    close(ev("multislerp(a, b, c, weights=[1.0, 2.0, 0.5])", **inputs),
          ref_multislerp(xs, [1.0, 2.0, 0.5]))
    close(ev("multislerp(a, b, c, weights=[1.0, 2.0, 0.5], normalize=false)", **inputs),
          ref_multislerp(xs, [1.0, 2.0, 0.5], normalize=False), tol=1e-5)


def test_multislerp_of_two_is_slerp_with_interpolated_norm():
    # two unit-norm inputs: the weighted mean direction, i.e. slerp at the angle's midpoint
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    close(ev("multislerp(a, b)", a=a, b=b), [math.sqrt(0.5), math.sqrt(0.5)])


def test_multislerp_edge_cases():
    a = T([1.0, -2.0, 0.5])
    assert torch.equal(ev("multislerp(a, weights=3.0)", a=a), a)
    # opposite inputs with equal weights cancel: the linear mean
    close(ev("multislerp(a, b, weights=[1.0, 1.0])", a=a, b=-a), [0.0, 0.0, 0.0])
    close(ev("multislerp(a, b, weights=[1.0, 1.0])", a=a, b=-2 * a), (-0.5 * a).tolist())


def test_multislerp_with_a_base():
    base, a, b = T([1.0, 1.0]), T([2.0, 1.0]), T([1.0, 3.0])
    expected = [1 + v for v in ref_multislerp([[1.0, 0.0], [0.0, 2.0]], [1.0, 1.0])]
    close(ev("base + multislerp(a - base, b - base)", base=base, a=a, b=b), expected)


# --- karcher -------------------------------------------------------------------------------


def at(angle_deg, r):
    return T([r * math.cos(math.radians(angle_deg)), r * math.sin(math.radians(angle_deg)), 0.0])


def test_karcher_mean_on_a_circle_is_the_mean_angle():
    # on a great circle (within a half circle) the Karcher mean is the mean angle
    xs = {"a": at(0, 1.0), "b": at(30, 2.0), "c": at(90, 3.0)}
    close(ev("karcher(a, b, c, max_iter=50, tol=1e-9)", **xs), at(40, 2.0).tolist())
    close(ev("karcher(a, b, c)", **xs), at(40, 2.0).tolist(), tol=1e-4)  # the defaults
    # symmetric inputs: the mean is on the axis of symmetry
    close(ev("karcher(a, b)", a=at(10, 1.0), b=at(70, 3.0)), at(40, 2.0).tolist())


def test_karcher_off_a_circle():
    # three orthonormal directions: by symmetry the mean is (1, 1, 1) / sqrt(3)
    xs = {"a": T([2.0, 0.0, 0.0]), "b": T([0.0, 4.0, 0.0]), "c": T([0.0, 0.0, 6.0])}
    close(ev("karcher(a, b, c)", **xs), [4 / math.sqrt(3)] * 3)


def test_karcher_max_iter_and_small_inputs():
    xs = {"a": at(0, 1.0), "b": at(30, 2.0), "c": at(90, 3.0)}
    # no iteration: the normalised mean of the unit vectors
    units = [at(0, 1.0), at(30, 1.0), at(90, 1.0)]
    mean = sum(units) / 3
    close(ev("karcher(a, b, c, max_iter=0)", **xs), (2.0 * mean / mean.norm()).tolist())
    # a zero input takes no part in the direction but counts in the mean norm
    close(ev("karcher(a, b, z, max_iter=50, tol=1e-9)", a=at(0, 1.0), b=at(60, 2.0),
             z=T([0.0, 0.0, 0.0])), at(30, 1.0).tolist())
    assert torch.equal(ev("karcher(a)", a=at(5, 2.0)), at(5, 2.0))
    close(ev("karcher(a, b)", a=T([0.0, 0.0]), b=T([0.0, 0.0])), [0.0, 0.0])


# --- model_stock ---------------------------------------------------------------------------


def ref_stock_t(offsets):
    n = len(offsets)
    cosines = [max(-1.0, min(1.0, dot(offsets[i], offsets[j])
                             / max(norm(offsets[i]) * norm(offsets[j]), 1e-6)))
               for i in range(n) for j in range(i + 1, n)]
    c = sum(cosines) / len(cosines)
    den = 1 + (n - 1) * c
    return 0.0 if abs(den) < 1e-6 else n * c / den


def test_model_stock_ratio_from_the_angle():
    base = T([1.0, 1.0, 1.0])
    # offsets at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3
    a, b = base + T([1.0, 0.0, 0.0]), base + 2 * T([0.5, math.sqrt(0.75), 0.0])
    t = 2 / 3
    close(ev("model_stock(base, a, b)", base=base, a=a, b=b),
          (t * (a + b) / 2 + (1 - t) * base).tolist())
    # three fine-tunes: the mean of the pairwise cosines
    offsets = [[1.0, 0.2, 0.0], [0.3, 1.0, 0.5], [0.8, -0.1, 1.0]]
    models = {k: base + T(o) for k, o in zipped("abc", offsets)}
    t = ref_stock_t(offsets)
    assert 0 < t < 1
    close(ev("model_stock(base, a, b, c)", base=base, **models),
          (t * (models["a"] + models["b"] + models["c"]) / 3 + (1 - t) * base).tolist())


def test_model_stock_singular_keeps_the_base():
    # two opposite offsets: cos = -1, 1 + (2 - 1)(-1) = 0: t = 0
    base = T([1.0, 2.0])
    out = ev("model_stock(base, a, b)", base=base, a=base + T([1.0, 1.0]),
             b=base - T([2.0, 2.0]))
    close(out, base.tolist())
    # orthogonal offsets: cos = 0, t = 0 as well
    close(ev("model_stock(base, a, b)", base=base, a=base + T([1.0, 0.0]),
             b=base + T([0.0, 1.0])), base.tolist())


def test_model_stock_filter_wise_takes_one_angle_per_row():
    base = torch.zeros(2, 2)
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[1.0, 1.0], [1.0, 0.0]])     # row 0 at 45 degrees, row 1 colinear
    c45 = math.cos(math.pi / 4)
    t0, t1 = 2 * c45 / (1 + c45), 1.0
    avg = (a + b) / 2
    close(ev("model_stock(base, a, b, filter_wise=true)", base=base, a=a, b=b),
          [(t0 * avg[0]).tolist(), (t1 * avg[1]).tolist()])
    t = ref_stock_t([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    close(ev("model_stock(base, a, b)", base=base, a=a, b=b), (t * avg).tolist())


def test_model_stock_needs_two_fine_tunes():
    with pytest.raises(mergelang.MergeError, match="fine_tunes must be in"):
        ev("model_stock(base, a)", base=T([1.0]), a=T([2.0]))


# --- nearswap, arcee_fusion, passthrough ---------------------------------------------------


def test_nearswap_per_entry():
    base = [1.0, 1.0, 1.0, 1.0, 5.0]
    model = [1.05, 1.5, 3.0, 1.0, 4.9]
    t = 0.1
    expected = []
    for x, y in zipped(base, model):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        expected.append(w * y + (1 - w) * x)
    close(ev("nearswap(base, model, 0.1)", base=T(base), model=T(model)), expected)


def ref_fusion(base, model):
    """mergekit's arcee_fusion on a list of rows, written out with math."""
    def softmax(row):
        m = max(row)
        e = [math.exp(v - m) for v in row]
        return [v / sum(e) + 1e-8 for v in e]
    importance = []
    for rb, rm in zipped(base, model):
        p, q = softmax(rm), softmax(rb)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zipped(p, q))
        importance.append([abs(m - b) * kl for m, b in zipped(rm, rb)])
    values = sorted(v for row in importance for v in row)
    n = len(values)
    q1, med, q3 = (values[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    threshold = med + 1.5 * (q3 - q1)
    return [[m if i >= threshold else b for m, b, i in zipped(rm, rb, ri)]
            for rm, rb, ri in zipped(model, base, importance)]


def test_arcee_fusion_keeps_the_important_changes():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    model = base + 0.05 * torch.randn(6, 5, generator=g)
    model[1, 2] += 3.0        # one row changes a lot
    model[4] += 0.8
    out = ev("arcee_fusion(base, model)", base=base, model=model)
    expected = ref_fusion(base.tolist(), model.tolist())
    close(out, expected)
    kept = out == model
    assert 0 < int(kept.sum()) < out.numel()
    assert bool(kept[1, 2])


def test_arcee_fusion_on_a_vector_takes_one_softmax():
    base = T([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    model = T([0.1, 0.25, 0.3, 2.0, 0.5, 0.6, 0.9])
    close(ev("arcee_fusion(base, model)", base=base, model=model),
          ref_fusion([base.tolist()], [model.tolist()])[0])


def test_passthrough_is_the_model():
    a = T([1.0, -2.0, 3.5])
    assert torch.equal(ev("passthrough(a)", a=a), a)
    assert torch.equal(ev("passthrough(a, scale=0.5)", a=a), 0.5 * a)


# --- chunked execution ---------------------------------------------------------------------

CHUNKED = [
    "slerp(a, b, t=0.3)",
    "slerp(a, b, t=gradient([0.2, 0.8]))",
    "nuslerp(a, b, weights=[1.0, 2.0])",
    "base + nuslerp(a - base, b - base, t=0.7, flatten=false)",
    "nuslerp(a, b, t=0.4, flatten=false, row_wise=true)",
    "multislerp(a, b, c, weights=[1.0, 0.5, 2.0])",
    "karcher(a, b, c)",
    "model_stock(base, a, b, c)",
    "model_stock(base, a, b, c, filter_wise=true)",
    "nearswap(base, a, 0.3)",
    "arcee_fusion(base, a)",
    "slerp(arcee_fusion(base, a), karcher(a, b), t=0.6)",   # reductions over reductions
]


def _same_bytes_chunked(tmp_path, expression):
    p = four_models(tmp_path, expression)
    assert max(len(k.chunks) for k in schedule(p, 2_000)) > 1
    whole = same_bytes_in_chunks(p, 2_000)
    p.bound.close()
    return whole


@pytest.mark.parametrize("expression", CHUNKED)
def test_chunked_execution_gives_the_same_bytes(tmp_path, expression):
    whole = _same_bytes_chunked(tmp_path, expression)
    assert all(torch.isfinite(v).all() for v in whole.values())


@pytest.mark.parametrize("expression", [
    "nuslerp(a, b, t=0.4, flatten=false, row_wise=true)",
    "slerp(a, b, t=0.3)",
    "model_stock(base, a, b, c, filter_wise=true)",
])
def test_small_summing_blocks_cut_by_chunks(tmp_path, monkeypatch, expression):
    # blocks of 3 rows, so chunk boundaries cut through the blocks the sums are taken on
    monkeypatch.setattr(gram, "MAX_BLOCK_ROWS", 3)
    _same_bytes_chunked(tmp_path, expression)


def test_direct_calls_match_the_engine():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.equal(geometry.slerp_tensor(a, b, 0.3), ev("slerp(a, b, t=0.3)", a=a, b=b))
    assert torch.equal(geometry.nuslerp_vectors(a, b, 0.3, "columns"),
                       ev("nuslerp(a, b, t=0.3, flatten=false, row_wise=true)", a=a, b=b))
    assert torch.equal(geometry.fusion_mask(a, b) * (a - b) + b, ev("arcee_fusion(b, a)", a=a, b=b))
