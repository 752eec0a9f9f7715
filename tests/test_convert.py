"""`mergelang convert`: mergekit YAML configs become .merge scripts that give mergekit's model.

Three kinds of test:
- the generated text, for configs modelled on mergekit's examples (Hub ids, not run);
- converted scripts run on small float32 models, compared with the closed form of the
  YAML's mergekit semantics (docs/methods.md), written out here per tensor;
- bad configs: a diagnostic that names the key and shows its YAML line, exit status 2,
  nothing written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.cli import main
from mergelang.convert import METHODS, convert, convert_file
from mergelang.resolve import stdlib_scope
from mergelang.syntax import parse
from mergelang.unparse import unparse
from tests.helpers import write_hf_folder

LAYERS = 4


# --------------------------------------------------------------------------------------
# helpers


def model_tensors(seed: int, base: dict | None = None, layers: int = LAYERS) -> dict:
    """A tiny Llama-named float32 state dict with continuous values (no ties in magnitude,
    so a top-k keeps the same entries whatever the tie-breaking). With `base`, a fine-tune
    of it: base plus small noise."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,),
              "lm_head.weight": (8, 4)}
    for i in range(layers):
        shapes[f"model.layers.{i}.self_attn.q_proj.weight"] = (4, 4)
        shapes[f"model.layers.{i}.mlp.up_proj.weight"] = (6, 4)
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (4,)
    if base is None:
        return {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    return {n: base[n] + 0.1 * torch.randn(s, generator=g) for n, s in shapes.items()}


@pytest.fixture
def models(tmp_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Model folders tmp_path/{base,a,b,c}: a, b, c fine-tunes of base."""
    base = model_tensors(0)
    states = {"base": base, **{n: model_tensors(i, base) for i, n in enumerate("abc", 1)}}
    for name, state in states.items():
        write_hf_folder(tmp_path / name, state)
    return states


def convert_and_run(tmp_path: Path, config: str) -> tuple[str, dict[str, torch.Tensor]]:
    """Convert `config` (a YAML text naming models in tmp_path) and run the script."""
    yml = tmp_path / "config.yml"
    yml.write_text(config)
    script = tmp_path / "config.merge"
    convert_file(yml, script, force=True)
    out = tmp_path / "out"
    mergelang.load(script).run(out, force=True)
    return script.read_text(), load_file(str(out / "model.safetensors"))


def layer_of(name: str) -> int | None:
    m = re.search(r"layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def mk_gradient(values: list[float], t: float) -> float:
    """mergekit's gradient: linear interpolation of `values` spread over t in [0, 1]."""
    scaled = t * (len(values) - 1)
    i = int(scaled)
    j = min(len(values) - 1, i + 1)
    frac = scaled - i
    return (1 - frac) * values[i] + frac * values[j]


def t_of(name: str, layers: int = LAYERS) -> float:
    """mergekit's t for a tensor of a whole-model merge: 0 outside the layers."""
    layer = layer_of(name)
    return 0.0 if layer is None else layer / (layers - 1)


def trim(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    k = max(1, int(density * d.numel()))
    flat = d.flatten()
    keep = torch.zeros_like(flat)
    keep[flat.abs().topk(k).indices] = 1
    return (flat * keep).reshape(d.shape)


def ties_ref(base, models, weights, densities, normalize=True, lam=1.0):
    kept = torch.stack([w * trim(m - base, d) for m, w, d in zip(models, weights, densities,
                                                                  strict=True)])
    sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = (kept.sign() == sign).float()
    merged = (kept * agree).sum(0)
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + lam * (merged / divisor if normalize else merged)


def slerp_ref(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    x, y = a.double().flatten(), b.double().flatten()
    dot = float((x / x.norm()) @ (y / y.norm()))
    dot = max(-1.0, min(1.0, dot))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = math.acos(dot)
    out = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
    return out.reshape(a.shape).float()


def assert_close(out: dict, expected: dict, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    assert set(out) == set(expected)
    for name in expected:
        torch.testing.assert_close(out[name].float(), expected[name].float(), atol=atol,
                                   rtol=rtol, msg=name)


def flat(text: str) -> str:
    """The text with every run of whitespace as one space (line breaks do not matter)."""
    return re.sub(r"\s+", " ", text)


# --------------------------------------------------------------------------------------
# the generated text, for configs modelled on mergekit's examples


TIES_EXAMPLE = """\
models:
  - model: abacaj/phi-2-super # Best
    parameters:
      density: [0.8, 0.3, 0.1]
      weight: [1.0, 0.8, 0.5]
  - model: rhysjones/phi-2-orange-v2 #Middle
    parameters:
      density: 0.5
      weight: 0.3
merge_method: ties
base_model: microsoft/phi-2
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""


def test_ties_example_text():
    text = convert(TIES_EXAMPLE, "ties.yml").script
    assert 'base = model("microsoft/phi-2")' in text
    assert re.search(r'phi_2_super = model\("abacaj/phi-2-super"\) +# Hub id: download', text)
    assert "huggingface-cli" in text and "download it first" in text
    assert 'set dtype = "bfloat16"' in text and 'set out_dtype = "bfloat16"' in text
    assert "weight_phi_2_super = if layer == none then 1.0 else gradient([1.0, 0.8, 0.5])" \
        in text
    assert "density_phi_2_super = if layer == none then 0.8 else gradient([0.8, 0.3, 0.1])" \
        in text
    assert text.rstrip().endswith(
        "output base + ties(phi_2_super - base,\n"
        "                   phi_2_orange_v2 - base,\n"
        "                   weights=[weight_phi_2_super, 0.30078125],\n"
        "                   density=[density_phi_2_super, 0.5],\n"
        "                   normalize=true)")
    assert "int8_mask only changes how mergekit stores its masks" in text
    # mergekit builds the weights in the compute dtype: bfloat16 holds 0.3 as 0.30078125
    assert "written as bfloat16 holds it:" in text and "0.3 as 0.30078125" in text
    assert "values between its points are not rounded" in text


GRADIENT_SLERP_EXAMPLE = """\
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""


def test_gradient_slerp_example_text():
    text = convert(GRADIENT_SLERP_EXAMPLE, "gradient-slerp.yml").script
    assert (
        't = if name ~ "self_attn" then (if layer == none then 0 else '
        "gradient([0, 0.5, 0.3, 0.7, 1]))\n"
        '    else if name ~ "mlp" then (if layer == none then 1 else '
        "gradient([1, 0.5, 0.7, 0.3, 0]))\n"
        "    else 0.5\n") in text
    # the layer counts of Hub models are unknown here, so the slice stays a slice
    assert "output stack(slerp(base.layers[0:40], platypus2_13b.layers[0:40], t=t))" in text
    # mergekit's slerp computes in float32 after loading in float16, and writes float16
    assert 'set dtype = "float32"' in text and 'set out_dtype = "float16"' in text


PASSTHROUGH_EXAMPLE = """\
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
"""


def test_passthrough_example_text():
    text = convert(PASSTHROUGH_EXAMPLE, "orcamini-platy-44layer.yml").script
    assert "output stack(orca_mini_v3_13b.layers[0:24], platypus2_13b.layers[20:40])" in text


LINEAR_EXAMPLE = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""


def test_linear_example_text():
    text = convert(LINEAR_EXAMPLE, "linear.yml").script
    assert ("output linear(orca_mini_v3_13b, wizardlm_13b_v1_2, platypus2_13b, "
            "weights=[1.0, 0.3, 0.5])") in text


DARE_TIES_EXAMPLE = """\
models:
  - model: mistralai/Mistral-7B-v0.1
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacaj/phi-2-super
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
random_seed: 7
"""


def test_dare_ties_example_text():
    text = convert(DARE_TIES_EXAMPLE, "dare_ties.yml").script
    # DARE: mergekit's rescaling (L1) always written, mergelang's default is the paper's
    assert ("output base + dare_ties(samirgpt_v1 - base, phi_2_super - base, "
            'weights=[0.400390625, 0.30078125], density=0.53, rescale="l1")') in flat(text)
    assert "set seed = 7" in text
    assert "random masks are drawn by mergelang" in text
    assert text.count(" = model(") == 3    # the base is listed once


SLICE_GRADIENTS_EXAMPLE = """\
slices:
  - sources:
      - {model: org/base, layer_range: [0, 1]}
      - {model: org/a, layer_range: [0, 1], parameters: {weight: [0.2, 1.0]}}
  - sources:
      - {model: org/base, layer_range: [1, 4]}
      - model: org/a
        layer_range: [1, 4]
        parameters:
          weight:
            - {filter: mlp, value: [1.0, 0.4, 0.1]}
            - {filter: self_attn, value: [-0.3, 0.3]}
            - value: 0.2
merge_method: task_arithmetic
base_model: org/base
parameters: {lambda: [1.0, 0.5]}
"""


@pytest.mark.parametrize("config", [TIES_EXAMPLE, GRADIENT_SLERP_EXAMPLE, PASSTHROUGH_EXAMPLE,
                                    LINEAR_EXAMPLE, DARE_TIES_EXAMPLE, SLICE_GRADIENTS_EXAMPLE])
def test_scripts_are_laid_out_as_the_unparser_lays_out_code(config):
    """The script is a syntax tree printed by mergelang.unparse: without its comments and
    blank lines it is the unparser's text for what it parses to."""
    script = convert(config, "x.yml").script
    code = [re.sub(r" +# .*$", "", line) for line in script.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    assert unparse(parse(script)) == "".join(line + "\n" for line in code)


def test_slice_gradients_text():
    text = convert(SLICE_GRADIENTS_EXAMPLE, "x.yml").script
    assert "weight_1 = if layer == none then 0.2 else 1.0\n" in text   # one layer: t = 1
    assert "weight_2_pos = (layer - 1) / 2 * 2\n" in text
    assert ("weight_2 = if layer == none then 1.0\n"
            "           else if weight_2_pos < 1 then (1 - weight_2_pos) * 1.0 + "
            "weight_2_pos * 0.4\n"
            "           else (1 - (weight_2_pos - 1)) * 0.4 + (weight_2_pos - 1) * 0.1\n"
            ) in text
    assert "(1 - weight_2_pos_2) * -0.3 + weight_2_pos_2 * 0.3\n" in text
    # an else-if chain is aligned under its own `if`
    assert ('weight_2_3 = if name ~ "mlp" then weight_2\n'
            '             else if name ~ "self_attn" then weight_2_2\n'
            "             else 0.2\n") in text
    # the lambda gradient shares the position binding of the same layers
    assert "lambda_2 = if layer == none then 1.0 else (1 - weight_2_pos_2) * 1.0 + " in text
    assert "output stack(slice_1, slice_2)" in text


def test_model_names_never_shadow_keywords_or_functions():
    config = ("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: org/{n}\n    parameters: {{weight: 1}}\n"
        for n in ("if", "param", "sum", "ties", "9b")))
    text = convert(config).script
    for name, path in (("if_2", "if"), ("param_2", "param"), ("sum_2", "sum"), ("ties_2", "ties"),
                       ("m_9b", "9b")):
        assert f'{name} = model("org/{path}")' in text
    parse(text)


def test_filters_are_escaped_substring_matches():
    config = """\
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - filter: layers.1.
          value: 2
        - filter: '*'
          value: 1
  - model: b
    parameters: {weight: 1}
"""
    text = convert(config).script
    assert 'weight_a = if name ~ "layers\\\\.1\\\\." then 2 else 1\n' in text
    assert "weights=[weight_a, 1]" in text


def test_hub_revision_and_notes():
    config = """\
name: my-merge
merge_method: task_arithmetic
base_model: org/base@main
models:
  - model: org/tuned
    parameters: {weight: 0.5, density: 0.3}
tokenizer_source: org/tuned
chat_template: chatml
"""
    result = convert(config, "x.yml")
    text = result.script
    assert 'base = model("org/base")' in text and "revision main" in text
    assert "name: my-merge" in text
    assert "density has no effect" in text
    assert "set vocab = tuned" in text and "tokenizer surgery" not in text
    assert "chat_template: chatml is not applied" in text
    assert {w.severity for w in result.warnings} == {"warning"}


def test_every_method_maps_to_a_stdlib_function_and_its_keywords():
    functions = stdlib_scope().functions
    for method in METHODS.values():
        if method.function is None:
            continue
        assert method.function in functions, method.name
        params = {p.name for p in functions[method.function].params}
        for p in method.params:
            if p.keyword is not None:
                assert p.keyword in params, (method.name, p.keyword)


# --------------------------------------------------------------------------------------
# converted scripts run, and give mergekit's result


def test_linear_adds_the_base_model_as_mergekit_does(tmp_path, models):
    script, out = convert_and_run(tmp_path, """\
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 2.0}
  - model: b
parameters:
  weight: 0.5
""")
    assert "output linear(a, b, base, weights=[2.0, 0.5, 0.5])" in script
    s = models
    expected = {n: (2 * s["a"][n] + 0.5 * s["b"][n] + 0.5 * s["base"][n]) / 3 for n in s["base"]}
    assert_close(out, expected)


def test_task_arithmetic_filters_negation_and_lambda(tmp_path, models):
    script, out = convert_and_run(tmp_path, """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters:
      weight:
        - filter: mlp
          value: 1.0
        - value: 0.6
  - model: b
    parameters:
      weight: -0.5
parameters:
  lambda: 0.9
dtype: float32
""")
    assert "lambda=0.9" in script
    s = models
    expected = {}
    for n, base in s["base"].items():
        wa = 1.0 if "mlp" in n else 0.6
        expected[n] = base + 0.9 * (wa * (s["a"][n] - base) - 0.5 * (s["b"][n] - base))
    assert_close(out, expected)


def test_ties_with_per_model_gradients(tmp_path, models):
    script, out = convert_and_run(tmp_path, """\
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters:
      density: [0.8, 0.3, 0.1]
      weight: [1.0, 0.8, 0.5]
  - model: b
    parameters:
      density: [0.1, 0.4, 0.1]
      weight: [0.2, 0.8, 0.1]
  - model: c
parameters:
  density: 0.5
  weight: 0.7
  normalize: false
""")
    assert "weights=[weight_a, weight_b, 0.7]" in script
    s = models
    expected = {}
    for n, base in s["base"].items():
        t = t_of(n)
        w = [mk_gradient([1.0, 0.8, 0.5], t), mk_gradient([0.2, 0.8, 0.1], t), 0.7]
        d = [mk_gradient([0.8, 0.3, 0.1], t), mk_gradient([0.1, 0.4, 0.1], t), 0.5]
        expected[n] = ties_ref(base, [s["a"][n], s["b"][n], s["c"][n]], w, d, normalize=False)
    assert_close(out, expected)


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_dare_at_density_one_is_deterministic(tmp_path, models, method):
    script, out = convert_and_run(tmp_path, f"""\
merge_method: {method}
base_model: base
models:
  - model: a
    parameters: {{weight: 1.0, density: 1.0}}
  - model: b
    parameters: {{weight: 0.5, density: 1.0}}
parameters:
  normalize: true
""")
    assert 'rescale="l1"' in script
    s = models
    expected = {}
    for n, base in s["base"].items():
        if method == "dare_ties":
            expected[n] = ties_ref(base, [s["a"][n], s["b"][n]], [1.0, 0.5], [1.0, 1.0])
        else:
            expected[n] = base + ((s["a"][n] - base) + 0.5 * (s["b"][n] - base)) / 1.5
    assert_close(out, expected)


def test_dare_keeps_about_density_of_the_delta(tmp_path, models):
    big = {"w": torch.zeros(200, 100)}
    tuned = {"w": torch.randn(200, 100, generator=torch.Generator().manual_seed(3))}
    write_hf_folder(tmp_path / "zero", big)
    write_hf_folder(tmp_path / "tuned", tuned)
    _, out = convert_and_run(tmp_path, """\
merge_method: dare_linear
base_model: zero
models:
  - model: tuned
    parameters: {weight: 1.0, density: 0.3}
parameters: {rescale: false}
random_seed: 1
""")
    kept = out["w"] != 0
    assert 0.27 < kept.float().mean() < 0.33
    assert torch.equal(out["w"][kept], tuned["w"][kept])   # rescale: false leaves them


def test_slerp_filters_and_gradients(tmp_path, models):
    script, out = convert_and_run(tmp_path, """\
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
      - model: b
        layer_range: [0, 4]
merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
""")
    # config.json says 4 layers, so the one slice is the whole model
    assert "output slerp(base, b, t=t)" in script   # mergekit's base_model comes first
    s = models
    expected = {}
    for n in s["a"]:
        t = t_of(n)
        value = (mk_gradient([0, 0.5, 0.3, 0.7, 1], t) if "self_attn" in n
                 else mk_gradient([1, 0.5, 0.7, 0.3, 0], t) if "mlp" in n else 0.5)
        expected[n] = slerp_ref(s["a"][n], s["b"][n], value)
    assert_close(out, expected)


def test_gradient_outside_the_layers_takes_the_first_value(tmp_path, models):
    """mergekit: t = 0 for embeddings, final norm and lm_head; so lm_head gets v0, not vn."""
    _, out = convert_and_run(tmp_path, """\
merge_method: linear
models:
  - model: a
    parameters: {weight: [1.0, 0.0]}
  - model: b
    parameters: {weight: [0.0, 1.0]}
""")
    s = models
    assert torch.equal(out["lm_head.weight"], s["a"]["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], s["a"]["model.norm.weight"])
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"],
                       s["b"]["model.layers.3.mlp.up_proj.weight"])


def test_passthrough_stacking_with_scale(tmp_path, models):
    script, out = convert_and_run(tmp_path, """\
slices:
  - sources:
    - model: a
      layer_range: [0, 3]
  - sources:
    - model: b
      layer_range: [1, 4]
      parameters:
        scale:
          - filter: q_proj
            value: 0.0
          - value: 1.0
merge_method: passthrough
""")
    assert "output stack(a.layers[0:3], scale_b_2 * b.layers[1:4])" in script
    s = models
    expected = {"model.embed_tokens.weight": s["a"]["model.embed_tokens.weight"],
                "model.norm.weight": s["b"]["model.norm.weight"],
                "lm_head.weight": s["b"]["lm_head.weight"]}
    for i in range(6):
        for part in ("self_attn.q_proj", "mlp.up_proj", "input_layernorm"):
            name = f"model.layers.{i}.{part}.weight"
            if i < 3:
                expected[name] = s["a"][name]
            else:
                source = s["b"][f"model.layers.{i - 2}.{part}.weight"]
                expected[name] = source * (0.0 if part == "self_attn.q_proj" else 1.0)
    assert_close(out, expected, atol=0)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6


def test_merged_slices_with_slice_gradients(tmp_path, models):
    """A gradient in a slice of several runs over that slice's layers only."""
    script, out = convert_and_run(tmp_path, """\
slices:
  - sources:
      - model: base
        layer_range: [0, 2]
      - model: a
        layer_range: [0, 2]
        parameters:
          weight: [0.2, 1.0]
      - model: b
        layer_range: [0, 2]
  - sources:
      - model: base
        layer_range: [1, 4]
      - model: a
        layer_range: [1, 4]
        parameters:
          weight: [1.0, 0.4, 0.1]
      - model: b
        layer_range: [1, 4]
merge_method: ties
base_model: base
parameters:
  weight: 0.5
  density: 0.6
""")
    assert "output stack(slice_1, slice_2)" in script
    s = models
    slices = [(0, 0, 2, [0.2, 1.0]), (2, 1, 3, [1.0, 0.4, 0.1])]  # out offset, in start, n
    expected = {}
    for out_name in out:
        layer = layer_of(out_name)
        if layer is None:
            offset, start, n, grad = slices[0] if "embed" in out_name else slices[-1]
            src, t = out_name, 0.0
        else:
            offset, start, n, grad = next(x for x in slices if x[0] <= layer < x[0] + x[2])
            src = out_name.replace(f"layers.{layer}.", f"layers.{start + layer - offset}.")
            t = (layer - offset) / (n - 1)
        expected[out_name] = ties_ref(s["base"][src], [s["a"][src], s["b"][src]],
                                      [mk_gradient(grad, t), 0.5], [0.6, 0.6])
    assert len(out) == 3 + 5 * 3
    assert_close(out, expected)


def test_nearswap_with_a_gradient(tmp_path, models):
    _, out = convert_and_run(tmp_path, """\
merge_method: nearswap
base_model: base
models:
  - model: a
parameters:
  t: [0.01, 0.05]
""")
    s = models
    expected = {}
    for n, base in s["base"].items():
        t = mk_gradient([0.01, 0.05], t_of(n))
        w = (t / (base - s["a"][n]).abs().clamp(min=1e-6)).clamp(0, 1)
        expected[n] = w * s["a"][n] + (1 - w) * base
    assert_close(out, expected)


def test_dtype_is_the_written_dtype(tmp_path, models):
    _, out = convert_and_run(tmp_path, """\
merge_method: linear
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 1.0}
dtype: bfloat16
""")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    s = models
    # mergekit rounds the inputs to bfloat16 first; mergelang reads these float32 models
    # as they are, so the two differ by at most that rounding
    assert_close(out, {n: ((s["a"][n].bfloat16().float() + s["b"][n].bfloat16().float()) / 2)
                       .bfloat16() for n in s["a"]}, atol=1e-2, rtol=1e-2)


def _minimal_config(method: str) -> str:
    m = METHODS[method]
    weight = {"weight": 0.5} if m.param("weight") else {}
    params = {p.name: 0.5 for p in m.params if p.default is not None and p.name == "t"}
    lines = [f"merge_method: {method}"]
    if method == "passthrough":
        return "\n".join(lines + ["models:", "  - model: a"]) + "\n"
    if m.base != "ignored":
        lines.append("base_model: base")
    others = {"base_first": "ab" if m.max_inputs == 2 else "abc"}.get(m.form, "abc")
    if m.max_non_base == 2:
        others = "ab"
    if m.max_inputs == 2:
        others = "a"
    lines.append("models:")
    for name in others:
        lines.append(f"  - model: {name}")
        if weight:
            lines.append(f"    parameters: {json.dumps(weight)}")
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_converts_and_runs(tmp_path, models, method):
    script, out = convert_and_run(tmp_path, _minimal_config(method))
    assert set(out) == set(models["base"])
    assert all(torch.isfinite(t).all() for t in out.values())


# --------------------------------------------------------------------------------------
# errors: the key, its YAML line with a caret, exit status 2, nothing written


def test_a_typo_mergekit_ignores_is_a_located_warning_not_an_error(tmp_path, capsys):
    """mergekit 0.1.5 ignores a parameter its method does not have (checked: the same
    bytes with and without it), so the script is written, with a warning and a note."""
    config = tmp_path / "typo.yml"
    config.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n"
                      "    parameters:\n      weight: 1.0\n      densty: 0.5\n")
    script = tmp_path / "typo.merge"
    assert main(["convert", str(config), "-o", str(script)]) == 0
    err = capsys.readouterr().err
    assert 'warning: "densty" in the parameters of "a"' in err
    assert "typo.yml:7:7" in err
    assert "7 |       densty: 0.5" in err
    assert "      ^^^^^^" in err
    assert 'did you mean "density"?' in err
    assert '"densty" in the parameters of "a" (line 7)' in flat(script.read_text())


def test_an_error_exits_2_with_the_yaml_line(tmp_path, capsys):
    config = tmp_path / "bad.yml"
    config.write_text("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n"
                      "    parameters:\n      weight: 1.0\n      density: high\n")
    script = tmp_path / "bad.merge"
    assert main(["convert", str(config), "-o", str(script)]) == 2
    err = capsys.readouterr().err
    assert 'density must be a number, not "high"' in err
    assert "bad.yml:7:16" in err
    assert "7 |       density: high" in err
    assert not script.exists()


def test_cli_prints_or_writes(tmp_path, capsys):
    config = tmp_path / "lin.yml"
    config.write_text(LINEAR_EXAMPLE)
    assert main(["convert", str(config)]) == 0
    assert "output linear(" in capsys.readouterr().out
    script = tmp_path / "lin.merge"
    assert main(["convert", str(config), "-o", str(script)]) == 0
    assert script.read_text().startswith("# Converted from lin.yml")
    assert main(["convert", str(config), "-o", str(script)]) == 2   # exists: --force
    assert main(["convert", str(config), "-o", str(script), "--force"]) == 0


@pytest.mark.parametrize(("config", "message", "where"), [
    ("merge_method: tie\nmodels:\n  - model: a\n", 'unknown merge_method "tie"', ":1:15"),
    ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n",
     'weight has no value for "b"', ":5:5"),
    ("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
     "parameters: {rescale: true}\n", "rescale: true is not supported for ties", ":6:23"),
    ("merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n",
     "ties needs a base_model", ":3:3"),
    ("merge_method: linear\nmodels:\n  - model: a+my/lora+b\n", 'more than one "+"',
     ":3:12"),
    ("merge_method: linear\nmodules: {}\n", "modules must map a module", ":2:10"),
    ("merge_method: linear\nmodules: {}\nmodels:\n  - model: a\n",
     "one of `models`, `slices` or `modules`, not models and modules", ":2:1"),
    ("merge_method: linear\nmodules:\n  text:\n    models: [{model: a}]\n  vision:\n"
     "    models: [{model: a}]\n", "a separate merge per module", ":5:3"),
    ("merge_method: linear\nmodules:\n  text:\n    parameters: {}\n",
     '"text" has either `models` or `slices`', ":3:3"),
    ("merge_method: linear\nmodels:\n  - model: a\ndtype: fp16\n", 'unknown dtype "fp16"',
     ":4:8"),
    ("merge_method: linear\nmodels: [\n  - model: a\n", "not valid YAML", ":3:3"),
    ("merge_method: linear\nmerge_method: ties\nmodels:\n  - model: a\n",
     '"merge_method" appears twice', ":2:1"),
    ("merge_method: passthrough\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2]\n"
     "    - model: b\n      layer_range: [0, 2]\n", "passthrough takes at most 1", ":3:5"),
    ("merge_method: linear\nslices:\n  - sources:\n    - model: a\n      layer_range: [0, 2]\n"
     "    - model: b\n      layer_range: [0, 3]\n", "different numbers of layers", ":4:5"),
    ("merge_method: ties\nbase_model: c\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
     "tokenizer:\n  source: base\n  tokens:\n    x:\n      source: {kind: model_token, model: b"
     ", token: y}\n", '"x" takes its row from "b", which is not merged', ":9:5"),
])
def test_bad_configs(config, message, where):
    with pytest.raises(mergelang.MergeError) as info:
        convert(config, "bad.yml")
    text = str(info.value)
    assert message in text
    assert f"bad.yml{where}" in text
    assert "^" in text or "not valid YAML" in text


def test_yaml_numbers_written_as_strings_are_numbers():
    """YAML reads 1e-5 (no dot) as a string; mergekit takes it as a number."""
    config = ("merge_method: ram\nbase_model: b\nmodels:\n  - model: a\n"
              "parameters: {epsilon: 1e-4}\n")
    assert "ram(a - base, epsilon=0.0001)" in convert(config).script
