"""`mergelang convert` takes what mergekit 0.1.5 takes: keys and parameters it ignores
(warnings and head comments, never errors), numbers for booleans, `modules:`, `model+lora`,
and the dtype mergekit computes in, with its weights rounded to that dtype.

Each behaviour was first observed on mergekit 0.1.5 itself (docs/convert.md, "Checked
against mergekit"); here the results are checked against closed forms and PEFT.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergelang
from mergelang.convert import convert, convert_file
from tests.helpers import write_hf_folder


def body(script: str) -> str:
    """The statements of a script, without its comments."""
    lines = (re.sub(r"\s*#.*$", "", line) for line in script.splitlines())
    return "\n".join(line for line in lines if line)


def convert_and_run(folder: Path, config: str) -> tuple[str, dict[str, torch.Tensor]]:
    yml = folder / "config.yml"
    yml.write_text(config)
    script = folder / "config.merge"
    convert_file(yml, script, force=True)
    out = folder / "out"
    mergelang.load(script).run(out, force=True)
    return script.read_text(), load_file(str(out / "model.safetensors"))


# --------------------------------------------------------------------------------------
# what mergekit accepts and ignores


CLEAN = """\
merge_method: ties
base_model: base
models:
  - model: a
    parameters: {weight: 0.5, density: 0.5}
  - model: b
    parameters: {weight: 0.7, density: 0.6}
parameters: {normalize: true}
"""

ODD = """\
merge_method: ties
base_model: base
output_dir: ./merged
dype: float16
int8_mask: true
models:
  - model: a
    revision: main
    parameters: {weight: 0.5, density: 0.5, t: 0.3, densty: 0.1}
  - model: b
    parameters: {weight: 0.7, density: 0.6}
parameters: {normalize: 1.0, select_topk: 0.2}
"""


def test_keys_mergekit_ignores_are_warnings_and_comments_and_change_nothing():
    """mergekit 0.1.5 gives the same bytes for CLEAN and ODD (checked by hand); so do the
    scripts: the same statements, each ignored key a located warning and a head note."""
    clean, odd = convert(CLEAN, "clean.yml"), convert(ODD, "odd.yml")
    assert body(odd.script) == body(clean.script)
    head = odd.script.replace("\n#   ", " ")
    expected = {'unknown key "output_dir"': 3, 'unknown key "dype"': 4,
                'unknown key "int8_mask"': 5, 'unknown key "revision"': 8,
                '"t" in the parameters': 9, '"densty" in the parameters': 9,
                '"select_topk" in the top-level parameters': 12}
    for what, line in expected.items():
        [warning] = [w for w in odd.warnings if what in w.message]
        assert warning.severity == "warning" and warning.span.line == line
        assert f"{what}" in head and f"(line {line})" in head
    [typo] = [w for w in odd.warnings if "dype" in w.message]
    assert typo.hint == 'did you mean "dtype"?'


def test_pattern_is_ignored_as_mergekit_ignores_it():
    """mergekit 0.1.5 reads `filter`; an entry with `pattern` matches every tensor."""
    config = ("merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n"
              "parameters:\n  t:\n    - pattern: mlp\n      value: 0.2\n    - value: 0.5\n")
    result = convert(config, "p.yml")
    assert "slerp(base, b, t=0.2)" in result.script.replace("a,", "base,") or \
        "t=0.2" in result.script
    assert any('unknown key "pattern"' in w.message and w.span.line == 8
               for w in result.warnings)


@pytest.mark.parametrize(("written", "value"), [("1.0", "true"), ("0", "false"),
                                                 ("yes", "true"), ("'off'", "false")])
def test_a_number_or_word_for_a_boolean(written, value):
    config = CLEAN.replace("normalize: true", f"normalize: {written}")
    assert f"normalize={value}" in convert(config).script


def test_a_boolean_that_is_not_one_is_a_located_error():
    with pytest.raises(mergelang.MergeError) as info:
        convert(CLEAN.replace("normalize: true", "normalize: 0.5"), "bad.yml")
    assert "normalize must be a true or false, not the number 0.5" in str(info.value)
    assert "bad.yml:8:25" in str(info.value)


# --------------------------------------------------------------------------------------
# modules


def test_one_module_is_the_merge_its_parameters_between_slice_and_top():
    modules = """\
merge_method: ties
base_model: base
modules:
  decoder:
    models:
      - model: a
        parameters: {weight: 0.5, density: 0.5}
      - model: b
        parameters: {weight: 0.7}
    parameters: {density: 0.4}
parameters: {normalize: true, density: 0.9}
"""
    script = convert(modules).script
    flat = " ".join(script.split())
    # b's density comes from the module (0.4), not the top level (0.9)
    assert "density=[0.5, 0.4]" in flat
    assert body(script) == body(convert(CLEAN.replace("density: 0.6", "density: 0.4")).script)
    assert 'modules: the one module "decoder" is the merge' in script


# --------------------------------------------------------------------------------------
# model+lora


def test_model_plus_lora_is_a_model_plus_its_adapter():
    config = ("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
              "  - model: base+adapters/math-lora\n    parameters: {weight: 1.0}\n"
              "  - model: {model: {path: b}, lora: {path: adapters/code}}\n"
              "    parameters: {weight: 0.5}\n")
    script = convert(config).script
    # two models: each adapter names the model it is measured against
    assert 'math_lora = base + lora("adapters/math-lora", base=base)' in script
    assert 'b = model("b")\ncode = b + lora("adapters/code", base=b)' in script
    assert "task_arithmetic(math_lora - base, code - base" in " ".join(script.split())
    one = convert("merge_method: linear\nmodels:\n  - model: a+la\n    parameters: {weight: 1}\n"
                  "  - model: a\n    parameters: {weight: 1}\n").script
    assert 'la = model("a") + lora("la")' in one  # one model: nothing to choose
    tokenizer = convert("merge_method: linear\nmodels:\n  - model: a+la\n"
                        "    parameters: {weight: 1}\ntokenizer_source: c\n").script
    assert 'la = a + lora("la", base=a)' in tokenizer  # c is a model of the script too


def test_model_plus_lora_runs_as_pefts_merge(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=32)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        adapted = peft.get_peft_model(model, peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        adapted.save_pretrained(tmp_path / "lora")
        merged = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
            tmp_path / "lora").merge_and_unload().state_dict()
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    script, out = convert_and_run(tmp_path, "merge_method: task_arithmetic\nbase_model: base\n"
                                  "models:\n  - model: base+lora\n"
                                  "    parameters: {weight: 0.5}\n")
    assert 'lora_2 = model("base") + lora("lora")' in script
    for name, b in base.items():
        torch.testing.assert_close(out[name], b + 0.5 * (merged[name] - b),
                                   atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(out[n], base[n]) for n in base)


def test_an_adapter_on_a_second_model_is_measured_against_it(tmp_path):
    """`b+lb` where lb (PEFT, lm_head saved whole) was made on b, not on the base: mergekit
    merges lb into b first, so the saved lm_head replaces b's. The script says base=b and
    its result is the task arithmetic of PEFT's merge_and_unload of lb into b."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed, name in enumerate(("base", "b")):
            torch.manual_seed(seed)
            transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
        adapted = peft.get_peft_model(model, peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    p.normal_(0, 0.3)
        adapted.save_pretrained(tmp_path / "lb")
        merged = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b"),
            tmp_path / "lb").merge_and_unload().state_dict()
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert not torch.equal(merged["lm_head.weight"], b["lm_head.weight"])
    script, out = convert_and_run(tmp_path, "merge_method: task_arithmetic\nbase_model: base\n"
                                  "models:\n  - model: b+lb\n    parameters: {weight: 0.5}\n")
    assert 'lb = b + lora("lb", base=b)' in script
    for name, x in base.items():
        torch.testing.assert_close(out[name], x + 0.5 * (merged[name] - x), atol=1e-6,
                                   rtol=1e-6, msg=name)
    assert mergelang.load(tmp_path / "config.merge").check().warnings == ()


# --------------------------------------------------------------------------------------
# the compute dtype and the weights in it


def _powers_of_two(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (sign * 2.0 ** torch.randint(-2, 3, shape, generator=g)).to(torch.bfloat16)


def _bfloat16_family(tmp_path, shapes: dict[str, tuple[int, ...]], seeds: tuple[int, int]
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """Folders base (zeros), a and b (powers of two, from `seeds`) in bfloat16; their states."""
    states = {"base": {n: torch.zeros(s, dtype=torch.bfloat16) for n, s in shapes.items()},
              "a": {n: _powers_of_two(seeds[0], s) for n, s in shapes.items()},
              "b": {n: _powers_of_two(seeds[1], s) for n, s in shapes.items()}}
    for name, state in states.items():
        write_hf_folder(tmp_path / name, state)
    return states


def test_bfloat16_models_merge_in_bfloat16_with_weights_as_bfloat16_holds_them(tmp_path):
    """mergekit merges bfloat16 models (no `dtype:`) in bfloat16 and builds the weights as a
    bfloat16 tensor: with deltas that are powers of two every product is exact, so its
    result is bf16(bf16(0.846) * da + bf16(0.3) * db) exactly, which the script gives."""
    shapes = {"model.embed_tokens.weight": (8, 4), "model.layers.0.mlp.up_proj.weight": (6, 4),
              "model.layers.1.mlp.up_proj.weight": (6, 4), "model.norm.weight": (4,)}
    states = _bfloat16_family(tmp_path, shapes, (1, 2))
    script, out = convert_and_run(tmp_path, """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 0.846}
  - model: b
    parameters: {weight: 0.3}
""")
    assert 'set dtype = "bfloat16"' in script
    assert "weights=[0.84765625, 0.30078125]" in " ".join(script.split())
    assert "0.846 as 0.84765625, 0.3 as 0.30078125" in script.replace("\n#   ", " ")
    differs = False
    for n in shapes:
        a, b = states["a"][n].double(), states["b"][n].double()
        expected = (0.84765625 * a + 0.30078125 * b).to(torch.bfloat16)
        assert out[n].dtype == torch.bfloat16
        assert torch.equal(out[n], expected), n
        differs |= not torch.equal(expected, (0.846 * a + 0.3 * b).to(torch.bfloat16))
    assert differs   # the rounding shows in the result


def test_a_weight_gradient_is_rounded_layer_by_layer(tmp_path):
    """mergekit interpolates a gradient at t = layer / (layers - 1), then rounds it to
    bfloat16 (the first value outside the layers): the script lists those values, one a
    layer, and the result is exact with deltas that are powers of two."""
    shapes = {"model.embed_tokens.weight": (8, 4), "model.norm.weight": (4,),
              **{f"model.layers.{i}.mlp.up_proj.weight": (6, 4) for i in range(3)}}
    states = _bfloat16_family(tmp_path, shapes, (3, 4))
    script, out = convert_and_run(tmp_path, """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: [0.846, 0.3]}
  - model: b
    parameters: {weight: 0.3}
""")
    held = {0: 0.84765625, 1: torch.tensor(0.573, dtype=torch.bfloat16).item(), 2: 0.30078125}
    assert f"gradient([0.84765625, {held[1]!r}, 0.30078125])" in script
    assert "written one value a layer" in script.replace("\n#   ", " ")
    for n in shapes:
        layer = int(n.split(".")[2]) if ".layers." in n else 0
        a, b = states["a"][n].double(), states["b"][n].double()
        expected = (held[layer] * a + 0.30078125 * b).to(torch.bfloat16)
        assert torch.equal(out[n], expected), n


def test_float32_models_keep_their_weights(tmp_path):
    write_hf_folder(tmp_path / "base", {"model.norm.weight": torch.zeros(4)})
    write_hf_folder(tmp_path / "a", {"model.norm.weight": torch.ones(4)})
    yml = tmp_path / "c.yml"
    yml.write_text("merge_method: task_arithmetic\nbase_model: base\nmodels:\n"
                   "  - model: a\n    parameters: {weight: 0.846}\n")
    text = convert_file(yml).script
    assert "weights=0.846" in text.replace(" ", "") and "\nset dtype" not in text


def test_models_not_found_leave_a_note_on_the_compute_dtype():
    script = convert("merge_method: ties\nbase_model: org/base\nmodels:\n"
                     "  - model: org/a\n    parameters: {weight: 0.846, density: 0.5}\n").script
    assert "\nset dtype" not in script and "weights=0.846" in script.replace(" ", "")
    assert "mergekit merges in the dtype the models are stored in" in \
        script.replace("\n#   ", " ")


def test_arcee_fusion_writes_float32_as_mergekit_does(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("base", "a"):
        write_hf_folder(tmp_path / name, {
            "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).bfloat16()})
    script, out = convert_and_run(tmp_path, "merge_method: arcee_fusion\nbase_model: base\n"
                                  "models:\n  - model: base\n  - model: a\ndtype: bfloat16\n")
    assert 'set out_dtype = "float32"' in script
    assert {t.dtype for t in out.values()} == {torch.float32}


def test_a_merge_of_the_base_alone_is_the_base(tmp_path):
    state = {"model.layers.0.mlp.up_proj.weight": torch.randn(6, 4)}
    write_hf_folder(tmp_path / "base", state)
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    script, out = convert_and_run(tmp_path, "merge_method: task_arithmetic\nbase_model: base\n"
                                  "models:\n  - model: base\n    parameters: {weight: 1.0}\n")
    assert script.rstrip().endswith("output base")
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"],
                       state["model.layers.0.mlp.up_proj.weight"])
