"""Synthetic Llama-shaped checkpoint families for the benchmark.

A family is a base model and N fine-tunes, each a Hugging Face folder
(``config.json`` + sharded ``*.safetensors`` + ``model.safetensors.index.json``)::

    python benchmarks/families.py OUT [--hidden 1024 --layers 16 --inter 2816
                                       --vocab 32000 --n-ft 3 --dtype bfloat16
                                       --shard-mb 200 --seed 0]

writes ``OUT/base``, ``OUT/ft0`` ... ``OUT/ft{N-1}`` and ``OUT/family.json`` (the
parameters).  With the defaults every model has about 271M parameters.  When
``OUT/family.json`` already matches the parameters, nothing is regenerated.

Values:

- base: weights ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.02);
- fine-tune i: base + dense noise N(0, 0.002) + sparse larger entries (1% of the
  entries get an extra N(0, 0.02)), so TIES trimming and sign election have work.

Every tensor of every model draws from its own ``torch.Generator`` seeded from
(seed, model, tensor name), so the output does not depend on the order of
generation and a fine-tune regenerates its base tensor instead of reading it.
Tensors are generated one at a time and written shard by shard, so memory stays
around one shard plus a few tensors (well under 2 GB at the default sizes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

MARKER = "family.json"
FORMAT = 1  # bump when the generated values change

BASE_STD = 0.02
DENSE_STD = 0.002
SPARSE_FRACTION = 0.01
SPARSE_STD = 0.02

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FamilySpec:
    hidden: int = 1024
    layers: int = 16
    inter: int = 2816
    vocab: int = 32000
    n_ft: int = 3
    dtype: str = "bfloat16"
    shard_mb: float = 200
    seed: int = 0

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)

    def marker(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    def model_names(self) -> list[str]:
        return ["base"] + [f"ft{i}" for i in range(self.n_ft)]


def tensor_shapes(spec: FamilySpec) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LlamaForCausalLM, in the usual HF order."""
    h, i, v = spec.hidden, spec.inter, spec.vocab
    kv = spec.heads * (h // spec.heads)  # key/value heads = heads
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def n_params(spec: FamilySpec) -> int:
    total = 0
    for _, shape in tensor_shapes(spec):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def _generator(spec: FamilySpec, model: str, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{spec.seed}/{model}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _base_tensor(spec: FamilySpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = torch.randn(shape, generator=_generator(spec, "base", name)) * BASE_STD
    if len(shape) == 1:  # RMSNorm weights sit around 1
        t += 1.0
    return t


def make_tensor(spec: FamilySpec, model: str, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 value of one tensor of one model of the family."""
    t = _base_tensor(spec, name, shape)
    if model == "base":
        return t
    g = _generator(spec, model, name)
    t += torch.randn(shape, generator=g) * DENSE_STD
    mask = torch.rand(shape, generator=g) < SPARSE_FRACTION
    t += torch.randn(shape, generator=g) * SPARSE_STD * mask
    return t


def shard_plan(spec: FamilySpec) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most --shard-mb (a larger tensor gets its own)."""
    itemsize = torch.empty((), dtype=DTYPES[spec.dtype]).element_size()
    limit = int(spec.shard_mb * 1_000_000)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensor_shapes(spec):
        n = itemsize
        for d in shape:
            n *= d
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _config(spec: FamilySpec) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.inter,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "vocab_size": spec.vocab,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 2048,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_model(spec: FamilySpec, model: str, out: Path) -> None:
    """Write one model of the family as an HF folder at `out` (replaced if present)."""
    dtype = DTYPES[spec.dtype]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(_config(spec), indent=2) + "\n")
    plan = shard_plan(spec)
    weight_map: dict[str, str] = {}
    total_size = 0
    for k, shard in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            t = make_tensor(spec, model, name, shape).to(dtype)
            tensors[name] = t
            weight_map[name] = fname
            total_size += t.numel() * t.element_size()
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def ensure_family(spec: FamilySpec, root: Path, log=print) -> dict[str, Path]:
    """Make the family at `root` unless its marker already matches; return model folders."""
    root = Path(root)
    models = {m: root / m for m in spec.model_names()}
    marker = root / MARKER
    if marker.exists():
        try:
            same = json.loads(marker.read_text()) == spec.marker()
        except ValueError:
            same = False
        if same and all((p / "model.safetensors.index.json").exists() for p in models.values()):
            log(f"family {root}: up to date, not regenerated")
            return models
        marker.unlink()
    root.mkdir(parents=True, exist_ok=True)
    log(f"family {root}: generating {len(models)} models x {n_params(spec) / 1e6:.1f}M "
        f"parameters ({spec.dtype})")
    for name, path in models.items():
        write_model(spec, name, path)
    marker.write_text(json.dumps(spec.marker(), indent=2) + "\n")
    return models


def add_family_args(p: argparse.ArgumentParser) -> None:
    d = FamilySpec()
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--inter", type=int, default=d.inter)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--n-ft", type=int, default=d.n_ft)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument("--shard-mb", type=float, default=d.shard_mb)
    p.add_argument("--family-seed", type=int, default=d.seed)


def spec_from_args(a: argparse.Namespace, **override) -> FamilySpec:
    kw = dict(hidden=a.hidden, layers=a.layers, inter=a.inter, vocab=a.vocab, n_ft=a.n_ft,
              dtype=a.dtype, shard_mb=a.shard_mb, seed=a.family_seed)
    kw.update(override)
    return FamilySpec(**kw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    add_family_args(p)
    a = p.parse_args(argv)
    ensure_family(spec_from_args(a), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
