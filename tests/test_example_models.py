"""The committed example models are real, loadable HF Llama folders that merge cleanly.

Why: the examples and end-to-end tests merge ``examples/models/{base,math,code,chat}``
and load the result with ``transformers``. If those folders stopped loading, left the
layout of the synthetic family in ``examples/make_models.py`` (whose config, tokenizer
and writer ``examples/train_skills.py`` uses to write them), lost their sharding, or
disagreed on tensor names/shapes, every example would fail for a reason that has
nothing to do with mergelang — so this test pins them down. (That they have their
skills is tests/test_eval.py's job.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402  (after the importorskip guard)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MODELS = EXAMPLES / "models"
ROLES = ("base", "math", "code", "chat")
VOCAB = 256


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, via the index when it is sharded."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    return [folder / "model.safetensors"]


def header(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) for every tensor in a folder, read from headers only."""
    out = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in weight_files(folder):
        state.update(safetensors_torch.load_file(str(path)))
    return state


@pytest.mark.parametrize("role", ROLES)
def test_model_loads_and_runs(role: str) -> None:
    folder = MODELS / role
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), output_loading_info=True
    )
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[1, 72, 101, 108, 108, 111], [1, 50, 43, 50, 61, 52]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (2, 6, VOCAB)
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("role", ROLES)
def test_tokenizer_loads(role: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(str(MODELS / role))
    assert len(tok) == VOCAB
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "Hello, wörld! 2+2=4"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids[1:] == list(text.encode("utf-8"))  # byte-level: id == byte value
    assert max(ids) < VOCAB
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_math_is_sharded() -> None:
    folder = MODELS / "math"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert not (folder / "model.safetensors").exists()
    shards = sorted(set(index["weight_map"].values()))
    assert 2 <= len(shards) <= 3
    assert all((folder / s).is_file() for s in shards)
    # The index must describe the shards exactly.
    on_disk = {}
    for s in shards:
        with safe_open(str(folder / s), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            on_disk.update({k: s for k in f.keys()})
    assert on_disk == index["weight_map"]
    state = load_state(folder)
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert index["metadata"]["total_size"] == total


def test_others_are_single_file() -> None:
    for role in ("base", "code", "chat"):
        folder = MODELS / role
        assert (folder / "model.safetensors").is_file()
        assert not (folder / "model.safetensors.index.json").exists()
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}


def test_family_shares_names_shapes_and_dtype() -> None:
    headers = {role: header(MODELS / role) for role in ROLES}
    base = headers["base"]
    assert len(base) == 2 + 4 * 9 + 1  # embed + 4 layers x 9 + norm + lm_head
    assert {dtype for dtype, _ in base.values()} == {"BF16"}
    assert base["model.layers.0.self_attn.k_proj.weight"][1] == (32, 64)  # 2 kv heads x 16
    assert base["lm_head.weight"][1] == (VOCAB, 64)
    for role in ROLES[1:]:
        assert headers[role] == base, role


def test_finetunes_have_sign_conflicts() -> None:
    """Trained fine-tunes move every weight a little and some a lot, and disagree in sign:
    what TIES trims and elects over."""
    base = load_state(MODELS / "base")
    deltas = [
        {k: v.float() - base[k].float() for k, v in load_state(MODELS / r).items()}
        for r in ROLES[1:]
    ]
    name = "model.layers.1.mlp.up_proj.weight"  # split across math's shards
    d = torch.stack([delta[name] for delta in deltas])
    big = d.abs() > 4 * d.abs().median()  # the tail TIES keeps
    assert 0.005 < big.float().mean() < 0.5
    assert (d != 0).float().mean() > 0.5  # training moves almost every weight
    signs = torch.sign(d) * big
    conflict = (signs > 0).any(0) & (signs < 0).any(0)
    assert conflict.any()
    assert not torch.equal(deltas[0][name], deltas[1][name])


def test_synthetic_family_has_the_layout_of_the_skill_models(tmp_path: Path) -> None:
    """examples/make_models.py writes folders interchangeable with the committed ones: the
    same files, config, tokenizer, tensor names, shapes and dtypes (its weights are its
    own: random, with planted sign conflicts)."""
    pytest.importorskip("tokenizers")
    spec = importlib.util.spec_from_file_location("make_models", EXAMPLES / "make_models.py")
    assert spec and spec.loader
    make_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_models)
    make_models.build(tmp_path)
    for role in ROLES:
        new, old = tmp_path / role, MODELS / role
        assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in old.iterdir())
        for fname in (
            "config.json",
            "generation_config.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ):
            assert (new / fname).read_bytes() == (old / fname).read_bytes(), (role, fname)
        # tokenizer.json's layout may vary with the tokenizers version; its meaning may not.
        new_tok = json.loads((new / "tokenizer.json").read_text())
        old_tok = json.loads((old / "tokenizer.json").read_text())
        assert new_tok["model"]["vocab"] == old_tok["model"]["vocab"]
        assert header(new) == header(old), role
