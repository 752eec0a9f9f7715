"""lora("adapter"): a PEFT LoRA adapter as the task vector it adds to its model.

The reference is PEFT itself: adapters are made by PEFT here, on tiny transformers
models, and `model("base") + lora("adapter")` must be what PEFT's `merge_and_unload`
makes of the base, and load back with transformers."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

import mergelang
from mergelang.execute import run_tensor
from mergelang.io.lora import exact_product, factors, grid_bits
from mergelang.io.read import open_model
from mergelang.io.sources import key_options, split_key
from mergelang.repl import Repl
from mergelang.schedule import schedule
from mergelang.session import Session
from mergelang.syntax import parse, parse_expression
from tests.helpers import (
    assert_error,
    assert_nothing_written,
    at,
    ref_ties,
    run,
    run_all,
    write,
)
from tests.helpers import mergelang as cli

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
ADAPTERS = {
    # rsLoRA, an embedding adapted (PEFT then saves its base layer too), lm_head saved whole
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, modules_to_save=["lm_head"],
                   target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    # per-module ranks and alphas
    "patterns": dict(r=2, lora_alpha=16, rank_pattern={"q_proj": 3}, alpha_pattern={"v_proj": 5},
                     target_modules=["q_proj", "v_proj", "up_proj"]),
}


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def save_model(folder: Path, config, seed: int) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _quiet(model.save_pretrained, folder)
    return folder


def make_adapter(base: Path, folder: Path, seed: int, **settings) -> Path:
    """A PEFT adapter on `base`, its weights random as after training (PEFT starts B,
    or an embedding's A, at zero), saved by PEFT."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    adapted = _quiet(peft.get_peft_model, model, peft.LoraConfig(**settings))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    _quiet(adapted.save_pretrained, folder)
    return folder


def peft_merged(base: Path, adapter: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return _quiet(peft.PeftModel.from_pretrained, model, adapter).merge_and_unload()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """base (a tiny Llama), two adapters on it, a full fine-tune c, a GPT-2 (whose Conv1D
    layers store weights transposed) with an adapter and one with biases (lora_bias), a
    wider Llama, and a Llama with attention biases and a lora_bias adapter."""
    root = tmp_path_factory.mktemp("lora")
    base = save_model(root / "base", transformers.LlamaConfig(**LLAMA), 0)
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        make_adapter(base, root / name, 10 + i, **settings)
    fine = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for p in fine.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    _quiet(fine.save_pretrained, root / "c")
    gpt2 = save_model(root / "gpt2", transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32), 1)
    make_adapter(gpt2, root / "gpt2_adapter", 20, r=4, lora_alpha=6, fan_in_fan_out=True,
                 target_modules=["c_attn", "c_fc"])
    make_adapter(gpt2, root / "gpt2_bias", 21, r=2, lora_alpha=5, fan_in_fan_out=True,
                 lora_bias=True, target_modules=["c_attn", "c_proj"])
    biased = save_model(root / "biased", transformers.LlamaConfig(**LLAMA, attention_bias=True), 3)
    make_adapter(biased, root / "biased_adapter", 31, r=2, lora_alpha=3, use_rslora=True,
                 lora_bias=True, rank_pattern={"k_proj": 3}, alpha_pattern={"v_proj": 7},
                 target_modules=["q_proj", "k_proj", "v_proj"])
    wide = save_model(root / "wide", transformers.LlamaConfig(**{**LLAMA, "hidden_size": 48}), 2)
    make_adapter(wide, root / "wide_adapter", 30, r=4, lora_alpha=8,
                 target_modules=["q_proj", "v_proj"])
    return root


@pytest.mark.parametrize("base,adapter", [("base", "rslora"), ("base", "patterns"),
                                          ("gpt2", "gpt2_adapter"), ("gpt2", "gpt2_bias"),
                                          ("biased", "biased_adapter")])
def test_base_plus_lora_is_pefts_merge_and_unload(models, tmp_path, capsys, base, adapter):
    script = write(tmp_path, f'output model("{models / base}") + lora("{models / adapter}")\n')
    out = tmp_path / "merged"
    assert run(capsys, script, out).code == 0
    written = load_file(str(out / "model.safetensors"))
    merged = peft_merged(models / base, models / adapter)
    want = merged.state_dict()
    original = load_file(str(models / base / "model.safetensors"))
    assert set(written) == set(original)
    changed = [n for n in written if not torch.equal(written[n], original[n])]
    assert len(changed) >= 4  # the adapter changed something; each change is PEFT's
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, want[name], msg=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits)


def test_adapters_and_a_full_fine_tune_merge_alike(models, tmp_path):
    """ties over two adapters and a fine-tune: mergekit's TIES closed form over the
    models PEFT merges (base + adapter) and the fine-tune."""
    base = models / "base"
    script = write(tmp_path, f"""
base = model("{base}")
output base + ties(lora("{models / 'rslora'}"), lora("{models / 'patterns'}"),
                   model("{models / 'c'}") - base, density=0.2)
""")
    with mergelang.load(script).plan() as p:
        got = run_all(p, budget=10**9)
    fulls = [peft_merged(base, models / "rslora").state_dict(),
             peft_merged(base, models / "patterns").state_dict(),
             load_file(str(models / "c" / "model.safetensors"))]
    original = load_file(str(base / "model.safetensors"))
    for name, tensor in got.items():
        want = ref_ties(original[name], [f[name] for f in fulls], [1, 1, 1], 0.2)
        torch.testing.assert_close(tensor, want, rtol=0, atol=1e-5, msg=name)


def test_the_bytes_do_not_depend_on_the_chunks_or_the_threads(models):
    """A delta computed a row at a time on 2 threads is the one computed whole on 1:
    adapted linear layers, an adapted embedding (transposed) and saved modules."""
    script = (f'base = model("{models / "base"}")\n'
              f'output base + lora("{models / "rslora"}") - 0.5 * lora("{models / "patterns"}")\n')
    threads = torch.get_num_threads()
    with mergelang.compile(script).plan() as p:
        assert max(len(k.chunks) for k in schedule(p, 1)) == 64  # the vocabulary's rows
        try:
            torch.set_num_threads(1)
            whole = run_all(p, budget=10**9)
            torch.set_num_threads(2)
            rows = run_all(p, budget=1)
        finally:
            torch.set_num_threads(threads)
    assert whole.keys() == rows.keys()
    assert all(torch.equal(whole[name], rows[name]) for name in whole)


@pytest.mark.parametrize("rank", [1, 4, 16, 64, 300])
def test_the_product_of_the_factors_is_exact(rank):
    """B @ A of the factors is the exact sum of the products (math.fsum, exact when the
    sum is a float64), so no order of addition can change it, even for factors spanning
    many orders of magnitude; the factors keep float32's bits of each row's (column's)
    largest entries, and the rank components' scales are balanced exactly."""
    g = torch.Generator().manual_seed(rank)
    b = torch.randn(7, rank, generator=g) * torch.logspace(-20, 20, rank) ** torch.rand(7, 1)
    a = torch.randn(rank, 5, generator=g) * torch.logspace(9, -12, rank).unsqueeze(1)
    fb, fa = factors(b, a)
    product = fb @ fa
    for i in range(7):
        for j in range(5):
            assert product[i, j].item() == math.fsum(
                fb[i, k].item() * fa[k, j].item() for k in range(rank))
    assert torch.equal(exact_product(fb, fa), product.float())
    bits = min(grid_bits(rank))
    assert bits >= (24 if rank <= 32 else 22)
    # an adapter's factors, whose rank components' scales differ between B and A
    scales = torch.logspace(-8, 8, rank).unsqueeze(0)
    b = torch.randn(7, rank, generator=g) * scales
    a = torch.randn(rank, 5, generator=g) / scales.t()
    fb, fa = factors(b, a)
    exact = b.double() @ a.double()
    bound = 2.0 ** (4 - bits) * (b.double().abs() @ a.double().abs())
    assert ((exact_product(fb, fa).double() - exact).abs() <= bound).all()


def test_an_adapter_alone_is_its_delta_and_zero_elsewhere(models):
    base, adapter = models / "base", models / "patterns"
    script = f'output 2 * lora("{adapter}") + 0 * model("{base}")\n'
    with mergelang.compile(script).plan() as p:
        got = run_all(p, budget=1)
    merged = peft_merged(base, adapter).state_dict()
    original = load_file(str(base / "model.safetensors"))
    for name, tensor in got.items():
        delta = merged[name] - original[name]
        torch.testing.assert_close(tensor, 2 * delta, msg=name)
        if "q_proj" not in name and "v_proj" not in name and "up_proj" not in name:
            assert not tensor.any(), name


# rsLoRA with a rank and an alpha pattern (biased_adapter), and plain LoRA (gpt2_bias)
BIAS_SCALES = {"biased_adapter": {"q_proj": 3 / math.sqrt(2), "k_proj": 3 / math.sqrt(3),
                                  "v_proj": 7 / math.sqrt(2)},
               "gpt2_bias": {"c_attn": 5 / 2, "c_proj": 5 / 2}}


@pytest.mark.parametrize("base,adapter", [("gpt2", "gpt2_bias"), ("biased", "biased_adapter")])
def test_lora_bias_moves_each_targeted_bias_by_scale_times_lora_b_bias(models, base,
                                                                         adapter):
    """With lora_bias, M + lora(...) adds scale * lora_B.bias to a targeted module's bias,
    bit for bit what PEFT's merge_and_unload makes of it; every other bias stays M's."""
    script = f'output model("{models / base}") + lora("{models / adapter}")\n'
    with mergelang.compile(script).plan() as p:
        got = run_all(p, budget=1)
    merged = peft_merged(models / base, models / adapter).state_dict()
    original = load_file(str(models / base / "model.safetensors"))
    stored = load_file(str(models / adapter / "adapter_model.safetensors"))
    moved = set()
    for name in (n for n in got if n.endswith(".bias")):
        assert torch.equal(got[name], merged[name]), name
        lora_b = stored.get("base_model.model." + name.removesuffix(".bias") + ".lora_B.bias")
        if lora_b is None:
            assert torch.equal(got[name], original[name]), name
            continue
        scale = BIAS_SCALES[adapter][name.split(".")[-2]]
        torch.testing.assert_close(got[name] - original[name], lora_b * scale, msg=name)
        moved.add(name)
    assert len(moved) == sum(k.endswith("lora_B.bias") for k in stored) >= 4


def test_extract_of_a_biased_model_then_lora_gives_the_fine_tune_back(tmp_path, capsys):
    """`mergelang extract` of a GPT-2 fine-tune (every Conv1D has a bias, so the adapter
    has lora_bias) then model(BASE) + lora(ADAPTER): the fine-tune, a factorised weight
    up to exactly the error extraction reports, biases and kept tensors to float32
    rounding; and the same as PEFT's merge of the adapter."""
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=8, n_layer=2, n_head=2, vocab_size=20, n_positions=8))
    _quiet(gpt2.save_pretrained, tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gpt2.parameters():
            if p.dim() == 2:  # a rank-3 change and noise: rank 2 loses some of it
                p += torch.randn(p.shape[0], 3, generator=g) @ torch.randn(
                    3, p.shape[1], generator=g) * 0.05
                p += 0.001 * torch.randn(p.shape, generator=g)
            else:
                p += 0.05 * torch.randn(p.shape, generator=g)
    _quiet(gpt2.save_pretrained, tmp_path / "ft")
    capsys.readouterr()
    made = cli(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base", "--rank", 2,
               "-o", tmp_path / "adapter", "--json")
    assert made.code == 0, made.text
    report = json.loads(next(x for x in made.text.splitlines() if x.startswith("{")))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["lora_bias"]
    assert report["dropped"] == []
    script = write(tmp_path, 'output model("base") + lora("adapter")\n')
    result = run(capsys, script, tmp_path / "back")
    assert result.code == 0, result.text
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    fine = load_file(str(tmp_path / "ft" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    errors = {t["name"]: t["error"] for t in report["tensors"]}
    biases = {n for n in back if n.removesuffix(".bias") + ".weight" in errors}
    assert len(errors) == len(biases) == 8 and set(back) == set(fine)
    for name, weight in back.items():
        if name in errors:
            lost = torch.linalg.norm(weight - fine[name]) / torch.linalg.norm(fine[name]
                                                                             - base[name])
            assert float(lost) == pytest.approx(errors[name], rel=1e-3), name
            assert errors[name] > 1e-3  # rank 2 of a rank-3 change: something is lost
        else:
            assert torch.allclose(weight, fine[name], atol=1e-6), name
            assert name not in biases or not torch.equal(weight, base[name]), name
    merged = peft_merged(tmp_path / "base", tmp_path / "adapter").state_dict()
    for name, weight in back.items():
        torch.testing.assert_close(weight, merged[name], msg=name)


def test_the_donor_is_a_model_never_an_adapter(models, tmp_path, capsys):
    script = write(tmp_path, f'output lora("{models / "rslora"}") + model("{models / "base"}")\n')
    out = tmp_path / "merged"
    assert run(capsys, script, out).code == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    bad = write(tmp_path, f'a = lora("{models / "rslora"}")\nset donor = a\n'
                f'output model("{models / "base"}") + a\n', "donor.merge")
    assert_error(cli(capsys, "check", bad), at(bad, 2, 13), "a", "donor must name a model",
                 "lora(...)")


@pytest.mark.parametrize("base,source", [("base", "rslora"), ("biased", "biased_adapter")])
def test_check_reads_headers_only(models, tmp_path, capsys, base, source):
    """check opens the adapter and plans against the model without reading a tensor:
    the adapter's data can be garbage (its header intact), and check still succeeds."""
    adapter = shutil.copytree(models / source, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    raw[8 + length:] = b"\xff" * (len(raw) - 8 - length)  # every weight is NaN
    weights.write_bytes(bytes(raw))
    script = write(tmp_path, f'output model("{models / base}") + lora("{adapter}")\n')
    result = cli(capsys, "check", script)
    assert result.code == 0, result.text
    assert "ok:" in result.text
    # what a run reads: the model, and every tensor of this adapter once (no zeros)
    with open_model(models / base) as m, open_model(weights) as w:
        read = sum(t.nbytes for t in m.tensors.values()) + sum(
            t.nbytes for t in w.tensors.values())
    assert mergelang.load(script).check().input_bytes == read


# --- the REPL -------------------------------------------------------------------------


def test_the_repl_attaches_an_adapter_to_the_sessions_model(models, tmp_path):
    base, adapter = models / "base", models / "rslora"
    session = Session(tmp_path / "session.merge")
    try:
        with pytest.raises(mergelang.MergeError) as caught:
            session.define(parse(f'a = lora("{adapter}")\n'))
        assert "no model(...) to take its tensor names" in caught.value.render()
        session.define(parse(f'b = model("{base}")\n'))
        session.define(parse(f'a = lora("{adapter}")\n'))
        want = peft_merged(base, adapter).state_dict()
        for expr in ("b + a", "a + b"):
            lowered = session.lower(parse_expression(expr).statements[0].value)
            names = ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight",
                     "lm_head.weight", "model.norm.weight"]
            p = session.plan(lowered, names=names)
            for t in p.tensors:
                got = session.compute(p, t).to(t.out_dtype)
                torch.testing.assert_close(got, want[t.name], msg=t.name)
            lowered = session.lower(parse_expression("a").statements[0].value)
            p = session.plan(lowered, names=names)
            assert all(torch.equal(session.compute(p, t), run_tensor(p, t))
                       for t in p.tensors)
    finally:
        session.close()


def test_the_repl_shows_an_adapter(models):
    console = Console(record=True, width=200, force_terminal=False)
    base, adapter = models / "base", models / "patterns"
    lines = iter([f'a = lora("{adapter}")', f'b = model("{base}")', f'a = lora("{adapter}")',
                  ":tensor layers.1.self_attn.q_proj", "a", "(b + a) - b"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    assert Repl(None, console, read).loop() == 0
    text = console.export_text()
    assert "no model(...) to take its tensor names and shapes from" in text
    assert "current tensor: model.layers.1.self_attn.q_proj.weight" in text
    assert text.count("shape [32, 32]") == 2 and "Traceback" not in text


# --- adapters that do not fit, or are not adapters ----------------------------------


def _broken(models: Path, tmp_path: Path, change, adapter: str = "patterns") -> Path:
    """A copy of an adapter ("patterns") with `change(config, tensors)` applied."""
    folder = shutil.copytree(models / adapter, tmp_path / "broken")
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    change(config, tensors)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def _rename(old: str, new: str):
    def change(config, tensors):
        for key in [k for k in tensors if old in k]:
            tensors[key.replace(old, new)] = tensors.pop(key)
    return change


def _biases(config: bool = True, **lengths: int):
    """A lora_B.bias for every lora_B (of B's rows, or `lengths[module's last name]`),
    and lora_bias set in the config unless config=False."""
    def change(c, t):
        if config:
            c["lora_bias"] = True
        for key in [k for k in t if k.endswith(".lora_B.weight")]:
            rows = lengths.get(key.split(".")[-3], t[key].shape[0])
            t[key.removesuffix(".weight") + ".bias"] = torch.ones(rows)
    return change


Q = "base_model.model.model.layers.0.self_attn.q_proj"
BAD_ADAPTERS = {
    "rank mismatch": (lambda c, t: t.update({f"{Q}.lora_B.weight": torch.zeros(32, 2)}),
                      ["ranks of 'model.layers.0.self_attn.q_proj'", "lora_A is [3, 32]",
                       "lora_B is [32, 2]"]),
    "rank not the config's": (lambda c, t: c.update(rank_pattern={}),
                              ["have rank 3", "adapter_config.json gives it rank 2"]),
    "B without A": (lambda c, t: t.pop(f"{Q}.lora_A.weight"),
                    ["holds lora_B", "but no lora_A"]),
    "a target the model lacks": (_rename("layers.1.", "layers.7."),
                                 ["adapts 'model.layers.7.", "has no tensor 'model.layers.7."]),
    "a target the config does not name": (lambda c, t: c.update(target_modules=["v_proj"]),
                                          ["which target_modules", "does not name"]),
    "shapes that do not fit": (lambda c, t: t.update({f"{Q}.lora_A.weight": torch.zeros(3, 48)}),
                               ["makes [32, 48]", "is [32, 32]"]),
    "a tensor that is no LoRA weight": (lambda c, t: t.update(
        {f"{Q}.lora_magnitude_vector.weight": torch.zeros(32)}), ["neither a LoRA weight"]),
    "malformed r": (lambda c, t: c.update(r="four"), ['"r" in', "positive integer"]),
    "no r": (lambda c, t: c.pop("r"), ['has no "r"']),
    "DoRA": (lambda c, t: c.update(use_dora=True), ["sets use_dora", "cannot merge yet"]),
    "trainable tokens": (lambda c, t: c.update(trainable_token_indices=[3, 5]),
                         ["sets trainable_token_indices"]),
    "another PEFT method": (lambda c, t: c.update(peft_type="IA3"), ["'IA3' adapter"]),
    "malformed target_modules": (lambda c, t: c.update(target_modules=3),
                                 ['"target_modules"', "a list of module names"]),
    "a LoRA bias the config does not set": (_biases(config=False),
                                            ["holds lora_B.bias for", "does not set lora_bias",
                                             "PEFT would leave it out"]),
    "malformed lora_bias": (lambda c, t: c.update(lora_bias="yes"),
                            ['"lora_bias" in', "must be true or false, not 'yes'"]),
    "lora_bias without the biases": (lambda c, t: c.update(lora_bias=True),
                                     ["sets lora_bias", "holds no lora_B.bias for"]),
    "a bias of another length than B's rows": (_biases(q_proj=5), [
        "lora_B.bias of 'model.layers.", "_proj' in", "is [5]", "one entry per row, [32]"]),
    "a bias without its A and B": (lambda c, t: t.update(
        {Q.replace("layers.0", "layers.5") + ".lora_B.bias": torch.zeros(32)}),
        ["holds lora_B.bias for 'model.layers.5.self_attn.q_proj' but no lora_A or lora_B"]),
    "a bias that is no vector": (
        lambda c, t: t.update({f"{Q}.lora_B.bias": torch.zeros(32, 2)}),
        ["lora_B.bias' in", "is [32, 2]", "LoRA biases are float vectors"]),
    "lora_bias on modules without a bias": (_biases(), [
        "with a bias (lora_bias)", "has no tensor 'model.layers.", "_proj.bias'",
        "PEFT cannot merge it either"]),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_a_bad_adapter_is_a_located_error(models, tmp_path, capsys, case):
    change, words = BAD_ADAPTERS[case]
    adapter = _broken(models, tmp_path, change)
    script = write(tmp_path, f'base = model("{models / "base"}")\n'
                   f'output base + lora("{adapter}")\n')
    out = tmp_path / "out"
    for result in (cli(capsys, "check", script), run(capsys, script, out)):
        assert_error(result, at(script, 2, 20), f'"{adapter}"', *words)
    assert_nothing_written(out)


def test_lora_bias_on_a_module_without_a_bias_is_a_located_error(models, tmp_path, capsys):
    """PEFT saves a lora_bias adapter on layers without a bias (with a warning), but its
    merge fails; lora() refuses it at the call, from the headers."""
    base = models / "base"
    adapter = make_adapter(base, tmp_path / "adapter", 40, r=2, lora_bias=True,
                           target_modules=["q_proj"])
    with pytest.raises(RuntimeError, match="base layer has no bias"):
        peft_merged(base, adapter)
    script = write(tmp_path, f'base = model("{base}")\noutput base + lora("{adapter}")\n')
    out = tmp_path / "out"
    for result in (cli(capsys, "check", script), run(capsys, script, out)):
        assert_error(result, at(script, 2, 20), f'"{adapter}"', "adapts 'model.layers.",
                     "with a bias (lora_bias)", "has no tensor 'model.layers.",
                     "q_proj.bias'", hint="train it again without lora_bias")
    assert_nothing_written(out)


def test_lora_bias_with_an_adapted_embedding_is_a_located_error(models, tmp_path, capsys):
    """PEFT gives an embedding's adapter no bias and refuses lora_bias there, so it
    cannot load such an adapter; lora() says so at the call."""
    adapter = _broken(models, tmp_path, _biases(), "rslora")
    with pytest.raises(ValueError, match="lora_bias=True is not supported for Embedding"):
        peft_merged(models / "base", adapter)
    script = write(tmp_path, f'base = model("{models / "base"}")\n'
                   f'output base + lora("{adapter}")\n')
    assert_error(cli(capsys, "check", script), at(script, 2, 20), f'"{adapter}"',
                 "sets lora_bias", "'model.embed_tokens' is an adapted embedding",
                 hint="without lora_bias")


def test_a_bias_of_another_shape_than_the_models_is_a_located_error(models, tmp_path, capsys):
    base = shutil.copytree(models / "biased", tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    name = "model.layers.1.self_attn.v_proj.bias"
    tensors[name] = tensors[name][:7].clone()
    save_file(tensors, str(base / "model.safetensors"), {"format": "pt"})
    adapter = models / "biased_adapter"
    script = write(tmp_path, f'base = model("{base}")\noutput base + lora("{adapter}")\n')
    assert_error(cli(capsys, "check", script), at(script, 2, 20), f'"{adapter}"',
                 "adapts 'model.layers.1.self_attn.v_proj' with a bias (lora_bias) of shape "
                 "[16]", f"but '{name}' of", "is [7] (float32)")


def _no_config(folder: Path) -> None:
    (folder / "adapter_config.json").unlink()


def _pickled(folder: Path) -> None:
    weights = folder / "adapter_model.safetensors"
    weights.rename(folder / "adapter_model.bin")


def _not_json(folder: Path) -> None:
    (folder / "adapter_config.json").write_text("{r: 4")


BAD_FOLDERS = {
    "missing": (lambda f: shutil.rmtree(f), ["adapter path", "does not exist"], None),
    "no config": (_no_config, ["has no adapter_config.json"], "adapter_config.json beside"),
    "pickled weights": (_pickled, ["no adapter_model.safetensors", "pickled"],
                        "safe_serialization=True"),
    "config not JSON": (_not_json, ["not valid JSON"], None),
    "truncated weights": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10" * 12),
                          ["truncated"], None),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_a_damaged_adapter_folder_is_a_located_error(models, tmp_path, capsys, case):
    change, words, hint = BAD_FOLDERS[case]
    adapter = shutil.copytree(models / "patterns", tmp_path / "adapter")
    change(adapter)
    base = models / "base"
    script = write(tmp_path, f'output model("{base}") + lora("{adapter}")\n')
    column = len(f'output model("{base}") + lora(') + 1
    assert_error(cli(capsys, "check", script), at(script, 1, column), f'"{adapter}"', *words,
                 hint=hint)


def test_inputs_that_are_not_adapters_are_located_errors(models, tmp_path, capsys):
    base = models / "base"
    cases = {
        f'lora("{base}")': ["is not a LoRA adapter", "name it with model(...)"],
        f'lora("{base / "model.safetensors"}")': ["is a file", "takes a PEFT adapter folder"],
        f'lora("{models / "wide_adapter"}")': ["which makes [", ", 48]", "but"],
    }
    for i, (call, words) in enumerate(cases.items()):
        script = write(tmp_path, f'output model("{base}") + {call}\n', f"s{i}.merge")
        assert_error(cli(capsys, "check", script), None, call[5:-1], *words)
    alone = write(tmp_path, f'output lora("{models / "rslora"}")\n', "alone.merge")
    assert_error(cli(capsys, "check", alone), at(alone, 1, 13), None, "no model(...)",
                 hint='model("base") + lora("adapter")')


# --- base=: the model an adapter is measured against -----------------------------------


@pytest.fixture(scope="module")
def on_c(models) -> Path:
    """An adapter PEFT made on the fine-tune c (not on base), lm_head saved whole."""
    return make_adapter(models / "c", models / "on_c", 40, r=2, lora_alpha=4,
                        target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])


def test_base_names_the_model_an_adapter_with_saved_modules_is_measured_against(
        models, on_c, tmp_path, capsys):
    """The same adapter against each of two models: each half is PEFT's merge_and_unload
    of the adapter into that model (the saved lm_head replaces each model's own), so the
    two are two inputs; and no warning, as each names its base."""
    base, c = models / "base", models / "c"
    script = write(tmp_path, f'a = model("{base}")\nb = model("{c}")\n'
                   f'output 0.5 * (a + lora("{on_c}", base=a)) '
                   f'+ 0.5 * (b + lora("{on_c}", base=b))\n')
    out = tmp_path / "merged"
    result = run(capsys, script, out)
    assert result.code == 0 and "warning:" not in result.text, result.text
    written = load_file(str(out / "model.safetensors"))
    on_base = peft_merged(base, on_c).state_dict()
    on_fine = peft_merged(c, on_c).state_dict()
    assert set(written) == set(on_fine)
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, 0.5 * on_base[name] + 0.5 * on_fine[name],
                                   msg=name)
    saved = load_file(str(on_c / "adapter_model.safetensors"))
    head = next(t for n, t in saved.items() if "lm_head" in n)
    assert torch.equal(on_fine["lm_head.weight"], head)  # PEFT: the saved module, whole
    assert mergelang.load(script).check().warnings == ()


def test_an_adapter_with_saved_modules_on_a_second_model_needs_base(models, on_c, tmp_path,
                                                                    capsys):
    """Without base= the saved lm_head is measured against the first model: check warns,
    at the lora call, and says how to name the other; with base= the result is PEFT's."""
    base, c = models / "base", models / "c"
    text = (f'a = model("{base}")\nb = model("{c}")\n'
            f'output 0 * a + b + lora("{on_c}"{{}})\n')
    script = write(tmp_path, text.format(""))
    result = cli(capsys, "check", script)
    assert result.code == 0, result.text
    column = len('output 0 * a + b + lora(') + 1
    assert f"warning: {on_c} saves modules whole (modules_to_save)" in result.text
    assert f"--> {at(script, 3, column)}\n" in result.text
    assert f"measured against the script's first model, {base}, not {c}" in result.text
    assert f'= help: if it was trained on another, name it, e.g. lora("{on_c}", ' \
        f'base=model("{c}"))' \
        in result.text
    with mergelang.load(script).plan() as p:
        got = run_all(p.only(["lm_head.weight"]), budget=10**9)
    want = peft_merged(c, on_c).state_dict()["lm_head.weight"]
    original = load_file(str(base / "model.safetensors"))["lm_head.weight"]
    fine = load_file(str(c / "model.safetensors"))["lm_head.weight"]
    torch.testing.assert_close(got["lm_head.weight"], fine + want - original)  # the default
    fixed = write(tmp_path, text.format(", base=b"), "fixed.merge")
    result = cli(capsys, "check", fixed)
    assert result.code == 0 and "warning:" not in result.text, result.text
    with mergelang.load(fixed).plan() as p:
        got = run_all(p, budget=10**9)
    for name, tensor in peft_merged(c, on_c).state_dict().items():
        torch.testing.assert_close(got[name], tensor, msg=name)


def test_no_warning_where_the_first_model_is_the_only_measure(models, on_c, tmp_path, capsys):
    base, c = models / "base", models / "c"
    cases = {  # one model; an adapter saving nothing, beside two models
        "one": f'output model("{c}") + lora("{on_c}")\n',
        "nothing saved": f'output model("{base}") + 0 * model("{c}") '
                         f'+ lora("{models / "patterns"}")\n',
    }
    for name, text in cases.items():
        result = cli(capsys, "check", write(tmp_path, text, f"{name}.merge"))
        assert result.code == 0 and "warning:" not in result.text, result.text


BAD_BASES = {  # base= value -> (the message's words, the hint's)
    'lora("ADAPTER")': (["base must be a model(...) of the script", "not lora(...)"],
                        'base=b, where b = model("b")'),
    "[a, b]": (["not a list of 2"], "base=b"),
    "1": (["not the number 1"], "base=b"),
    '"BASE"': (['not the string "BASE"'], 'base=model("BASE")'),
    "a - b": (["not a tensor computed from models"], "base=b"),
    "a.layers[0:1]": (["not a tensor computed from models"], "base=b"),
}


@pytest.mark.parametrize("value", BAD_BASES)
def test_a_bad_base_is_a_located_error(models, on_c, tmp_path, capsys, value):
    words, hint = BAD_BASES[value]
    value = value.replace("ADAPTER", str(models / "patterns")).replace("BASE", str(models / "c"))
    words = [w.replace("BASE", str(models / "c")) for w in words]
    hint = hint.replace("BASE", str(models / "c"))
    script = write(tmp_path, f'a = model("{models / "base"}")\nb = model("{models / "c"}")\n'
                   f'output b + lora("{on_c}", base={value})\n')
    out = tmp_path / "out"
    column = len(f'output b + lora("{on_c}", base=') + 1
    for result in (cli(capsys, "check", script), run(capsys, script, out)):
        assert_error(result, at(script, 3, column), value, *words, hint=hint)
    assert_nothing_written(out)


def test_base_is_a_keyword_of_lora_only(models, on_c, tmp_path, capsys):
    for i, call in enumerate([f'lora("{on_c}", a)', f'model("{models / "c"}", base=a)']):
        script = write(tmp_path, f'a = model("{models / "base"}")\noutput a + {call}\n',
                       f"s{i}.merge")
        words = ["takes 1 positional argument"] if i == 0 else ['no parameter "base"']
        assert_error(cli(capsys, "check", script), None, None, *words)


def test_the_repl_attaches_an_adapter_to_its_base(models, on_c, tmp_path):
    base, c = models / "base", models / "c"
    session = Session(tmp_path / "session.merge")
    try:
        session.define(parse(f'a = model("{base}")\nb = model("{c}")\n'))
        session.define(parse(f'x = lora("{on_c}", base=b)\n'))
        lowered = session.lower(parse_expression("b + x").statements[0].value)
        p = session.plan(lowered, names=["lm_head.weight",
                                         "model.layers.0.self_attn.q_proj.weight"])
        want = peft_merged(c, on_c).state_dict()
        for t in p.tensors:
            torch.testing.assert_close(session.compute(p, t).to(t.out_dtype), want[t.name])
    finally:
        session.close()


def test_an_adapters_key_holds_its_base(models, on_c, tmp_path):
    """One input per adapter and base: the same base however it is reached (a name, a
    second spelling of its path) is one input; another base is another."""
    base, c = models / "base", models / "c"
    script = write(tmp_path, f'a = model("{base}")\nb = model("{c}")\nalso = model("{c}/.")\n'
                   f'x = lora("{on_c}", base=b)\n'
                   f'output a + x + lora("{on_c}", base=also) + lora("{on_c}", base=a) '
                   f'+ lora("{on_c}")\n')
    keys = list(mergelang.load(script).lowered.models)
    adapters = [k for k in keys if split_key(k)[0] == "lora"]
    assert len(adapters) == 3
    assert {split_key(k)[1] for k in adapters} == {on_c.resolve()}
    assert [key_options(k).get("base") for k in adapters] == [str(c.resolve()),
                                                              str(base.resolve()), None]
    assert mergelang.load(script).lowered.models.keys() == set(keys)  # stable
