"""Analysis functions in the language: norm, cosine, sparsity (primitives) and topk_mass,
sign_conflicts (stdlib/analysis.merge): values by hand, the same in row blocks, over the
whole model, and the same figures as `mergelang diff`."""

from __future__ import annotations

import math

import pytest
import torch

import mergelang
from mergelang.compare import compare
from tests.helpers import compile_in, four_models, quantised_state, run_all, write_hf_folder


def value(text: str, **tensors: torch.Tensor) -> float:
    """The number an analysis expression gives (its filled tensor's first entry)."""
    out = mergelang.evaluate(text, **tensors)
    assert torch.all(out == out.reshape(-1)[0])  # a number, as a filled tensor
    return float(out.reshape(-1)[0])


def test_values_by_hand():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert value("norm(x)", x=x) == 5.0
    assert value("norm(x, 1)", x=x) == 7.0
    assert value("norm(x, p=1.5)", x=x) == pytest.approx((3 ** 1.5 + 4 ** 1.5) ** (1 / 1.5))
    assert value("cosine(x, y)", x=x, y=y) == pytest.approx(3 / (5 * math.sqrt(2)))
    assert value("cosine(x, y * 0)", x=x, y=y) == 0.0  # no direction: 0, not NaN
    assert value("sparsity(x)", x=x) == 0.5
    assert value("sparsity(x, 3.5)", x=x) == 0.75
    # trim at 0.5 keeps k = 2 of 4: 3 and -4, all the mass; at 0.25, only -4
    assert value("topk_mass(x, 0.5)", x=x) == 1.0
    assert value("topk_mass(x, 0.25)", x=x) == pytest.approx(4 / 7)
    assert value("topk_mass(x * 0)", x=x) == 0.0
    a = torch.tensor([1.0, -1.0, 0.0, 2.0])
    b = torch.tensor([-1.0, -1.0, 1.0, 0.0])
    assert value("sign_conflicts([a, b], 1.0)", a=a, b=b) == 0.25  # only entry 0
    assert value("sign_conflicts([a, b], 0.25)", a=a, b=b) == 0.0  # 2 and -1 kept: apart
    unit = mergelang.evaluate("x / norm(x)", x=torch.tensor([0.0, 2.0]))
    assert torch.equal(unit, torch.tensor([0.0, 1.0]))  # a number in arithmetic


def test_bad_arguments_are_located_diagnostics():
    with pytest.raises(mergelang.MergeError, match=r"p must be in \[1, 2\]"):
        mergelang.evaluate("norm(x, 3)", x=torch.ones(2))
    with pytest.raises(mergelang.MergeError, match="scope"):
        mergelang.evaluate('cosine(x, x, scope="layer")', x=torch.ones(2))


def test_the_same_numbers_in_row_blocks(tmp_path):
    expression = ("base + (a - base) / norm(a - base) * cosine(a - base, b - base) "
                  "+ sparsity(b - base, 0.3) + topk_mass(c - base, 0.3) "
                  "+ sign_conflicts([a - base, b - base, c - base], 0.4)")
    with four_models(tmp_path, expression) as p:
        whole = run_all(p, budget=10**9)
        blocked = run_all(p, budget=2000)  # a few rows at a time
    for name in whole:
        assert torch.equal(whole[name], blocked[name]), name


def test_scope_model_takes_every_tensor(tmp_path):
    with four_models(tmp_path, 'norm(a - base, scope="model") + 0 * base') as p:
        out = run_all(p, budget=10**9)
    states = [quantised_state(i) for i in (0, 1)]
    want = math.sqrt(sum(float((states[1][n].double() - states[0][n].double()).square().sum())
                         for n in states[0]))
    for name, t in out.items():
        assert torch.allclose(t, torch.full_like(t, want)), name


def test_a_model_wide_number_of_a_trim_is_refused(tmp_path):
    program = compile_in(tmp_path, 'a = model("a")\nbase = model("base")\n'
                         'output base * norm(trim(a - base, 0.5), scope="model")\n',
                         a=quantised_state(1), base=quantised_state(0))
    with pytest.raises(mergelang.MergeError, match="whole-model reduction"):
        program.check()


def test_the_language_and_diff_agree(tmp_path):
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
            "model.norm.weight": torch.randn(8, generator=g)}
    paths = [write_hf_folder(tmp_path / "base", base)]
    for i in range(2):
        moved = {k: v + (torch.randn(v.shape, generator=g) * 4).round() / 8
                 for k, v in base.items()}  # ties in magnitude, and some zeros
        paths.append(write_hf_folder(tmp_path / f"ft{i}", moved))
    figures = compare(paths[0], paths[1:], density=0.3).tensors
    script = tmp_path / "s.merge"
    for expression, figure in (
            ("sign_conflicts([a - base, b - base], 0.3)", lambda s: s.sign_conflicts()),
            ("topk_mass(a - base, 0.3)", lambda s: s.trim_mass(0)),
            ("cosine(a - base, b - base)", lambda s: s.cosine(0, 1)),
            ("norm(b - base) / norm(base)", lambda s: s.relative_norm(1)),
            ("sparsity(a - base)", lambda s: s.zero_fraction(0))):
        script.write_text(f'base = model("base")\na = model("ft0")\nb = model("ft1")\n'
                          f'set out_dtype = "float64"\noutput {expression}\n')
        with mergelang.load(script).plan() as p:
            out = run_all(p, budget=10**9)
        for name, sums in figures.items():
            assert float(out[name].reshape(-1)[0]) == pytest.approx(figure(sums), rel=1e-5), \
                (expression, name)
