"""`mergelang inspect`: a model's structure, counted by hand on small models, from the
headers alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelang import cli
from mergelang.io.read import SafetensorsModel
from mergelang.structure import inspect_model, module_of, place_of
from tests.helpers import small_tensors, write_hf_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"


def test_counts_by_module_type_and_layer(tmp_path):
    folder = write_hf_folder(tmp_path / "m", small_tensors(layers=2, width=4),
                             {"tie_word_embeddings": True, "hidden_size": 4})
    s = inspect_model(folder)
    # embed [8, 4] = 32; per layer up_proj [4, 4] = 16 and a norm [4]; the final norm [4]
    assert (len(s.tensors), s.parameters, s.num_layers) == (6, 76, 2)
    assert {k: (g.tensors, g.parameters) for k, g in s.modules.items()} == {
        "model.embed_tokens.weight": (1, 32), "mlp.up_proj.weight": (2, 32),
        "input_layernorm.weight": (2, 8), "model.norm.weight": (1, 4)}
    assert {k: g.parameters for k, g in s.layers.items()} == {
        "before": 32, "0": 20, "1": 20, "after": 4}
    assert list(s.layers) == ["before", "0", "1", "after"]
    assert s.dtypes == {"float32": 76}
    assert s.files == {folder / "model.safetensors":
                       (folder / "model.safetensors").stat().st_size}
    assert s.tied == ["lm_head.weight is model.embed_tokens.weight (tie_word_embeddings is true)"]
    assert s.missing == []
    assert s.highlights() == {"model_type": "llama", "hidden_size": 4, "num_hidden_layers": 2,
                              "tie_word_embeddings": True}


def test_missing_tensors_and_layers(tmp_path):
    state = small_tensors(layers=4)
    del state["model.layers.1.mlp.up_proj.weight"]
    for name in [n for n in state if n.startswith("model.layers.2.")]:
        del state[name]
    folder = write_hf_folder(tmp_path / "m", state, {"num_hidden_layers": 5,
                                                     "tie_word_embeddings": False})
    assert inspect_model(folder).missing == [
        "lm_head.weight: there is no output head, and config.json says tie_word_embeddings "
        "is false",
        "layers 2: no tensors at all",
        "config.json says 5 layers; the weights have 4",
        "mlp.up_proj.weight: not in layers 1",
    ]


def test_module_types_and_places():
    assert module_of("model.layers.12.self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    assert module_of("transformer.h.3.attn.c_attn.weight") == "attn.c_attn.weight"
    assert module_of("lm_head.weight") == "lm_head.weight"
    assert [place_of(n) for n in ("model.embed_tokens.weight", "model.layers.7.mlp.w",
                                  "model.norm.weight")] == ["before", "7", "after"]


def test_headers_only_and_the_command(tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(SafetensorsModel, "load", refuse)
    assert cli.main(["inspect", str(EXAMPLES / "math"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["tensors"], report["num_layers"], len(report["files"])) == (39, 4, 3)
    assert report["parameters"] == sum(g["parameters"] for g in report["modules"].values())
    assert report["dtypes"] == {"bfloat16": report["parameters"]}
    assert cli.main(["inspect", str(EXAMPLES / "math")]) == 0
    text = capsys.readouterr().out
    assert "39 tensors" in text and "self_attn.q_proj.weight" in text and "0-3" in text


@pytest.mark.parametrize("make", [
    lambda p: p / "nowhere",
    lambda p: (p / "empty").mkdir() or p / "empty",
    lambda p: (p / "x.safetensors").write_bytes(b"\x00" * 3) and p / "x.safetensors",
])
def test_bad_models_are_diagnostics_with_exit_2(tmp_path, capsys, make):
    assert cli.main(["inspect", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


def test_a_single_safetensors_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(3, dtype=torch.int64)},
              str(tmp_path / "one.safetensors"))
    s = inspect_model(tmp_path / "one.safetensors")
    assert (s.parameters, s.num_layers, s.dtypes) == (9, 0, {"float32": 6, "int64": 3})
