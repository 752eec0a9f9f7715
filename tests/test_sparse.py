"""Sparse values (mergelang.sparse): every operation on them gives the dense computation's
values, entry for entry, whatever the supports, fills and special values; the executor
makes them where a rule keeps a few entries, keeps them sparse through the operations that
can, hands them back only when asked (`Expression.sparse`), and gives the same results
whole and in row blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelang
from mergelang.execute import Collector, execute
from mergelang.ops import BINARY, PRIMITIVES
from mergelang.sparse import Sparse, Support, densify, entrywise, union

SPECIAL = [0.0, -0.0, 1.0, -2.5, math.inf, -math.inf, math.nan, 1e-30]


def sparse_of(dense: torch.Tensor, at: torch.Tensor, fill: float) -> Sparse:
    """`dense` at the sorted flat positions `at`, `fill` elsewhere."""
    return Sparse(at, dense.reshape(-1)[at].clone(), dense.shape, fill)


def as_dense(x):
    return x.dense() if isinstance(x, Sparse) else x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal entries, NaN where NaN (and the same sign of zero)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.all(
        (a == b) & (torch.signbit(a) == torch.signbit(b)) | (a.isnan() & b.isnan())))


@st.composite
def sparse_tensors(draw, n: int = 24):
    values = draw(st.lists(st.one_of(st.sampled_from(SPECIAL),
                                     st.floats(-10, 10, width=32)), min_size=n, max_size=n))
    chosen = sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)))
    fill = draw(st.sampled_from([0.0, 0.0, 1.0, -1.0, math.inf]))
    dense = torch.tensor(values, dtype=torch.float32).reshape(4, 6)
    at = torch.tensor(chosen, dtype=torch.int64)
    x = sparse_of(dense, at, fill)
    return x, x.dense()


@settings(max_examples=150, deadline=None)
@given(sparse_tensors(), sparse_tensors(), st.sampled_from(["+", "-", "*", "/"]),
       st.floats(-4, 4, width=32))
def test_arithmetic_on_sparse_values_is_the_dense_arithmetic(a, b, op, number):
    (sa, da), (sb, db) = a, b
    fn = BINARY[op]
    assert same(as_dense(entrywise(fn, [sa, sb])), fn(da, db))
    assert same(as_dense(entrywise(fn, [sa, number])), fn(da, number))
    assert same(as_dense(entrywise(fn, [number, sb])), fn(number, db))
    assert same(as_dense(entrywise(fn, [sa, db])), fn(da, db))  # beside a dense one: dense


@settings(max_examples=100, deadline=None)
@given(sparse_tensors(), sparse_tensors(), sparse_tensors())
def test_entrywise_primitives_on_sparse_values_are_the_dense_ones(a, b, c):
    (sa, da), (sb, db), (sc, dc) = a, b, c
    for name in ("sign", "abs", "nonzero"):
        fn = PRIMITIVES[name].fn
        assert same(entrywise(fn, [sa]).dense(), fn(da)), name
    for method in ("sum", "count"):
        elect = PRIMITIVES["elect_sign"].fn
        assert same(entrywise(elect, [[sa, sb, sc], method]).dense(), elect([da, db, dc], method))
    agrees = PRIMITIVES["agrees_with"].fn
    assert same(entrywise(agrees, [sa, sb]).dense(), agrees(da, db))
    clamp = PRIMITIVES["clamp_abs"].fn
    assert same(entrywise(clamp, [sa, 1.5]).dense(), clamp(da, 1.5))


def test_every_entrywise_primitive_is_one_entry_in_one_entry_out():
    """The flag lets the executor run a primitive at a Sparse value's positions only: it
    must hold for each flagged primitive (entry i of the result from entry i alone)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g)
    y = torch.randn(50, generator=g)
    flagged = [p for p in PRIMITIVES.values() if p.entrywise]
    assert {p.name for p in flagged} >= {"sign", "abs", "elect_sign", "agrees_with",
                                         "clamp_abs"}
    made = {"tensors": [x, y], "number": 0.5}
    for prim in flagged:
        tensors = iter([x, y])
        args = [next(tensors) if p.kind == "tensor" else made.get(p.kind, p.default)
                for p in prim.params]
        whole = prim.fn(*args)
        perm = torch.randperm(50, generator=g)
        shuffled = [[v[perm] for v in a] if isinstance(a, list) else
                    a[perm] if isinstance(a, torch.Tensor) else a for a in args]
        assert torch.equal(prim.fn(*shuffled), whole[perm]), prim.name


def test_a_union_is_found_once_and_reused_by_what_follows():
    a = Support(torch.tensor([1, 4, 9]))
    b = Support(torch.tensor([0, 4, 7]))
    u, positions = union([a, b])
    assert u.index.tolist() == [0, 1, 4, 7, 9]
    assert [p.tolist() for p in positions] == [[1, 2, 4], [0, 2, 3]]
    again, where = union([a, u])  # a is known to lie within u: no search
    assert again is u and where[0].tolist() == [1, 2, 4] and where[1] is None
    assert union([u, u])[0] is u


def test_rows_gather_and_conversion():
    dense = torch.zeros(5, 4)
    dense[1, 2], dense[3, 0], dense[4, 3] = 1.0, -2.0, 3.0
    x = sparse_of(dense, torch.tensor([6, 12, 19]), 0.0)
    assert torch.equal(x.dense(), dense)
    assert torch.equal(x.rows(1, 4).dense(), dense[1:4])
    assert torch.equal(x.rows(2, 3).dense(), dense[2:3])
    assert torch.equal(x.at(torch.tensor([0, 6, 12, 13])), torch.tensor([0.0, 1.0, -2.0, 0.0]))
    half = x.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half.dense(), dense.bfloat16())
    assert x.nonzero_count() == 3 and x.square_sum() == 14.0
    assert densify([x, 2.0])[0].shape == (5, 4)


# --- in the executor ------------------------------------------------------------------


def online_inputs():
    g = torch.Generator().manual_seed(3)
    update = {"w": torch.randn(60, 50, generator=g), "b": torch.randn(50, generator=g)}
    tau = {"w": torch.randn(60, 50, generator=g), "b": torch.randn(50, generator=g)}
    return update, tau


def sparse_state(state: dict[str, torch.Tensor]) -> dict[str, Sparse]:
    out = {}
    for name, t in state.items():
        at = t.reshape(-1).nonzero().squeeze(1)
        out[name] = Sparse(at, t.reshape(-1)[at], t.shape)
    return out


@pytest.mark.parametrize("rule, prepare", [
    ("ondare(update, ref, keep=0.1, alpha=0.3)", "ondare_ref(tau, keep=0.1)"),
    ("onties(update, ref, keep=0.1, alpha=0.3)", "onties_ref(tau, keep=0.1)"),
    ('onties(update, ref, keep=0.1, alpha=0.3, elect="weighted")', "onties_ref(tau, keep=0.1)"),
    ("ondare(update, ref, keep=0.1, alpha=0.3, clip=0.5, rescale=\"l1\")",
     "ondare_ref(tau, keep=0.1, clip=0.5)"),
])
def test_the_online_rules_are_computed_sparse_with_the_dense_values(rule, prepare):
    update, tau = online_inputs()
    ref = mergelang.evaluate(prepare, tau=tau, seed=1)
    expr = mergelang.expression(rule)
    dense = expr(update=update, ref=ref, seed=2)  # a dense ref: the rule is dense after it
    sparse = expr.sparse(update=update, ref=sparse_state(ref), seed=2)
    for name in update:
        assert torch.equal(as_dense(sparse[name]), dense[name]), name
    if "l1" not in rule:  # match_norm has no sparse form: dense from there on
        assert all(isinstance(v, Sparse) for v in sparse.values())
        assert len(sparse["w"].support) < 0.25 * update["w"].numel()
    plain = expr(update=update, ref=sparse_state(ref), seed=2)  # a call: dense results
    assert all(isinstance(v, torch.Tensor) and torch.equal(v, dense[k]) for k, v in plain.items())


def test_sparse_values_in_row_blocks_give_the_same_results():
    """A tensor computed in row blocks: the Sparse input is cut into rows, the kept
    positions are drawn per block as for the whole, and the blocks' results join."""
    update, tau = online_inputs()
    ref = sparse_state(mergelang.evaluate("ondare_ref(tau, keep=0.2)", tau=tau, seed=1))
    expr = mergelang.expression("ondare(update, ref, keep=0.2, alpha=0.3)")
    expected = expr(update=update, ref=ref, seed=5)
    plan, _ = expr._plan({"update": update, "ref": ref}, {}, 5, "float32")
    for budget, sparse in ((1, True), (1, False), (10**9, True)):
        results = Collector(plan.tensors)
        with plan:
            execute(plan, results.sink, budget=budget, sparse_results=sparse)
        for name in update:
            assert torch.equal(as_dense(results.tensors[name]), expected[name]), (budget, name)
    rows = mergelang.expression("keep_random(update, 0.2)")
    plan, _ = rows._plan({"update": update}, {}, 5, "float32")
    results = Collector(plan.tensors)
    with plan:
        execute(plan, results.sink, budget=1, sparse_results=True)  # one row per block
    assert torch.equal(as_dense(results.tensors["w"]), rows(update=update, seed=5)["w"])


@pytest.mark.parametrize("keep, rescale", [(0.01, "density"), (0.3, "none"), (0.0, "density"),
                                           (1.0, "density")])
def test_the_sparse_forms_give_the_dense_forms_values(keep, rescale):
    from mergelang.reduce import Chunk, RandomStream
    x = torch.randn(300, 1000, generator=torch.Generator().manual_seed(4))
    prim = PRIMITIVES["keep_random"]
    chunk = Chunk.whole(x, RandomStream(7, "w", "site"))
    assert torch.equal(as_dense(prim.sparse(x, keep, rescale, chunk=chunk)),
                       prim.fn(x, keep, rescale, chunk=chunk))
    top = PRIMITIVES["top_fraction"]
    x[3, :40] = 4.0  # ties at the cut-off
    for small in ("one", "all"):
        assert same(as_dense(top.sparse(x.abs(), keep, small)), top.fn(x.abs(), keep, small))


def test_a_sparse_form_must_take_the_primitives_parameters():
    import dataclasses

    def wrong(x, keep, *, chunk):
        return x
    with pytest.raises(TypeError, match="sparse form's parameters"):
        dataclasses.replace(PRIMITIVES["keep_random"], sparse=wrong)


# --- Difference: an update computed where it is read ------------------------------------


def test_a_difference_is_computed_at_the_kept_entries_or_whole_in_place():
    from mergelang.sparse import Difference, gather
    g = torch.Generator().manual_seed(0)
    after, before = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    expected = after - before
    held = after.clone()
    at = torch.tensor([0, 7, 199])
    diff = Difference(held, before, in_place=True)
    assert torch.equal(gather(diff, at), expected.view(-1)[at])
    assert not diff.computed and torch.equal(held, after)  # nothing written yet
    rows = diff.rows(3, 9)
    assert torch.equal(rows.dense(), expected[3:9]) and torch.equal(held, after)  # apart
    assert diff.dense() is held and torch.equal(held, expected)  # whole: in a's memory
    assert torch.equal(gather(diff, at), expected.view(-1)[at])  # read from there after
    assert torch.equal(diff.rows(3, 9).dense(), expected[3:9])
    widened = Difference(after.bfloat16(), before.bfloat16()).to(torch.float32)
    assert torch.equal(widened.dense(), (after.bfloat16() - before.bfloat16()).float())


def test_views_of_a_difference_never_subtract_twice():
    """A dtype view (the executor widening a bfloat16 update) or a row block computed
    whole in place: the others read that result, not a - b taken again from a's memory."""
    from mergelang.sparse import Difference, gather
    g = torch.Generator().manual_seed(1)
    after = torch.randn(30, 4, generator=g).bfloat16()
    before = torch.randn(30, 4, generator=g).bfloat16()
    expected = after - before
    diff = Difference(after.clone(), before, in_place=True)
    block = diff.rows(2, 5)
    assert torch.equal(block.dense(), expected[2:5])  # apart: a untouched
    wide = diff.to(torch.float32)
    assert torch.equal(wide.dense(), expected.float()) and diff.computed  # whole, in place
    assert torch.equal(diff.dense(), expected)  # the original reads it, once
    assert torch.equal(diff.rows(2, 5).dense(), expected[2:5])
    assert torch.equal(gather(diff.to(torch.float32), torch.tensor([0, 9, 119])),
                       expected.view(-1)[[0, 9, 119]].float())


@pytest.mark.parametrize("rule", [
    "keep_random(update, 0.3) + update * 2",   # read sparsely, then whole (never written)
    "top_fraction(update * 1, 0.1) - update",  # whole first, in a selection's two sweeps
    "update",
])
@pytest.mark.parametrize("budget", [1, 10**9])
def test_rules_on_a_difference_give_the_dense_update_s_results(rule, budget):
    from mergelang.sparse import Difference
    g = torch.Generator().manual_seed(1)
    after = {"w": torch.randn(30, 20, generator=g), "b": torch.randn(20, generator=g)}
    before = {k: torch.randn(v.shape, generator=g) for k, v in after.items()}
    expr = mergelang.expression(rule)
    expected = expr(update={k: after[k] - before[k] for k in after}, seed=4)
    update = {k: Difference(after[k].clone(), before[k], in_place=True) for k in after}
    plan, _ = expr._plan({"update": update}, {}, 4, "float32")
    results = Collector(plan.tensors)
    with plan:
        execute(plan, results.sink, budget=budget, sparse_results=True)
    for name in after:
        assert torch.equal(as_dense(results.tensors[name]), expected[name]), name


def test_top_fraction_s_sparse_form_spreads_non_finite_entries_as_the_dense_one():
    x = torch.randn(20, 10, generator=torch.Generator().manual_seed(2))
    x[4, 4], x[7, 1] = math.nan, -math.inf  # the NaN is dropped (|NaN| compares false)
    expr = mergelang.expression("top_fraction(x, 0.1)")
    dense = PRIMITIVES["top_fraction"].fn(x, 0.1)
    assert same(as_dense(expr.sparse(x=x)), dense) and dense.isnan().any()
    finite = torch.randn(20, 10)
    kept = expr.sparse(x=finite)
    assert isinstance(kept, Sparse) and len(kept.support) == 20
    assert torch.equal(kept.dense(), PRIMITIVES["top_fraction"].fn(finite, 0.1))


def test_ondare_reads_the_update_at_its_kept_entries_only():
    """OnlineMerging's OnDARE rule: the update (a Difference) is gathered where the mask
    keeps entries, never computed whole, and the result is Sparse with the dense bits."""
    from mergelang.sparse import Difference
    update, tau = online_inputs()
    before = {k: torch.randn(v.shape) for k, v in update.items()}
    after = {k: before[k] + update[k] for k in update}
    ref = mergelang.evaluate("ondare_ref(tau, keep=0.1)", tau=tau, seed=1)
    rule = mergelang.expression("ondare(update, ref, keep=0.1, alpha=0.3)")
    lazy = {k: Difference(after[k].clone(), before[k], in_place=True) for k in update}
    merged = rule.sparse(update=lazy, ref=sparse_state(ref), seed=2)
    assert not any(d.computed for d in lazy.values())
    expected = rule(update={k: after[k] - before[k] for k in update}, ref=ref, seed=2)
    for name in update:
        assert isinstance(merged[name], Sparse)
        assert torch.equal(merged[name].dense(), expected[name]), name


@st.composite
def rules(draw, depth: int = 3):
    """A random expression of x (dense) and s and r (given Sparse), with numbers, through
    the operations that have sparse paths: arithmetic, entrywise primitives, keep_random
    and top_fraction."""
    if depth == 0:
        return draw(st.sampled_from(["x", "s", "r", "s", "r"]))
    a, b = draw(rules(depth=depth - 1)), draw(rules(depth=depth - 1))
    return draw(st.sampled_from([
        f"({a} + {b})", f"({a} - {b})", f"({a} * {b})", f"({a} / {b})", f"-{a}",
        f"({a} * 0.5)", f"(2 - {a})", f"({a} / (r - r))", f"(0 * {a})",
        f"sign({a})", f"abs({a})", f"clamp_abs({a}, 0.7)", f"elect_sign([{a}, {b}])",
        f"agrees_with({a}, sign({b}))", f"keep_random({a}, 0.3)", f"top_fraction({a}, 0.2)",
    ]))


@settings(max_examples=200, deadline=None)
@given(rules(), st.integers(0, 3))
def test_any_rule_on_sparse_inputs_gives_the_dense_rule_s_values(text, seed):
    """s and r given as Sparse values against the same tensors given dense: every
    operation on Sparse values, their fills (0/0, 0 * inf) and signs of zero included.
    (keep_random and top_fraction use their sparse forms either way; their dense forms
    are compared above.)"""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 10, generator=g)
    dense = {}
    for name in ("s", "r"):
        values = torch.randn(12, 10, generator=g)
        values[torch.rand(12, 10, generator=g) < 0.8] = 0.0
        dense[name] = values
    expr = mergelang.expression(text)
    inputs = {k: v for k, v in {"x": x, **dense}.items() if k in expr.names}
    expected = expr(seed=seed, **inputs)
    given_sparse = {k: sparse_state({k: v})[k] if k != "x" else v for k, v in inputs.items()}
    got = expr.sparse(seed=seed, **given_sparse)
    assert same(as_dense(got), expected), text


def test_row_blocks_some_sparse_some_dense_join_into_the_dense_result():
    """top_fraction in row blocks, one of which holds a NaN (computed densely there): the
    Collector takes the Sparse blocks and the dense one into one tensor."""
    x = torch.randn(40, 30, generator=torch.Generator().manual_seed(6))
    x[17, 3] = math.nan
    expr = mergelang.expression("top_fraction(x, 0.1)")
    expected = PRIMITIVES["top_fraction"].fn(x, 0.1)
    plan, _ = expr._plan({"x": {"x": x}}, {}, 0, "float32")
    results = Collector(plan.tensors)
    with plan:
        execute(plan, results.sink, budget=1, sparse_results=True)  # one row per block
    got = results.tensors["x"]
    assert isinstance(got, torch.Tensor) and same(got.abs(), expected.abs())
