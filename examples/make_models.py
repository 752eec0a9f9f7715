#!/usr/bin/env python3
"""Write a synthetic tiny Llama model family: random weights, planted sign conflicts.

The committed example models in examples/models/ are no longer these: they are trained
by examples/train_skills.py, in the same shapes, with this family's config, tokenizer
and writer. This script stays for tests that need a family whose task vectors have a
known structure, and it writes only where it is told (it would otherwise replace the
trained models).

Why this script exists: the examples need real Hugging Face model folders to read,
merge and load back into ``transformers`` — but they must be small enough to commit
(about 1.8 MB for all four) and must never need the network. So the weights are made
here from fixed seeds, and the script is committed next to its output: anyone can
rebuild the folders and get byte-identical files (check with ``sha256sum``).

The family (all ``LlamaForCausalLM``: hidden 64, MLP 176, 4 layers, 4 heads,
2 key-value heads, vocab 256, untied embeddings, bfloat16):

* ``base``  - norm weights ~ 1 + N(0, 0.02), every other weight ~ N(0, 0.02).
* ``math``, ``code``, ``chat`` - "fine-tunes": base + a task vector that is
  dense small noise, plus a sparse set of larger entries. Part of the sparse set is
  *shared* by all three fine-tunes and points the same way in most of them, but each
  fine-tune flips the sign of some shared entries (it "dissents"), and each also has a
  private sparse set that overlaps the others' at random. So TIES trimming has small
  values to drop and sign election has real conflicts to settle.

``math`` is written *sharded* (three ``model-0000N-of-00003.safetensors`` files plus
``model.safetensors.index.json``, with tensors of one layer split across shards) so
the examples exercise the sharded reader; the others are a single
``model.safetensors``. Every folder also gets ``config.json``,
``generation_config.json`` and a byte-level tokenizer, so each is a complete model
that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load as-is.

Determinism: each tensor is drawn from its own ``torch.Generator`` seeded by a CRC of
(seed, model, tensor name), so results do not depend on iteration order; JSON is
written with sorted keys; nothing records a time, a path or a library version.

Usage::

    python examples/make_models.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 1234
ROLES = ("math", "code", "chat")  # the fine-tunes, in a fixed order
SHARDED = {"math": 3}  # role -> number of shards; everything else is single-file

HIDDEN = 64
INTERMEDIATE = 176
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB = 256
MAX_POS = 256
DTYPE = torch.bfloat16

INIT_STD = 0.02  # base weights
DENSE_STD = 0.001  # dense part of every task vector
SPARSE_STD = 0.01  # the larger sparse entries
SHARED_FRAC = 0.05  # fraction of entries in the sparse set shared by all fine-tunes
DISSENT_FRAC = 0.25  # chance that a fine-tune flips the sign of one shared entry
PRIVATE_FRAC = 0.03  # fraction of entries in each fine-tune's own sparse set
# Norm weights sit near 1.0, where one bfloat16 step is ~0.008, so their task vector is
# scaled up or rounding to bfloat16 would erase most of it.
NORM_DELTA_SCALE = 5.0

UNK, BOS, EOS = "<unk>", "<s>", "</s>"

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "head_dim": HEAD_DIM,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": INIT_STD,
    "intermediate_size": INTERMEDIATE,
    "max_position_embeddings": MAX_POS,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "num_key_value_heads": KV_HEADS,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-5,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB,
}

GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": BOS,
    "clean_up_tokenization_spaces": False,
    "eos_token": EOS,
    "model_max_length": MAX_POS,
    "pad_token": UNK,
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": UNK,
}

SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": UNK, "unk_token": UNK}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of LlamaForCausalLM's state dict, in its own order."""
    kv = KV_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (kv, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (kv, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def generator(*parts: str) -> torch.Generator:
    """A generator whose seed depends only on SEED and the given labels."""
    key = "/".join((str(SEED), *parts)).encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


def make_base(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Base weights, already rounded to the storage dtype."""
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator("base", name)) * INIT_STD
        out[name] = (noise + 1.0 if len(shape) == 1 else noise).to(DTYPE)
    return out


def make_task_vector(name: str, shape: tuple[int, ...], role: str) -> torch.Tensor:
    """The float32 delta that turns base tensor `name` into fine-tune `role`'s."""
    scale = NORM_DELTA_SCALE if len(shape) == 1 else 1.0

    # Shared sparse set: same positions and consensus value for every fine-tune.
    g = generator("shared", name)
    shared_mask = torch.rand(shape, generator=g) < SHARED_FRAC
    consensus = torch.randn(shape, generator=g) * SPARSE_STD

    g = generator(role, name)
    dense = torch.randn(shape, generator=g) * DENSE_STD
    # Each fine-tune agrees with the consensus in strength 0.5x-1.5x, or dissents.
    strength = 0.5 + torch.rand(shape, generator=g)
    dissent = torch.rand(shape, generator=g) < DISSENT_FRAC
    sign = torch.where(dissent, -1.0, 1.0)
    shared = shared_mask * consensus * strength * sign
    # Private sparse set: this fine-tune alone (random overlap with the others).
    private_mask = torch.rand(shape, generator=g) < PRIVATE_FRAC
    private = private_mask * torch.randn(shape, generator=g) * SPARSE_STD
    return (dense + shared + private) * scale


def make_finetune(base: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
    """Fine-tune = stored base + task vector, rounded to the storage dtype."""
    return {
        name: (t.float() + make_task_vector(name, tuple(t.shape), role)).to(DTYPE)
        for name, t in base.items()
    }


def dump_json(path: Path, obj: object) -> None:
    """Stable JSON: sorted keys, two-space indent, trailing newline."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def split_shards(state: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order; a shard closes once it holds ~1/n of the bytes.

    Like HF's own sharding this cuts through the middle of a layer, so a reader has
    to follow weight_map rather than assume one layer per file.
    """
    total = sum(t.numel() * t.element_size() for t in state.values())
    target = -(-total // n)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if size >= target and len(shards) < n:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    return shards


def write_weights(folder: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    """model.safetensors, or n shards plus model.safetensors.index.json."""
    for old in [*folder.glob("model*.safetensors"), folder / "model.safetensors.index.json"]:
        if old.is_file():
            old.unlink()
    meta = {"format": "pt"}
    if n_shards <= 1:
        save_file(
            {k: v.contiguous() for k, v in state.items()},
            folder / "model.safetensors",
            metadata=meta,
        )
        return
    shards = split_shards(state, n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, folder / fname, metadata=meta)
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    dump_json(folder / "model.safetensors.index.json", index)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_tokenizer(folder: Path) -> None:
    """A 256-entry byte-level tokenizer: id = byte value, except ids 0-2.

    Ids 0, 1, 2 are <unk>, <s>, </s> (Llama's convention), so the control bytes
    0x00-0x02 encode as <unk>; every other byte is its own token. No merges and no
    training data, so it is built, not learned, and is identical on every run.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    chars = bytes_to_unicode()
    vocab = {UNK: 0, BOS: 1, EOS: 2}
    vocab.update({chars[b]: b for b in range(3, 256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    tok.add_special_tokens([UNK, BOS, EOS])
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    dump_json(folder / "tokenizer_config.json", TOKENIZER_CONFIG)
    dump_json(folder / "special_tokens_map.json", SPECIAL_TOKENS_MAP)


def write_model(folder: Path, state: dict[str, torch.Tensor], n_shards: int) -> None:
    """One complete HF model folder."""
    folder.mkdir(parents=True, exist_ok=True)
    write_weights(folder, state, n_shards)
    dump_json(folder / "config.json", CONFIG)
    dump_json(folder / "generation_config.json", GENERATION_CONFIG)
    write_tokenizer(folder)


def build(out: Path) -> list[Path]:
    """Write base + every fine-tune under `out`; returns the model folders."""
    shapes = tensor_shapes()
    base = make_base(shapes)
    folders = [out / "base"]
    write_model(folders[0], base, 1)
    for role in ROLES:
        folders.append(out / role)
        write_model(folders[-1], make_finetune(base, role), SHARDED.get(role, 1))
    return folders


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    args = ap.parse_args()
    for folder in build(args.out):
        print(folder)


if __name__ == "__main__":
    main()
