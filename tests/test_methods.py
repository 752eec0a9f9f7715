"""The standard library against closed-form references computed independently here.

The references follow the papers' and mergekit 0.1.5's definitions literally (a stable
argsort for the top-k, stacked tensors, explicit masks), not our primitives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mergelang
from mergelang.ops import PRIMITIVES, REQUIRED, Param, Primitive, declaration_errors, primitive
from mergelang.ops.sparsify import drop, trim
from mergelang.reduce import Chunk, RandomStream
from tests.helpers import ref_consensus, ref_ties, ref_trim


def family(shape=(8, 16), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * 0.1 for _ in range(n)]
    return base, models


def test_ties_matches_mergekit_on_a_hand_computed_case():
    # mergekit 0.1.5 gives [1.3333, -1, 0, 2, 0] for these inputs (weights 1 and 0.5,
    # density 1): the sign is elected on the weighted deltas, zeros never agree, and the
    # divisor is the summed weight of the agreeing entries (1.5 for the first entry).
    base = torch.zeros(5)
    a = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0])
    b = torch.tensor([2.0, 1.0, 0.0, -3.0, 0.0])
    out = mergelang.evaluate("base + ties(a - base, b - base, weights=[1, 0.5], density=1)",
                             base=base, a=a, b=b)
    torch.testing.assert_close(out, torch.tensor([4 / 3, -1.0, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference(density, normalize):
    base, (a, b, c) = family()
    weights = [1.0, 0.7, -0.3]
    out = mergelang.evaluate(
        f"base + ties(a - base, b - base, c - base, weights=[1.0, 0.7, -0.3], "
        f"density={density}, normalize={str(normalize).lower()}, lambda=1.5)",
        base=base, a=a, b=b, c=c)
    torch.testing.assert_close(out, ref_ties(base, [a, b, c], weights, density, normalize, 1.5))


def test_ties_sign_conflicts_and_count_election():
    base = torch.zeros(4)
    a = torch.tensor([3.0, -1.0, 2.0, 0.5])
    b = torch.tensor([-1.0, -1.0, -2.0, 0.5])
    c = torch.tensor([-1.0, 2.0, -2.0, -4.0])
    # by mass: [+1, -1... ] entry 0: 3-1-1=1 -> +; entry 1: 0 -> + (tie elects +);
    # entry 2: -2 -> -; entry 3: -3 -> -
    out = mergelang.evaluate("ties(a, b, c, density=1)", a=a, b=b, c=c)
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, -2.0, -4.0]))
    # by count: entry 0: one +, two - -> -; entry 1: two -, one + -> -
    out = mergelang.evaluate('ties(a, b, c, density=1, method="count")', a=a, b=b, c=c)
    torch.testing.assert_close(out, torch.tensor([-1.0, -1.0, -2.0, 0.5]))
    del base


def test_trim_ties_in_magnitude_keep_the_earlier_entries():
    x = torch.tensor([[1.0, -3.0, 3.0], [-3.0, 2.0, 3.0]])
    # k = 3 of four entries with |x| = 3: the first three in row-major order are kept
    torch.testing.assert_close(trim(x, 0.5), torch.tensor([[0.0, -3.0, 3.0], [-3.0, 0.0, 0.0]]))
    for density in (0.0, 0.01, 0.3, 0.99, 1.0):
        g = torch.Generator().manual_seed(1)
        y = torch.randint(-3, 4, (7, 9), generator=g).float()  # many ties
        torch.testing.assert_close(trim(y, density), ref_trim(y, density))


def test_trim_density_floor_matches_mergekit():
    x = torch.arange(1.0, 1001.0)
    assert int((trim(x, 0.0001) != 0).sum()) == 1  # k = max(1, int(0.1))
    assert int((trim(x, 0.0) != 0).sum()) == 0


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_reference(normalize):
    base, (a, b, c) = family()
    out = mergelang.evaluate(
        f"base + task_arithmetic(a - base, b - base, c - base, weights=[0.5, 1.0, -0.25], "
        f"lambda=0.8, normalize={str(normalize).lower()})", base=base, a=a, b=b, c=c)
    total = 0.5 * (a - base) + 1.0 * (b - base) - 0.25 * (c - base)
    if normalize:
        total = total / 1.25
    torch.testing.assert_close(out, base + 0.8 * total)


def test_task_arithmetic_negation():
    base, (a, _, _) = family()
    out = mergelang.evaluate("base - 0.5 * (a - base)", base=base, a=a)
    torch.testing.assert_close(out, base - 0.5 * (a - base))


def test_linear_matches_reference():
    _, (a, b, c) = family()
    out = mergelang.evaluate("linear(a, b, c, weights=[1, 2, 5])", a=a, b=b, c=c)
    torch.testing.assert_close(out, (a + 2 * b + 5 * c) / 8)
    out = mergelang.evaluate("linear(a, b, weights=[0.3, 0.3], normalize=false)", a=a, b=b)
    torch.testing.assert_close(out, 0.3 * a + 0.3 * b)
    out = mergelang.evaluate("linear(a, b)", a=a, b=b)
    torch.testing.assert_close(out, (a + b) / 2)


def test_drop_keeps_the_expected_fraction_and_preserves_the_mean():
    x = torch.full((400, 500), 2.0)
    out = drop(x, 0.3, chunk=Chunk.whole(x, RandomStream(0, "t", "site")))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 2.0 / 0.3))
    assert abs(out.mean().item() - 2.0) < 0.02  # 1/density rescale keeps the expectation


def test_random_pages_are_the_same_drawn_on_any_number_of_threads_or_after_a_fork():
    import os
    stream = RandomStream(5, "t", "site")
    numel = (7 << 18) + 1000  # seven whole pages and a short one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = stream.uniform(0, numel, numel)
        middle = stream.uniform(300_000, 1_200_000, numel)  # cuts pages at both ends
        torch.set_num_threads(2)
        assert torch.equal(stream.uniform(0, numel, numel), one)
        assert torch.equal(stream.uniform(300_000, 1_200_000, numel), middle)
        assert torch.equal(middle, one[300_000:1_500_000])
        if hasattr(os, "fork"):  # a child has none of the parent's drawing threads
            expected = one.numpy()
            pid = os.fork()
            if pid == 0:  # numpy only here: torch's OpenMP threads do not survive a fork
                drawn = stream.uniform(0, numel, numel).numpy()
                os._exit(0 if np.array_equal(drawn, expected) else 3)
            assert _exit_code(pid, within=60) == 0
    finally:
        torch.set_num_threads(threads)


def _exit_code(pid: int, within: float) -> int | None:
    """The child's exit code; None (and the child killed) if it has not ended in time:
    a child that waits for threads it does not have would hang the tests otherwise."""
    import os
    import signal
    import time
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_drop_l1_rescale_matches_the_input_norm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 300, generator=g)
    out = drop(x, 0.25, "l1", chunk=Chunk.whole(x, RandomStream(0, "t", "s")))
    torch.testing.assert_close(out.abs().sum(), x.abs().sum())
    kept = out != 0
    ratio = out[kept] / x[kept]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))
    plain = drop(x, 0.25, "none", chunk=Chunk.whole(x, RandomStream(0, "t", "s")))
    torch.testing.assert_close(plain[kept], x[kept])


def test_dare_linear_is_the_weighted_sum_of_rescaled_drops():
    base, (a, b, _) = family((64, 64))
    out = mergelang.evaluate("dare_linear(a - base, b - base, weights=[1, 0.5], density=0.4)",
                             base=base, a=a, b=b)
    da, db = a - base, b - base
    # every entry is one of: 0, da/0.4, 0.5*db/0.4, or their sum
    ka, kb = da / 0.4, 0.5 * db / 0.4
    options = torch.stack([torch.zeros_like(da), ka, kb, ka + kb])
    close = (options - out).abs().min(0).values
    assert float(close.max()) < 1e-5
    only_a = (out - da / 0.4).abs() < 1e-6
    assert 0.15 < only_a.float().mean().item() < 0.33  # P(a kept, b dropped) = 0.4 * 0.6


def test_dare_ties_without_a_drop_is_the_unnormalized_ties_consensus():
    base, (a, b, c) = family((32, 32))
    out = mergelang.evaluate("dare_ties(a - base, b - base, c - base, weights=[1, 0.5, 2], "
                             "density=1)", base=base, a=a, b=b, c=c)
    deltas = torch.stack([a - base, b - base, c - base])
    w = torch.tensor([1, 0.5, 2]).view(-1, 1, 1)
    torch.testing.assert_close(out, ref_consensus(deltas * w, w, normalize=False))


def test_dare_ties_keeps_only_agreeing_rescaled_entries():
    base = torch.zeros(200, 200)
    a = torch.full((200, 200), 1.0)
    b = torch.full((200, 200), -3.0)
    out = mergelang.evaluate("dare_ties(a, b, density=0.5)", a=a, b=b)
    # per entry: both kept -> sum is -4/0.5 < 0, b wins: -6; only a kept: 2; only b: -6
    values = set(out.unique().tolist())
    assert values <= {0.0, 2.0, -6.0}
    assert abs((out == 2.0).float().mean().item() - 0.25) < 0.02
    assert abs((out == -6.0).float().mean().item() - 0.5) < 0.02
    del base


def test_dare_is_reproducible_and_seeded():
    base, (a, b, _) = family((32, 32))
    expr = "dare_ties(a - base, b - base, density=0.5)"
    first = mergelang.evaluate(expr, base=base, a=a, b=b, seed=7)
    assert torch.equal(first, mergelang.evaluate(expr, base=base, a=a, b=b, seed=7))
    assert not torch.equal(first, mergelang.evaluate(expr, base=base, a=a, b=b, seed=8))


def test_ties_paper_scope_trims_over_the_whole_model():
    g = torch.Generator().manual_seed(4)
    base = {"a.w": torch.zeros(6, 5), "b.w": torch.zeros(40)}
    ft = {"a.w": torch.randn(6, 5, generator=g) * 5, "b.w": torch.randn(40, generator=g)}
    out = mergelang.evaluate('ties(m - base, density=0.25, scope="model")', base=base, m=ft)
    flat = torch.cat([ft["a.w"].reshape(-1), ft["b.w"]])
    k = int(0.25 * flat.numel())
    threshold = flat.abs().sort(descending=True).values[k - 1]
    for name in ft:  # one delta, so the consensus keeps every trimmed entry as it is
        expected = ft[name] * (ft[name].abs() >= threshold)
        torch.testing.assert_close(out[name], expected)
    # most of the top quarter lies in the larger-valued tensor
    assert (out["a.w"] != 0).sum() > 0.25 * 30


# --- the registry: each primitive's parameters declared once ----------------------------


def declared_values(prim: Primitive) -> tuple:
    """A value for each number and string parameter, in declaration order, as the back end
    passes them to make_reduction."""
    values = []
    for p in prim.params:
        if p.kind in ("tensor", "tensors"):
            continue
        if p.default is not REQUIRED:
            values.append(p.default)
        elif p.kind == "string":
            values.append(p.choices[0])
        else:
            values.append(min(max(0.5, p.range[0]), p.range[1]) if p.range else 0.5)
    return tuple(values)


def test_every_primitive_declares_its_parameters_once():
    assert len(PRIMITIVES) >= 30  # the whole registry, not an empty one
    for name, prim in PRIMITIVES.items():
        assert declaration_errors(prim) == [], name
        assert prim.statics == tuple(p.name for p in prim.params
                                     if p.kind not in ("tensor", "tensors")), name
        if prim.reduction is not None:  # the factory takes what the back end passes
            prim.make_reduction(100, declared_values(prim))


def test_a_primitive_whose_declarations_disagree_cannot_be_made():
    def fn(x, d=0.5, *, chunk=None):
        return x

    def make(fn, *params, **options):
        return Primitive("mismatched", params, fn, "", **options)

    x, d = Param("x", "tensor"), Param("d", "number", 0.5)
    refused = [
        ("defaults to 0.5 in the function but to 0.25", lambda: make(
            fn, x, Param("d", "number", 0.25), reduction=lambda numel: None)),
        ("are not the declared", lambda: make(fn, Param("y", "tensor"), d, random=True)),
        ("are not the declared", lambda: make(fn, x, d, Param("e", "number", 1.0),
                                              random=True)),
        ("takes exactly `chunk`", lambda: make(lambda x, d=0.5: x, x, d, random=True)),
        ("it takes none", lambda: make(fn, x, d)),
        ("not a declared number or string", lambda: make(
            fn, x, d, reduction=lambda numel, x: None)),
        ("has a default", lambda: make(fn, x, d, reduction=lambda numel, d=0.5: None)),
        ("first parameter is not `numel`", lambda: make(fn, x, d, reduction=lambda d: None)),
    ]
    for message, build in refused:
        with pytest.raises(TypeError, match=message):
            build()
    with pytest.raises(TypeError, match="mismatched_registration"):
        @primitive("mismatched_registration", x, Param("d", "number", 0.25))
        def registered(x, d=0.5):
            return x
    assert "mismatched_registration" not in PRIMITIVES


def test_a_reduction_factory_gets_the_arguments_it_names():
    seen = []

    def fn(x, d, mode="a", e=1.0, *, chunk=None):
        return x

    prim = Primitive("named", (Param("x", "tensor"), Param("d", "number"),
                               Param("mode", "string", "a", choices=("a", "b")),
                               Param("e", "number", 1.0)),
                     fn, "", reduction=lambda numel, e, mode: seen.append((numel, e, mode)))
    prim.make_reduction(7, (0.3, "b", 2.0))
    assert seen == [(7, 2.0, "b")]
    with pytest.raises(ValueError):
        prim.make_reduction(7, (0.3, "b"))  # the back end passes every declared value

