"""End to end: the shipped examples, run by the CLI, give Hugging Face folders that
transformers loads, holding the values the closed-form merge gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelang.cli import main
from tests.helpers import ref_ties

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
transformers = pytest.importorskip("transformers")


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def run_cli(*args: str) -> int:
    return main(["run", *args, "--quiet"])


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.merge")))
def test_every_example_runs_and_loads_in_transformers(tmp_path, example):
    out = tmp_path / "merged"
    assert run_cli(str(EXAMPLES / example), "-o", str(out)) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_quickstart_writes_the_ties_merge(tmp_path):
    out = tmp_path / "merged"
    assert run_cli(str(EXAMPLES / "quickstart.merge"), "-o", str(out)) == 0
    merged = read_folder(out)
    base = read_folder(EXAMPLES / "models" / "base")
    math = read_folder(EXAMPLES / "models" / "math")
    code = read_folder(EXAMPLES / "models" / "code")
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        expected = ref_ties(base[name].float(), [math[name].float(), code[name].float()],
                            [1.0, 0.7], 0.2)
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected.to(torch.bfloat16)), name


def test_output_folder_is_a_complete_hf_model(tmp_path):
    out = tmp_path / "merged"
    script = EXAMPLES / "quickstart.merge"
    assert run_cli(str(script), "-o", str(out), "--shard-size", "150KB",
                   "--out-dtype", "float32") == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata()["mergelang_script"] == script.read_text()
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
    assert config["num_hidden_layers"] == 4
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (EXAMPLES / "models" / "base" / name).read_bytes()
    assert script.read_text().strip() in (out / "README.md").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hi")["input_ids"]


def test_seeded_dare_gives_the_same_bytes_twice(tmp_path):
    script = str(EXAMPLES / "dare_ties.merge")
    assert run_cli(script, "-o", str(tmp_path / "one")) == 0
    assert run_cli(script, "-o", str(tmp_path / "two")) == 0
    assert run_cli(script, "-o", str(tmp_path / "three"), "--seed", "1") == 0
    one = (tmp_path / "one" / "model.safetensors").read_bytes()
    assert one == (tmp_path / "two" / "model.safetensors").read_bytes()
    assert one != (tmp_path / "three" / "model.safetensors").read_bytes()


def test_check_and_graph_load_nothing(tmp_path, capsys):
    script = str(EXAMPLES / "quickstart.merge")
    assert main(["check", script]) == 0
    text = capsys.readouterr().out
    assert "39 tensors" in text and "working set" in text
    assert main(["graph", script, "--tensor", "layers.0.mlp.up_proj"]) == 0
    text = capsys.readouterr().out
    assert "trim(" in text and "elect_sign(" in text and "write %" in text
    assert main(["graph", script, "--tensor", "lm_head", "--format", "dot"]) == 0
    assert "digraph" in capsys.readouterr().out
