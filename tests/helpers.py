"""Helpers shared by the test modules: model files made on the spot, scripts compiled in
a temporary folder, and runs of a plan at several chunkings and orders."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import mergelang
from mergelang.execute import Collector, execute
from mergelang.plan import Plan
from mergelang.schedule import Order, schedule

LAYERS = 4

# merges run by the engine tests (and the GPU tests) over the models base, a, b, c
METHODS = [
    "base + ties(a - base, b - base, c - base, weights=[1, 0.7, 0.4], density=0.3)",
    'base + ties(a - base, b - base, density=0.5, method="count", normalize=false)',
    "base + dare_ties(a - base, b - base, c - base, density=0.3)",
    'base + dare_linear(a - base, b - base, density=0.4, rescale="l1")',
    "linear(a, b, c, weights=[1, 2, 3])",
    "base + task_arithmetic(a - base, b - base, weights=[0.5, -1])",
    "base + trim(trim(a - base, 0.5) + b - base, 0.25)",  # a reduction inside a reduction
]


def layered_state(seed: int, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(6, 4, generator=g)
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(4, 4, generator=g)
    state["model.norm.weight"] = torch.randn(4, generator=g)
    state["lm_head.weight"] = torch.randn(10, 4, generator=g)
    return state


def small_tensors(seed: int = 0, layers: int = 2, width: int = 4) -> dict[str, torch.Tensor]:
    """A tiny Llama-named state dict: embeddings, `layers` blocks, a final norm."""
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(8, width, generator=g)}
    for i in range(layers):
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(width, width, generator=g)
        state[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(width, generator=g)
    state["model.norm.weight"] = torch.randn(width, generator=g)
    return state


def quantised_state(seed: int) -> dict[str, torch.Tensor]:
    """Values on a coarse grid, so magnitudes tie often (the hard case for top-k)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randint(-6, 7, (29, 8), generator=g).float() / 4,
        "layers.0.w": torch.randint(-6, 7, (33, 5), generator=g).float() / 4,
        "layers.0.norm": torch.randint(-6, 7, (41,), generator=g).float() / 4,
        "scale": torch.tensor(0.5 + seed),
    }


def write_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """A folder holding one `model.safetensors` (no config)."""
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_hf_folder(folder: Path, tensors: dict[str, torch.Tensor],
                    config: dict | None = None) -> Path:
    """A Hugging Face model folder: `model.safetensors` holding `tensors`, and a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    layers = {int(n.split(".")[2]) for n in tensors if n.startswith("model.layers.")}
    config = {"model_type": "llama", "num_hidden_layers": len(layers), **(config or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def compile_in(tmp_path: Path, script: str, **models: dict) -> mergelang.Program:
    """`script` saved in tmp_path beside the models given as state dicts, and compiled."""
    for name, state in models.items():
        write_model(tmp_path / name, state)
    path = tmp_path / "script.merge"
    path.write_text(script)
    return mergelang.load(path)


def four_models(tmp_path: Path, expression: str, state=None, seed: int | None = None) -> Plan:
    """The plan of `output <expression>` over models base, a, b, c (seeded 0..3)."""
    state = state or quantised_state
    program = compile_in(tmp_path, (f"set seed = {seed}\n" if seed is not None else "") + f"""
base = model("base")
a = model("a")
b = model("b")
c = model("c")
output {expression}
""", base=state(0), a=state(1), b=state(2), c=state(3))
    return program.plan()


def run_all(p: Plan, budget: int, order: Order | None = None,
            device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every output tensor of the plan, computed in memory."""
    results = Collector(p.tensors)
    execute(p, results.sink, device, budget=budget, order=order)
    return results.tensors


def reversed_order(kernels: list) -> list:
    return kernels[::-1]


def shuffled_order(seed: int) -> Callable[[list], list]:
    import random

    def order(kernels: list) -> list:
        kernels = list(kernels)
        random.Random(seed).shuffle(kernels)
        return kernels
    return order


def same_bytes_in_chunks(p: Plan, some_budget: int = 20_000) -> dict[str, torch.Tensor]:
    """Runs the plan whole, one row per chunk and in a few chunks; asserts the same bytes
    and returns the whole run's results."""
    whole = run_all(p, budget=10**9)
    assert all(len(k.chunks) == 1 for k in schedule(p, 10**9))
    tiny = run_all(p, budget=1)  # one row per chunk
    assert max(len(k.chunks) for k in schedule(p, 1)) == 41  # quantised_state's longest
    some = run_all(p, budget=some_budget)
    for name in whole:
        assert torch.equal(whole[name], tiny[name]), name
        assert torch.equal(whole[name], some[name]), name
    return whole
