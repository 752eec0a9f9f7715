"""Each input kind takes its own files: a LoRA adapter or a compressed delta named with
model(...) is a located error at the call that names it (exit 2, nothing written), not
a "model" whose tensors are the adapter's factors or the delta's stored parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelang import MergeError, evaluate
from tests.helpers import (
    assert_error,
    assert_nothing_written,
    at,
    mergelang,
    run,
    write,
    write_hf_folder,
    write_model,
)


def base_and_fine_tune(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 6, generator=g),
            "model.norm.weight": torch.ones(6)}
    ft = {n: t + 0.25 for n, t in base.items()}
    config = {"architectures": ["LlamaForCausalLM"]}
    write_hf_folder(tmp_path / "base", base, config)
    write_hf_folder(tmp_path / "ft", ft, config)


def test_an_adapter_named_as_a_model_is_refused_at_the_call(tmp_path, capsys):
    base_and_fine_tune(tmp_path)
    made = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                     "--rank", "1", "-o", tmp_path / "adapter")
    assert made.code == 0, made.text
    for named in ("adapter", "adapter/adapter_model.safetensors"):
        script = write(tmp_path, f'output model("{named}")\n')
        result = run(capsys, script, tmp_path / "out")
        assert_error(result, at(script, 1, 14), f'"{named}"', "LoRA adapter",
                     hint="lora(")
        assert_nothing_written(tmp_path / "out")


def test_a_delta_named_as_a_model_is_refused_at_the_call(tmp_path, capsys):
    base_and_fine_tune(tmp_path)
    made = mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                     "--density", "0.5", "-o", tmp_path / "task.delta")
    assert made.code == 0, made.text
    script = write(tmp_path, 'b = model("base")\noutput b + model("task.delta")\n')
    result = run(capsys, script, tmp_path / "out")
    assert_error(result, at(script, 2, 18), '"task.delta"', "compressed task vector",
                 hint="delta(")
    assert_nothing_written(tmp_path / "out")


def test_compress_of_an_adapter_or_against_a_delta_names_the_kind(tmp_path, capsys):
    base_and_fine_tune(tmp_path)
    assert mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                     "--rank", "1", "-o", tmp_path / "adapter").code == 0
    assert mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                     "--density", "0.5", "-o", tmp_path / "task.delta").code == 0
    adapter, delta = str(tmp_path / "adapter"), str(tmp_path / "task.delta")
    for ft, base, points_at, words in (
            (adapter, str(tmp_path / "base"), adapter, "LoRA adapter"),
            (str(tmp_path / "ft"), delta, delta, "compressed task vector")):
        out = tmp_path / "again.delta"
        result = mergelang(capsys, "compress", ft, "--base", base, "--density", "0.5",
                           "-o", out)
        assert_error(result, None, points_at, words)
        assert_nothing_written(out)


@pytest.mark.parametrize("compression", [["--bits", "1"], ["--density", "0.5"]])
def test_a_tensor_with_no_rows_compresses_and_applies_as_empty(tmp_path, capsys, compression):
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 6, generator=g),
            "model.empty.weight": torch.zeros(0, 6)}
    ft = {n: t + 0.5 for n, t in base.items()}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "ft", ft)
    made = mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                     *compression, "-o", tmp_path / "task.delta")
    assert made.code == 0, made.text
    script = write(tmp_path, 'b = model("base")\noutput b + delta("task.delta")\n')
    result = run(capsys, script, tmp_path / "out")
    assert result.code == 0, result.text
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["model.empty.weight"].shape == (0, 6)
    # every entry of the one matrix moved by 0.5: trim keeps half of them exactly;
    # BitDelta's scale is mean |τ| = 0.5 with every sign +, so it is exact too
    moved = out["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]
    expected = 8 * 6 if compression[0] == "--bits" else 8 * 6 // 2
    assert int(torch.isclose(moved, torch.tensor(0.5)).sum()) == expected


def test_a_delta_on_another_model_in_memory_names_it_in_words(tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 6, generator=g),
            "model.norm.weight": torch.ones(6)}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "ft", {n: t + 0.5 for n, t in base.items()})
    made = mergelang(capsys, "compress", tmp_path / "ft", "--base", tmp_path / "base",
                     "--density", "0.5", "-o", tmp_path / "task.delta")
    assert made.code == 0, made.text
    other = dict(base, **{"model.norm.weight": torch.full((6,), 2.0)})
    with pytest.raises(MergeError) as caught:
        evaluate(f'a + delta("{tmp_path / "task.delta"}")', a=other)
    message = caught.value.diagnostics[0].message
    assert "the model given in memory" in message and "None" not in message


def test_diff_against_an_adapter_names_the_kind(tmp_path, capsys):
    base_and_fine_tune(tmp_path)
    assert mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                     "--rank", "1", "-o", tmp_path / "adapter").code == 0
    result = mergelang(capsys, "diff", tmp_path / "base", tmp_path / "adapter")
    assert_error(result, None, None, "is a LoRA adapter, not a model", hint="lora(")
