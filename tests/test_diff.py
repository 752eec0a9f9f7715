"""`mergelang diff`: task-vector figures checked against sums worked out by hand, the same
figures whatever the memory budget, and bad input as diagnostics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mergelang import cli
from mergelang.compare import compare
from mergelang.io.read import SafetensorsModel
from tests.helpers import write_hf_folder

UP = "model.layers.0.mlp.up_proj.weight"
LN = "model.layers.0.input_layernorm.weight"
NORM = "model.norm.weight"


@pytest.fixture
def family(tmp_path):
    """A base and two fine-tunes whose deltas are small integers (see the test below)."""
    base = {UP: torch.ones(2, 2), LN: torch.tensor([2.0, 2.0]), NORM: torch.ones(2)}
    da = {UP: torch.tensor([[1.0, -2.0], [0.0, 3.0]]), LN: torch.tensor([0.5, 0.0])}
    db = {UP: torch.tensor([[-1.0, 2.0], [1.0, 1.0]]), LN: torch.tensor([0.5, -0.5])}

    def plus(delta):
        return {k: v + delta.get(k, torch.zeros_like(v)) for k, v in base.items()}

    return [write_hf_folder(tmp_path / name, state) for name, state in
            (("base", base), ("a", plus(da)), ("b", plus(db)))]


def test_figures_worked_out_by_hand(family):
    c = compare(family[0], family[1:], density=0.5)
    up, ln, norm = (c.tensors[n] for n in (UP, LN, NORM))
    # up_proj: |Δa|² = 1 + 4 + 9 = 14, |Δb|² = 7, |W|² = 4, <Δa, Δb> = -1 - 4 + 0 + 3 = -2
    assert up.relative_norm(0) == pytest.approx(math.sqrt(14) / 2)
    assert up.relative_norm(1) == pytest.approx(math.sqrt(7) / 2)
    assert up.cosine(0, 1) == pytest.approx(-2 / math.sqrt(98))
    # trim at 0.5 keeps k = 2 of 4: Δa -> [[0, -2], [0, 3]]; Δb's ties at 1 go to the first
    # in row-major order -> [[-1, 2], [0, 0]]; only entry (0, 1) has both signs
    assert up.sign_conflicts() == 1 / 4
    assert up.trim_mass(0) == pytest.approx(5 / 6) and up.trim_mass(1) == pytest.approx(3 / 5)
    # the norm: k = 1 of 2; both keep entry 0 (+0.5): no conflict
    assert (ln.conflicts, ln.trim_mass(0), ln.trim_mass(1)) == (0, 1.0, 0.5)
    assert ln.zero_fraction(0) == 0.5
    # the final norm did not move: no direction, so no cosine (NaN), and every entry is zero
    assert norm.relative_norm(0) == 0 and math.isnan(norm.cosine(0, 1))
    assert norm.zero_fraction(1) == 1.0
    # a group's figures come from its summed sums
    layer = c.by_layer()["0"]
    assert layer.numel == 6 and layer.conflicts == 1
    assert layer.relative_norm(0) == pytest.approx(math.sqrt(14.25 / 12))
    assert layer.cosine(0, 1) == pytest.approx(-1.75 / math.sqrt(14.25 * 7.5))
    assert layer.trim_mass(0) == pytest.approx(5.5 / 6.5)
    assert layer.trim_mass(1) == pytest.approx(3.5 / 6)
    assert c.total().relative_norm(1) == pytest.approx(math.sqrt(7.5 / 14))
    assert list(c.by_layer()) == ["0", "after"]
    assert list(c.by_module()) == ["input_layernorm.weight", "mlp.up_proj.weight", NORM]


def test_the_command_prints_tables_and_json(family, capsys):
    assert cli.main(["diff", *map(str, family), "--density", "0.5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"] == [str(family[1]), str(family[2])] and report["density"] == 0.5
    by_layer = {g["layer"]: g for g in report["layers"]}
    assert by_layer["0"]["sign_conflicts"] == pytest.approx(1 / 6)
    assert by_layer["after"]["cosine"][0]["cosine"] is None  # NaN is null in JSON
    assert {t["tensor"] for t in report["tensors"]} == {UP, LN, NORM}
    assert cli.main(["diff", *map(str, family), "--density", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "by layer" in text and "by module type" in text and "cos a·b" in text
    assert "-0.2020" in text  # the whole model's cosine, -1.75 / sqrt(14.25 * 7.5)


def test_the_same_figures_in_row_blocks_of_any_size(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = {UP: torch.randn(64, 8, generator=g), NORM: torch.randn(8, generator=g)}
    models = [write_hf_folder(tmp_path / "base", base)]
    for i in range(3):
        delta = torch.randn(64, 8, generator=g).round(decimals=1)  # ties in magnitude
        models.append(write_hf_folder(tmp_path / f"ft{i}", {**base, UP: base[UP] + delta}))
    whole = compare(models[0], models[1:], density=0.3)
    rows: list[int] = []
    load = SafetensorsModel.load

    def counting(self, name, rows_=None, dtype=None, view=False):
        if name == UP:
            rows.append(64 if rows_ is None else rows_[1] - rows_[0])
        return load(self, name, rows_, dtype, view)

    monkeypatch.setattr(SafetensorsModel, "load", counting)
    blocked = compare(models[0], models[1:], density=0.3, budget=64 * 8 * 4 * 8 // 5)
    assert max(rows) < 64  # row blocks were used
    for name, s in whole.tensors.items():
        b = blocked.tensors[name]
        assert (b.conflicts, b.zeros, b.numel) == (s.conflicts, s.zeros, s.numel)
        assert b.kept_l1 == pytest.approx(s.kept_l1) and b.sq == pytest.approx(s.sq)
        assert b.dots == pytest.approx(s.dots)


def test_tensors_that_cannot_be_compared_are_listed(tmp_path, capsys):
    base = write_hf_folder(tmp_path / "base", {UP: torch.ones(2, 2), NORM: torch.ones(2),
                                               "ids": torch.arange(3)})
    other = write_hf_folder(tmp_path / "other", {UP: torch.ones(2, 3), "extra": torch.ones(1),
                                                 "ids": torch.arange(3)})
    short = write_hf_folder(tmp_path / "short", {UP: torch.ones(2, 2), "ids": torch.arange(3)})
    c = compare(base, [short])
    assert c.skipped == {NORM: f"not in {short}", "ids": "not a floating-point tensor (int64)"}
    assert cli.main(["diff", str(base), str(other)]) == 2
    assert "no tensor can be compared" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--density", "1.5"], "--density must be in [0, 1]"),
    (["--max-memory", "lots"], "invalid size"),
])
def test_bad_options_and_paths_are_diagnostics(family, capsys, args, message):
    assert cli.main(["diff", *map(str, family), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert cli.main(["diff", str(family[0]), str(family[0].parent / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_plot(family, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "diff.png"
    assert cli.main(["diff", *map(str, family), "--plot", str(out), "--quiet"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
