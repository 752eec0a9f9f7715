"""Helpers shared by the test modules: model files made on the spot, scripts compiled in
a temporary folder, and runs of a plan at several chunkings and orders."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelang import Program, load
from mergelang.cli import main
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


def compile_in(tmp_path: Path, script: str, **models: dict) -> Program:
    """`script` saved in tmp_path beside the models given as state dicts, and compiled."""
    for name, state in models.items():
        write_model(tmp_path / name, state)
    path = tmp_path / "script.merge"
    path.write_text(script)
    return load(path)


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


# --- the command line, as a user runs it: exit status and what it printed --------------


@dataclass
class Result:
    code: int
    text: str  # stdout and stderr together


def mergelang(capsys: pytest.CaptureFixture, *args: object) -> Result:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return Result(code, captured.out + captured.err)


def write(tmp_path: Path, text: str, name: str = "merge.merge") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def at(script: Path, line: int, col: int) -> str:
    return f"{script}:{line}:{col}"


def underlined(text: str) -> str:
    """The source text under the first caret line of a rendered diagnostic."""
    lines = text.splitlines()
    for source, carets in zip(lines, lines[1:], strict=False):
        if re.fullmatch(r" +\| *\^+", carets):
            return source[carets.index("^"):carets.rindex("^") + 1]
    raise AssertionError(f"no caret line in:\n{text}")


def assert_error(result: Result, where: str | None, points_at: str | None, *words: str,
                 hint: str | None = None) -> None:
    """Exit status 2; `error:` at `where` with the caret under `points_at`; every one of
    `words` in the output; `hint` in a `= help:` line; no traceback."""
    text = result.text
    assert result.code == 2, text
    assert "Traceback" not in text
    assert "error: " in text, text
    if where is not None:
        assert f"--> {where}\n" in text, text
    if points_at is not None:
        assert underlined(text) == points_at, text
    for word in words:
        assert word in text, f"{word!r} not in:\n{text}"
    if hint is not None:
        helps = [line for line in text.splitlines() if line.strip().startswith("= help:")]
        assert any(hint in line for line in helps), f"hint {hint!r} not in:\n{text}"


def run(capsys: pytest.CaptureFixture, script: Path, out: Path, *flags: str) -> Result:
    return mergelang(capsys, "run", script, "-o", out, "--quiet", *flags)


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() and not out.is_symlink()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


# --- closed forms of mergekit 0.1.5's TIES, written independently ---------------------


def ref_trim(d: torch.Tensor, density: float) -> torch.Tensor:
    flat = d.flatten()
    k = max(1, int(density * flat.numel())) if density > 0 else 0
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    mask = torch.zeros_like(flat)
    mask[order[:k]] = 1
    return (flat * mask).view_as(d)


def ref_consensus(weighted: torch.Tensor, w: torch.Tensor, normalize: bool) -> torch.Tensor:
    """mergekit's sign-consensus merge of stacked, weighted deltas."""
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == elected
    merged = (weighted * mask).sum(0)
    if normalize:
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
        merged = merged / divisor
    return merged


def ref_ties(base, models, weights, density, normalize=True, lam=1.0):
    deltas = torch.stack([ref_trim(m - base, density) for m in models])
    w = torch.tensor(weights, dtype=base.dtype).view(-1, *[1] * base.dim())
    return base + lam * ref_consensus(deltas * w, w, normalize)


# --- a sweep whose scores are known: `base + lam * (a - base)` is `lam` everywhere ---


SWEEP_SCRIPT = """\
# interpolate from base towards a
param lam = 0.5
param scale = 1.0
base = model("models/base")
a = model("models/a")
output base + scale * lam * (a - base)
"""
SWEEP_TASKS = [{"task": "up", "prompt": "x", "answer": "y"},
               {"task": "down", "prompt": "x", "answer": "y"}]


class SweepStub:
    """Scores from the merged value: "up" is the value, "down" is 1 - value. Counts its
    calls and remembers what it was given."""

    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple[object, object]] = []
        self.delay = delay

    def __call__(self, model, tasks, *, device, like):
        self.calls.append((model, like))
        time.sleep(self.delay)
        state = model if isinstance(model, dict) else load_file(str(model / "model.safetensors"))
        value = float(state["model.norm.weight"][0])
        names = list(dict.fromkeys(t["task"] for t in tasks))
        scores = {"up": value, "down": 1 - value}
        return [{"task": t, "n": 1, "exact_match": round(scores[t], 6), "loglik": 0.0}
                for t in names]


# --- tiny models with real tokenizers, for vocabulary alignment ------------------------

VOCAB_WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran")


def write_tokenized_model(folder: Path, words=VOCAB_WORDS, added=(), special=(),
                          seed: int = 0, tied: bool = False, layers: int = 2) -> Path:
    """A tiny LlamaForCausalLM (float32) saved with a real WordLevel tokenizer over
    `words`, then `added` tokens and `special` tokens added as transformers adds them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_tokens(list(added))
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special)})
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                         num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
