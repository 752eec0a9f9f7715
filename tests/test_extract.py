"""LoRA extraction (`extract_lora(...)`, `mergelang extract`): the error is the truncation
error Eckart-Young says is optimal, PEFT loads the adapter onto the base, the command
and the language form write the same bytes, and bad inputs are located diagnostics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergelang import MergeError, load
from mergelang.extraction.command import script
from mergelang.extraction.svd import factorise, rank_for_energy
from tests.helpers import (
    assert_error,
    assert_nothing_written,
    mergelang,
    run,
    underlined,
    write,
    write_hf_folder,
)

PREFIX = "base_model.model."


def low_rank_plus_noise(shape: tuple[int, int], rank: int, noise: float, seed: int
                        ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    spectrum = torch.linspace(3.0, 1.0, rank)
    signal = torch.randn(m, rank, generator=g) * spectrum @ torch.randn(rank, n, generator=g)
    return signal + noise * torch.randn(m, n, generator=g)


def pair(tmp_path: Path, deltas: dict[str, torch.Tensor], seed: int = 0) -> tuple[Path, Path]:
    """Folders base and ft (float32) with ft = base + delta on the 2-D tensors; 1-D
    tensors (norms) and the embeddings change too."""
    g = torch.Generator().manual_seed(100 + seed)
    base = {name: torch.randn(d.shape, generator=g) for name, d in deltas.items()}
    base["model.embed_tokens.weight"] = torch.randn(16, 8, generator=g)
    base["model.norm.weight"] = torch.ones(8)
    ft = {name: base[name] + d for name, d in deltas.items()}
    ft["model.embed_tokens.weight"] = base["model.embed_tokens.weight"] + 0.1
    ft["model.norm.weight"] = base["model.norm.weight"] * 1.5
    config = {"architectures": ["LlamaForCausalLM"]}
    return (write_hf_folder(tmp_path / "base", base, config),
            write_hf_folder(tmp_path / "ft", ft, config))


DELTAS = {
    "model.layers.0.mlp.up_proj.weight": low_rank_plus_noise((24, 10), 4, 0.05, 1),
    "model.layers.0.mlp.down_proj.weight": low_rank_plus_noise((10, 24), 4, 0.05, 2),
    "model.layers.0.self_attn.q_proj.weight": low_rank_plus_noise((12, 12), 6, 0.2, 3),
}


def extract(capsys, tmp_path: Path, *flags: object, out: str = "adapter") -> tuple[Path, dict]:
    capsys.readouterr()  # what came before (transformers' progress bars)
    result = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                       "-o", tmp_path / out, "--json", *flags)
    assert result.code == 0, result.text
    line = next(x for x in result.text.splitlines() if x.startswith("{"))
    return tmp_path / out, json.loads(line)


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float(torch.sqrt(torch.sum(s[rank:] ** 2)) / torch.linalg.norm(delta.double()))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_error_is_the_eckart_young_truncation_error(capsys, tmp_path, rank):
    pair(tmp_path, DELTAS)
    adapter, report = extract(capsys, tmp_path, "--rank", rank, "--svd", "exact")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    errors = {t["name"]: t["error"] for t in report["tensors"]}
    assert set(errors) == set(DELTAS)
    for name, delta in DELTAS.items():
        expected = optimal_error(delta, rank)
        assert errors[name] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        module = PREFIX + name.removesuffix(".weight")
        a, b = tensors[module + ".lora_A.weight"], tensors[module + ".lora_B.weight"]
        assert a.shape == (rank, delta.shape[1]) and b.shape == (delta.shape[0], rank)
        # the factors in the file make that error, measured here from them
        made = float(torch.linalg.norm(delta - b @ a) / torch.linalg.norm(delta))
        assert made == pytest.approx(expected, rel=1e-4, abs=1e-5)
    total = sum(float(torch.sum(d.double() ** 2)) for d in DELTAS.values())
    lost = sum(optimal_error(d, rank) ** 2 * float(torch.sum(d.double() ** 2))
               for d in DELTAS.values())
    assert report["overall_error"] == pytest.approx((lost / total) ** 0.5, rel=1e-4)


def test_randomised_svd_is_near_optimal_and_deterministic():
    delta = low_rank_plus_noise((300, 200), 8, 0.01, 7)
    exact = factorise(delta, 8, method="exact")
    sketched = factorise(delta, 8, method="randomised", seed=3, name="w")
    again = factorise(delta, 8, method="randomised", seed=3, name="w")
    assert sketched.method == "randomised" and exact.method == "exact"
    optimal = optimal_error(delta, 8)
    assert exact.error == pytest.approx(optimal, rel=1e-4)
    assert optimal * (1 - 1e-4) <= sketched.error <= optimal * 1.01
    assert torch.equal(sketched.a, again.a) and torch.equal(sketched.b, again.b)


def test_an_exactly_low_rank_delta_is_reconstructed_to_float32_precision(capsys, tmp_path):
    g = torch.Generator().manual_seed(5)
    deltas = {"model.layers.0.mlp.up_proj.weight":
              torch.randn(20, 3, generator=g) @ torch.randn(3, 14, generator=g)}
    pair(tmp_path, deltas)
    adapter, report = extract(capsys, tmp_path, "--rank", 3)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    module = PREFIX + "model.layers.0.mlp.up_proj"
    delta = deltas["model.layers.0.mlp.up_proj.weight"]
    rebuilt = tensors[module + ".lora_B.weight"] @ tensors[module + ".lora_A.weight"]
    assert torch.allclose(rebuilt, delta, rtol=0, atol=1e-5 * delta.abs().max())
    assert report["tensors"][0]["error"] < 1e-6


def test_energy_picks_the_smallest_rank_that_reaches_it(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    for energy in (0.5, 0.9, 0.99):
        _, report = extract(capsys, tmp_path, "--energy", energy, "--force")
        for t in report["tensors"]:
            s2 = torch.linalg.svdvals(DELTAS[t["name"]].double()) ** 2
            shares = torch.cumsum(s2, 0) / s2.sum()
            expected = int(torch.nonzero(shares >= energy)[0]) + 1
            assert t["rank"] == expected
            assert shares[t["rank"] - 1] >= energy and (t["rank"] == 1
                                                        or shares[t["rank"] - 2] < energy)
    assert rank_for_energy(torch.tensor([0.0]), 0.0, 0.9) == 1


def test_energy_with_a_rank_caps_it_and_peft_gets_the_ranks(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    adapter, report = extract(capsys, tmp_path, "--energy", 0.99, "--rank", 5)
    config = json.loads((adapter / "adapter_config.json").read_text())
    ranks = {t["name"].removesuffix(".weight"): t["rank"] for t in report["tensors"]}
    assert max(ranks.values()) <= 5 and config["r"] == max(ranks.values())
    assert config["lora_alpha"] == config["r"]
    assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
    assert config["alpha_pattern"] == config["rank_pattern"]


def tiny_llama(tmp_path: Path, bias: bool = False):
    """A tiny transformers Llama (base, saved with save_pretrained) and a fine-tune of it:
    every weight changed, the linear ones by a rank-3 delta plus noise."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False,
                         attention_bias=bias)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p += torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1],
                                                                          generator=g) * 0.05
                p += 0.001 * torch.randn(p.shape, generator=g)
            else:
                p += 0.05 * torch.randn(p.shape, generator=g)
    model.save_pretrained(tmp_path / "ft")
    return LlamaForCausalLM


@pytest.mark.parametrize("bias, keep", [(False, []), (True, ["--keep", "mlp"])])
def test_peft_loads_the_adapter_and_merges_to_base_plus_b_a(capsys, tmp_path, bias, keep):
    """With attention biases (and the unbiased MLP kept whole), a factorised module's bias
    delta rides in lora_B's bias."""
    from peft import PeftModel
    llama = tiny_llama(tmp_path, bias)
    adapter, report = extract(capsys, tmp_path, "--rank", 3, *keep)
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    base = llama.from_pretrained(tmp_path / "base", dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    fine = llama.from_pretrained(tmp_path / "ft", dtype=torch.float32).state_dict()
    assert set(merged) == set(before)
    assert config["lora_bias"] == bias and report["dropped"] == []
    errors = {t["name"]: t["error"] for t in report["tensors"]}
    factorised = set(errors)
    assert factorised == {n for n, v in before.items() if v.dim() == 2
                          and "embed_tokens" not in n and "lm_head" not in n
                          and not (keep and "mlp" in n)}
    scale = config["lora_alpha"] / config["r"]
    for name, weight in merged.items():
        module = PREFIX + name.removesuffix(".weight")
        if name in factorised:
            expected = before[name] + tensors[module + ".lora_B.weight"] \
                @ tensors[module + ".lora_A.weight"] * scale
        elif name.endswith(".bias"):
            expected = before[name] + tensors[PREFIX + name[:-5] + ".lora_B.bias"] * scale
            assert torch.allclose(expected, fine[name], atol=1e-6)
        else:  # kept whole: the fine-tune's weights
            expected = tensors[PREFIX + name]
            assert torch.allclose(expected, fine[name], atol=1e-6)
        assert torch.allclose(weight, expected, atol=1e-6), name
        if name in factorised:  # what the adapter misses of the fine-tune: the error reported
            lost = torch.linalg.norm(weight - fine[name]) / torch.linalg.norm(fine[name]
                                                                             - before[name])
            assert float(lost) == pytest.approx(errors[name], rel=1e-3, abs=1e-5)


def test_the_command_and_the_language_form_write_the_same_bytes(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    adapter, _ = extract(capsys, tmp_path, "--rank", 2, "--keep", "q_proj")
    text = 'output extract_lora(model("ft") - model("base"), rank=2, keep=["q_proj"])\n'
    result = run(capsys, write(tmp_path, text), tmp_path / "from_script")
    assert result.code == 0, result.text
    for name in ("adapter_model.safetensors", "adapter_config.json", "extraction.json"):
        assert (adapter / name).read_bytes() == (tmp_path / "from_script" / name).read_bytes()
    assert script("ft", "base", 2, keep=["q_proj"]) == text
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.q_proj" in config["modules_to_save"]
    assert "q_proj" not in config["target_modules"]
    # run again with --force: the previous adapter is recognised as mergelang's
    again = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                      "-o", adapter, "--rank", 1, "--force", "--quiet")
    assert again.code == 0, again.text


def test_a_merged_delta_is_extracted_without_writing_the_merge(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    text = ('base = model("base")\nft = model("ft")\n'
            'output extract_lora(0.5 * (ft - base) + 0.5 * (ft - base), rank=4)\n')
    result = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert result.code == 0, result.text
    report = json.loads((tmp_path / "out" / "extraction.json").read_text())
    for t in report["tensors"]:
        assert t["error"] == pytest.approx(optimal_error(DELTAS[t["name"]], 4), rel=1e-4)


# --- bad inputs: located, exit status 2, nothing written ------------------------------


@pytest.mark.parametrize("args, points_at, words", [
    ("rank=0", "0", "rank must be a whole number > 0"),
    ("rank=-2", "-2", "rank must be a whole number > 0"),
    ("rank=2.5", "2.5", "rank must be a whole number > 0"),
    ("rank=11", "11", "at most 10"),
    ("energy=1.5", "1.5", "energy must be a number in (0, 1]"),
    ('rank=2, svd="fast"', '"fast"', "svd must be one of"),
    ('rank=2, keep=["("]', '["("]', "bad regular expression"),
])
def test_bad_options_are_located(capsys, tmp_path, args, points_at, words):
    pair(tmp_path, DELTAS)
    path = write(tmp_path, f'output extract_lora(model("ft") - model("base"), {args})\n')
    result = run(capsys, path, tmp_path / "out")
    assert_error(result, None, points_at, words)
    assert_nothing_written(tmp_path / "out")


def test_a_rank_too_large_is_found_by_check_from_the_headers(tmp_path):
    pair(tmp_path, DELTAS)
    path = write(tmp_path, 'output extract_lora(model("ft") - model("base"), rank=11)\n')
    with pytest.raises(MergeError) as caught:
        load(path).check()
    message = str(caught.value)
    assert "rank 11 is more than tensor" in message and "at most 10" in message
    assert '_proj.weight" (10 x 24)' in message or '_proj.weight" (24 x 10)' in message


def test_the_command_rejects_a_bad_rank(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    for rank in ("0", "11"):
        result = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                           "--rank", rank, "-o", tmp_path / "out")
        assert_error(result, None, rank, "rank")
        assert_nothing_written(tmp_path / "out")


def test_models_of_different_shapes_are_located(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    other = {n: torch.zeros(3, 3) for n in DELTAS}
    write_hf_folder(tmp_path / "small", other)
    result = mergelang(capsys, "extract", tmp_path / "small", "--base", tmp_path / "base",
                       "--rank", 2, "-o", tmp_path / "out")
    assert_error(result, None, None, "model.layers.0")
    assert "shape" in result.text
    assert_nothing_written(tmp_path / "out")


def test_a_missing_folder_is_located(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    result = mergelang(capsys, "extract", tmp_path / "nowhere", "--base", tmp_path / "base",
                       "--rank", 2, "-o", tmp_path / "out")
    assert_error(result, None, str(tmp_path / "nowhere"), "nowhere")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("text, points_at", [
    ('output model("base") + extract_lora(model("ft") - model("base"), rank=2)\n',
     'extract_lora(model("ft") - model("base"), rank=2)'),
    ('x = extract_lora(model("ft") - model("base"), rank=2)\noutput x\n',
     'extract_lora(model("ft") - model("base"), rank=2)'),
])
def test_extract_lora_only_as_the_whole_output(capsys, tmp_path, text, points_at):
    pair(tmp_path, DELTAS)
    result = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_error(result, None, points_at, "must be the whole `output` expression",
                 hint="output extract_lora(")
    assert_nothing_written(tmp_path / "out")


def test_the_base_must_be_known(capsys, tmp_path):
    pair(tmp_path, DELTAS)
    text = 'output extract_lora(model("ft") * 0.5, rank=2)\n'
    result = run(capsys, write(tmp_path, text), tmp_path / "out")
    assert_error(result, None, None, "cannot tell which model", hint="base=model(")
    assert underlined(result.text).startswith("extract_lora(")
    assert_nothing_written(tmp_path / "out")
    text = 'output extract_lora(model("ft") * 0.5, rank=2, base=model("base"))\n'
    assert run(capsys, write(tmp_path, text), tmp_path / "out").code == 0


def test_the_benchmark_runs_without_mergekit(monkeypatch, tmp_path, capsys):
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    import importlib
    modules = ("extract", "run", "families", "io_floor")
    try:
        extract_bench = importlib.import_module("extract")
        argv = ["--workdir", str(tmp_path), "--hidden", "64", "--layers", "1", "--inter", "96",
                "--vocab", "128", "--n-ft", "1", "--ranks", "4", "--mergekit", "none"]
        assert extract_bench.main(argv) == 0
    finally:
        for name in modules:
            sys.modules.pop(name, None)
    printed = capsys.readouterr().out
    assert "mergekit-extract-lora not found" in printed and "| mergelang | 4" in printed
    results = json.loads((tmp_path / "extract_results.json").read_text())
    assert [r["tool"] for r in results["runs"]] == ["mergelang"]
    # the benchmark's error, measured from the adapter's files, is the one mergelang reports
    report = json.loads((tmp_path / "extract-mergelang-r4" / "extraction.json").read_text())
    assert results["quality"]["mergelang-r4"]["overall"] == pytest.approx(
        report["overall_error"], rel=1e-3)


def test_extract_then_lora_input_gives_the_fine_tune_back(capsys, tmp_path):
    """model(BASE) + lora(ADAPTER) is the fine-tune, up to exactly the error reported."""
    pair(tmp_path, DELTAS)
    adapter, report = extract(capsys, tmp_path, "--rank", 3)
    errors = {t["name"]: t["error"] for t in report["tensors"]}
    text = f'output model("base") + lora("{adapter.name}")\n'
    result = run(capsys, write(tmp_path, text), tmp_path / "back")
    assert result.code == 0, result.text
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    fine = load_file(str(tmp_path / "ft" / "model.safetensors"))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    assert set(back) == set(fine)
    for name, weight in back.items():
        if name in errors:
            lost = torch.linalg.norm(weight - fine[name]) / torch.linalg.norm(fine[name]
                                                                             - base[name])
            assert float(lost) == pytest.approx(errors[name], rel=1e-3)
        else:
            assert torch.allclose(weight, fine[name], atol=1e-6), name


def test_biases_peft_cannot_carry_are_dropped_with_a_warning(capsys, tmp_path):
    """Llama's attention biases without MLP biases: lora_bias would break merging the MLP."""
    tiny_llama(tmp_path, bias=True)
    capsys.readouterr()
    result = mergelang(capsys, "extract", tmp_path / "ft", "--base", tmp_path / "base",
                       "--rank", 2, "-o", tmp_path / "adapter")
    assert result.code == 0, result.text
    report = json.loads((tmp_path / "adapter" / "extraction.json").read_text())
    assert len(report["dropped"]) == 8 and all(n.endswith("_proj.bias") for n in report["dropped"])
    assert "warning: 8 tensors are not in the adapter" in result.text
    assert "8 are biases of factorised modules" in result.text and "--keep" in result.text
    assert "cannot be carried" not in result.text
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_bias"] is False
    names = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert not any(n.endswith(".bias") for n in names)


def test_an_expression_or_the_repl_refuses_extract_lora(tmp_path):
    """An adapter is what a script's run writes; in memory there is nothing to write it to."""
    import mergelang
    from mergelang.session import Session
    from mergelang.syntax import parse_expression
    with pytest.raises(MergeError) as caught:
        mergelang.evaluate("extract_lora(a - b, rank=1)", a=torch.ones(3, 3),
                           b=torch.zeros(3, 3))
    assert "writes an adapter folder, which an expression cannot" in str(caught.value)
    pair(tmp_path, DELTAS)
    session = Session(tmp_path / "repl.merge")
    line = parse_expression('extract_lora(model("ft") - model("base"), rank=1)',
                            "<repl>").statements[-1].value
    with pytest.raises(MergeError) as caught:
        session.lower(line)
    assert "which the REPL cannot" in str(caught.value)


def test_a_delta_computed_in_row_blocks_gives_the_same_adapter(capsys, tmp_path):
    """Under a small --max-memory a tensor reaches the sink in row blocks; the sink puts
    them together before the SVD, so the adapter is the same bytes."""
    pair(tmp_path, DELTAS)
    path = write(tmp_path, 'output extract_lora(model("ft") - model("base"), rank=3)\n')
    assert run(capsys, path, tmp_path / "whole").code == 0
    result = run(capsys, path, tmp_path / "blocks", "--max-memory", "600B")
    assert result.code == 0, result.text
    for name in ("adapter_model.safetensors", "extraction.json"):
        assert (tmp_path / "whole" / name).read_bytes() == \
            (tmp_path / "blocks" / name).read_bytes()
