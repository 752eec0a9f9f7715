"""`mergelang extract`'s diagnostics point at its own command line (the argument that
made the part of the script they are about), as `mergelang compress`'s do, and its
warnings say what `--keep` can and cannot carry."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    assert_error,
    assert_nothing_written,
    mergelang,
    write_hf_folder,
    write_tokenized_model,
)

COMMAND = "<command line>:1:"


def pair(tmp_path: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """base and ft: two linear modules, one with a bias, and any `extra` tensors."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
            "model.layers.0.mlp.up_proj.bias": torch.randn(6, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=g),
            **(extra or {})}
    ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
          for n, t in base.items()}
    write_hf_folder(tmp_path / "base", base)
    write_hf_folder(tmp_path / "ft", ft)


def extract(capsys, tmp_path: Path, *flags: object, ft: object = None):
    return mergelang(capsys, "extract", ft or tmp_path / "ft", "--base", tmp_path / "base",
                     "-o", tmp_path / "out", *flags)


@pytest.mark.parametrize("flags, points_at, words", [
    (["--rank", "0"], "0", "rank must be a whole number > 0"),
    (["--rank", "5"], "5", "at most 4"),
    (["--energy", "1.5"], "1.5", "energy must be a number in (0, 1]"),
    (["--rank", "1", "--keep", "up", "--keep", "("], "up --keep (", "bad regular expression"),
])
def test_a_bad_option_is_shown_under_its_argument(capsys, tmp_path, flags, points_at, words):
    pair(tmp_path)
    result = extract(capsys, tmp_path, *flags)
    assert_error(result, None, points_at, words)
    assert f"--> {COMMAND}" in result.text and "<script>" not in result.text
    assert_nothing_written(tmp_path / "out")


def test_a_missing_folder_is_shown_under_its_argument(capsys, tmp_path):
    pair(tmp_path)
    result = extract(capsys, tmp_path, "--rank", "1", ft=tmp_path / "nowhere")
    assert_error(result, None, str(tmp_path / "nowhere"), "nowhere")
    assert f"--> {COMMAND}19\n" in result.text
    result = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "gone",
                       "--rank", "1", "-o", tmp_path / "out")
    assert_error(result, None, str(tmp_path / "gone"), "gone")
    assert_nothing_written(tmp_path / "out")


def test_a_vocabulary_mismatch_says_what_the_command_can_do(capsys, tmp_path):
    write_tokenized_model(tmp_path / "base", seed=0)
    write_tokenized_model(tmp_path / "ft", added=("fish", "bird"), seed=1)
    result = extract(capsys, tmp_path, "--rank", "1")
    assert_error(result, None, None, "vocabulary", hint="extract needs a fine-tune and a "
                 "base of the same vocabulary")
    assert f"--> {COMMAND}" in result.text
    helps = [line for line in result.text.splitlines() if "= help:" in line]
    assert all("set vocab" not in h or "extract_lora" in h for h in helps), result.text
    assert_nothing_written(tmp_path / "out")


def test_the_dropped_warning_says_which_tensors_keep_can_carry(capsys, tmp_path):
    """up_proj has a bias, down_proj none: the bias is dropped but --keep up_proj carries
    it; a loose parameter and an integer buffer no adapter carries."""
    pair(tmp_path, {"model.scale": torch.ones(3),
                    "model.layers.0.steps": torch.arange(4)})
    result = extract(capsys, tmp_path, "--rank", "1", "--quiet")
    assert result.code == 0, result.text
    report = json.loads((tmp_path / "out" / "extraction.json").read_text())
    assert report["keepable"] == ["model.layers.0.mlp.up_proj.bias"]
    warning = " ".join(result.text.split())
    assert "1 are biases of factorised modules (model.layers.0.mlp.up_proj.bias)" in warning
    assert "--keep up_proj" in warning
    assert "2 cannot be carried by an adapter" in warning
    assert "model.scale" in warning and "model.layers.0.steps" in warning
    assert "--keep cannot carry them" in warning
    # the hint's --keep does carry the bias
    result = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                       "-o", tmp_path / "kept", "--rank", "1", "--keep", "up_proj", "--quiet")
    assert result.code == 0, result.text
    report = json.loads((tmp_path / "kept" / "extraction.json").read_text())
    assert "model.layers.0.mlp.up_proj.bias" in report["kept"]
    assert report["keepable"] == []


def test_the_adapter_writer_uses_no_private_name_of_another_module():
    """io/adapter.py reaches hf.py, write.py and the Program through their public names."""
    source = (Path(__file__).parents[1] / "mergelang" / "io" / "adapter.py").read_text()
    tree = ast.parse(source)
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                for a in n.names]
    assert not [n for n in imported if n.startswith("_")]
    foreign = [n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
               and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id == "self")]
    assert not foreign
