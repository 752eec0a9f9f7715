"""`mergelang extract`'s diagnostics point at its own command line (the argument that
made the part of the script they are about), as `mergelang compress`'s do, and its
warnings say what `--keep` can and cannot carry."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    assert_error,
    assert_nothing_written,
    mergelang,
    run,
    write,
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


def adapter_bytes(folder: Path) -> int:
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_line(capsys, script: Path) -> str:
    result = mergelang(capsys, "check", script)
    assert result.code == 0, result.text
    return next(x for x in result.text.splitlines() if "outputs:" in x)


@pytest.mark.parametrize("options, dtype", [("rank=2", None), ("rank=1", "bfloat16")])
def test_check_reports_the_adapter_the_run_writes(capsys, tmp_path, options, dtype):
    pair(tmp_path, {"model.embed_tokens.weight": torch.randn(10, 4),
                    "model.norm.weight": torch.ones(4), "model.scale": torch.ones(3)})
    settings = f'set out_dtype = "{dtype}"\n' if dtype else ""
    script = write(tmp_path, f'{settings}output extract_lora(model("ft") - model("base"), '
                             f'{options})\n')
    line = check_line(capsys, script)
    rank = int(options.split("=")[1])
    assert (f"a LoRA adapter: 2 factorised modules (rank {rank}), 2 tensors kept whole, "
            "2 tensors dropped; about") in line, line
    assert run(capsys, script, tmp_path / "out").code == 0
    written = adapter_bytes(tmp_path / "out")
    size = 2 if dtype else 4
    # closed form: up (6x4) and down (4x6) at rank r, plus embedding and norm (up's bias
    # and the loose model.scale are dropped)
    assert written == (rank * (6 + 4) * 2 + 10 * 4 + 4) * size
    assert line.endswith(f"about {written} B") or line.endswith(f"about {written / 1000:.1f} KB")


def test_check_bounds_the_adapter_of_an_energy_extraction(capsys, tmp_path):
    pair(tmp_path)
    script = write(tmp_path, 'output extract_lora(model("ft") - model("base"), energy=0.5, '
                             'rank=3)\n')
    line = check_line(capsys, script)
    assert "2 factorised modules (rank at most 3, by energy 0.5)" in line, line
    assert "at most" in line.split(";")[-1]
    assert run(capsys, script, tmp_path / "out").code == 0
    bound = 3 * (6 + 4) * 2 * 4
    assert adapter_bytes(tmp_path / "out") <= bound
    assert line.endswith(f"at most {bound} B") or line.endswith(f"at most {bound / 1000:.1f} KB")


def test_kept_tensors_go_through_a_scratch_file_into_the_adapter(tmp_path):
    """The adapter file from held tensors and tensors streamed block by block through a
    KeptFile is what the safetensors library reads back, bit for bit; the scratch file is
    removed."""
    from mergelang.io.adapter import KeptFile, save_tensors
    g = torch.Generator().manual_seed(3)
    held = {"a.lora_A.weight": torch.randn(2, 5, generator=g),
            "b.lora_B.weight": torch.randn(7, 2, generator=g).to(torch.bfloat16)}
    kept = {"embed.weight": torch.randn(9, 5, generator=g).to(torch.bfloat16),
            "norm.weight": torch.randn(5, generator=g), "scalar": torch.tensor(2.5)}
    scratch = KeptFile(tmp_path / "scratch")
    for name, t in kept.items():  # rows in two pieces, the later one first
        if t.dim() == 0:
            scratch.write(name, t.dtype, (), 0, [t])
        else:
            scratch.write(name, t.dtype, tuple(t.shape), 3, t[3:].split(2))
            scratch.write(name, t.dtype, tuple(t.shape), 0, [t[:3]])
    save_tensors(tmp_path / "a.safetensors", held, {"format": "pt"}, scratch)
    scratch.close()
    assert not (tmp_path / "scratch").exists()
    back = load_file(str(tmp_path / "a.safetensors"))
    assert sorted(back) == sorted({**held, **kept})
    for name, t in {**held, **kept}.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_an_extraction_leaves_no_scratch_file_and_keeps_base_plus_delta(capsys, tmp_path):
    g = torch.Generator().manual_seed(4)
    pair(tmp_path, {"model.embed_tokens.weight": torch.randn(10, 4, generator=g),
                    "model.norm.weight": torch.ones(4)})
    result = extract(capsys, tmp_path, "--rank", "1", "--out-dtype", "bfloat16", "--quiet")
    assert result.code == 0, result.text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "extraction.json"]
    adapter = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    fine = load_file(str(tmp_path / "ft" / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(adapter["base_model.model." + name], fine[name].to(torch.bfloat16))


def test_compress_functions_annotated_to_return_a_tuple_return_one():
    """compress/__init__.py's _layout said `tuple[list, dict]` and returned a list."""
    path = Path(__file__).parents[1] / "mergelang" / "compress" / "__init__.py"
    for f in ast.walk(ast.parse(path.read_text())):
        if isinstance(f, ast.FunctionDef) and f.returns is not None:
            says_tuple = ast.unparse(f.returns).startswith("tuple[")
            returns = [r.value for r in ast.walk(f) if isinstance(r, ast.Return) and r.value]
            for value in returns:  # a literal or a variable: a tuple only if written as one
                if isinstance(value, (ast.Tuple, ast.Name, ast.List)):
                    assert says_tuple == isinstance(value, ast.Tuple), \
                        (f.name, ast.unparse(value))
