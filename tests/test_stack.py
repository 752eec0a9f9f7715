"""Layer stacking ("frankenmerges"): `stack(a.layers[0:3], b.layers[1:4], ...)`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.cli import main
from tests.helpers import layered_state

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "models"
transformers = pytest.importorskip("transformers")


def read(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def up(layer: int) -> str:
    return f"model.layers.{layer}.mlp.up_proj.weight"


def test_stacked_model_loads_with_the_new_layer_count(tmp_path):
    script = tmp_path / "stack.merge"
    script.write_text(f"""
a = model("{EXAMPLES / 'math'}")
b = model("{EXAMPLES / 'code'}")
output stack(a.layers[0:3], b.layers[1:], linear(a.layers[2:4], b.layers[2:4], weights=[1, 3]))
""")
    out = tmp_path / "out"
    assert main(["run", str(script), "-o", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 + 3 + 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 8
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    merged, a, b = read(out), read(EXAMPLES / "math"), read(EXAMPLES / "code")
    assert torch.equal(merged[up(2)], a[up(2)])
    assert torch.equal(merged[up(3)], b[up(1)])  # b's layers 1, 2, 3 are output 3, 4, 5
    assert torch.equal(merged[up(5)], b[up(3)])
    mix = (a[up(3)].float() + 3 * b[up(3)].float()) / 4  # output 7 = a, b layer 3
    assert torch.equal(merged[up(7)], mix.to(torch.bfloat16))
    # embeddings from the first slice's model; final norm and head from the last's
    assert torch.equal(merged["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    head = (a["lm_head.weight"].float() + 3 * b["lm_head.weight"].float()) / 4
    assert torch.equal(merged["lm_head.weight"], head.to(torch.bfloat16))
    assert len(merged) == 3 + 8 * 9


def test_layer_context_inside_a_stack_is_the_output_layer():
    a, b = layered_state(0), layered_state(1)
    out = mergelang.evaluate("stack(a.layers[0:2], b.layers[1:3]) * "
                             "(if layer == none then 1 else layer)", a=a, b=b)
    name = "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(out[name], b["model.layers.2.self_attn.q_proj.weight"] * 3)


def test_one_layer_and_open_ranges():
    a, b = layered_state(0), layered_state(1)
    out = mergelang.evaluate("stack(a.layers[1], b.layers[2:])", a=a, b=b)
    assert torch.equal(out[up(0)], a[up(1)])
    assert torch.equal(out[up(1)], b[up(2)]) and torch.equal(out[up(2)], b[up(3)])
    assert up(3) not in out


@pytest.mark.parametrize("expression, words", [
    ("stack(a.layers[0:9])", "layers 0:9 are beyond the 4 layers"),
    ("stack(a, b.layers[0:2])", "stack() takes layer slices"),
    ("stack(linear(a.layers[0:2], b.layers[0:3]))", "different lengths: [2, 3]"),
    ("stack(a.layers[2:1])", "is empty"),
    ("a.weights", 'unknown attribute ".weights"'),
    ("stack(a.layers[-1:2])", "a layer index is a whole number >= 0"),
])
def test_stacking_errors(expression, words):
    with pytest.raises(mergelang.MergeError) as caught:
        mergelang.evaluate(expression, a=layered_state(0), b=layered_state(1))
    assert words in caught.value.render()
    assert caught.value.diagnostics[0].span is not None


@pytest.mark.parametrize("prefix", ["model.layers", "transformer.h", "bert.encoder.layer",
                                    "model.decoder.layers", "blocks"])
def test_layers_are_found_in_every_naming_family(prefix):
    state = {f"{prefix}.{i}.attn.weight": torch.full((2,), float(i)) for i in range(3)}
    state["wte.weight" if prefix == "transformer.h" else "embeddings.weight"] = torch.ones(2)
    out = mergelang.evaluate("a * depth", a=state)
    for i in range(3):
        name = f"{prefix}.{i}.attn.weight"
        torch.testing.assert_close(out[name], state[name] * i / 2)
    swapped = mergelang.evaluate("stack(a.layers[2], a.layers[0:2])", a=state)
    assert torch.equal(swapped[f"{prefix}.0.attn.weight"], state[f"{prefix}.2.attn.weight"])


def test_a_model_without_layers_cannot_be_sliced():
    with pytest.raises(mergelang.MergeError) as caught:
        mergelang.evaluate("stack(a.layers[0:1])", a={"w": torch.ones(2)})
    assert "has no layers that mergelang can find" in caught.value.render()
