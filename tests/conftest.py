"""Shared fixtures: the example models, and small Hugging Face model folders made on the spot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

EXAMPLE_MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"


def write_hf_folder(folder: Path, tensors: dict[str, torch.Tensor],
                    config: dict | None = None) -> Path:
    """A Hugging Face model folder: `model.safetensors` holding `tensors`, and a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    layers = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")}
    config = {"model_type": "llama", "num_hidden_layers": len(layers), **(config or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def small_tensors(seed: int = 0, layers: int = 2, width: int = 4) -> dict[str, torch.Tensor]:
    """A tiny Llama-named state dict: embeddings, `layers` blocks, a final norm."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(8, width, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(width, width, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(width, generator=g)
    state["model.norm.weight"] = torch.randn(width, generator=g)
    return state


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(name, tensors=None, config=None): a model folder at tmp_path/name;
    without `tensors`, `small_tensors()`."""

    def make(name: str, tensors: dict[str, torch.Tensor] | None = None,
             config: dict | None = None) -> Path:
        tensors = small_tensors() if tensors is None else tensors
        return write_hf_folder(tmp_path / name, tensors, config)

    return make


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """tmp_path/examples: the example models (base, math, code, chat), linked in, so a script
    in tmp_path can say `model("examples/base")`."""
    link = tmp_path / "examples"
    link.symlink_to(EXAMPLE_MODELS, target_is_directory=True)
    return link
