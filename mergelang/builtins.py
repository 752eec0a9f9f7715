"""What every script can name without defining it: signatures, context names, settings.

The behaviour of the built-in functions lives in `lower.py` (they act on compile-time
values: `model` opens nothing, it names a model; `sum` unrolls a list into additions).
Here are only the facts `resolve` checks calls against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ast
from .ops import REQUIRED, Primitive


@dataclass(frozen=True)
class SigParam:
    name: str
    required: bool
    rest: bool = False
    keyword_only: bool = False


@dataclass(frozen=True)
class Signature:
    name: str
    params: tuple[SigParam, ...]
    rest_min: int = 0

    def describe(self) -> str:
        parts = []
        for p in self.params:
            parts.append(f"*{p.name}" if p.rest else p.name if p.required else f"{p.name}=...")
        return ", ".join(parts)

    @staticmethod
    def of_primitive(prim: Primitive) -> Signature:
        return Signature(prim.name, tuple(SigParam(p.name, p.default is REQUIRED)
                                          for p in prim.params))


def signature_of_fn(fn: ast.FnDef) -> Signature:
    params, after_rest = [], False
    for p in fn.params:
        params.append(SigParam(p.name, p.default is None and not p.rest, p.rest, after_rest))
        after_rest = after_rest or p.rest
    return Signature(fn.name, tuple(params))


@dataclass(frozen=True)
class Builtin:
    signature: Signature
    doc: str


def _builtin(name: str, doc: str, *params: SigParam, rest_min: int = 0) -> tuple[str, Builtin]:
    return name, Builtin(Signature(name, params, rest_min), doc)


BUILTINS: dict[str, Builtin] = dict([
    _builtin("model", "A model: a Hugging Face folder or a .safetensors file, relative to the "
             "script's folder.", SigParam("path", True)),
    _builtin("lora", "A PEFT LoRA adapter folder as the change it makes to its model: "
             "scale * B @ A on each module it adapts, zero elsewhere (so model(\"base\") + "
             "lora(\"adapter\") is the adapted model). `base`: the model it was trained on "
             "(its tensor names and shapes, and what saved modules are measured against); "
             "default: the script's first model.", SigParam("path", True),
             SigParam("base", False, keyword_only=True)),
    _builtin("delta", "A compressed task vector written by `mergelang compress`, as the "
             "dense change it makes (so model(\"base\") + delta(\"math.delta\") is the "
             "fine-tune, approximately); its base is checked by content.",
             SigParam("path", True)),
    _builtin("sum", "The sum of a list (of tensors or numbers), added left to right.",
             SigParam("xs", True)),
    _builtin("broadcast", "x as a list as long as `like`: a single value is repeated; a list "
             "must already have that length.", SigParam("x", True), SigParam("like", True)),
    _builtin("len", "The length of a list.", SigParam("xs", True)),
    _builtin("gradient", "Linear interpolation of a list of values over `depth`.",
             SigParam("values", True)),
    _builtin("stack", "A model whose layers are the given layer slices, one after another: "
             "embeddings from the first slice's model, final norm and head from the last's.",
             SigParam("slices", False, rest=True), rest_min=1),
    _builtin("extract_lora", "The delta x written as a PEFT LoRA adapter of rank `rank` (or "
             "the smallest keeping `energy` of it) onto `base`; only as the whole `output`.",
             SigParam("x", True), SigParam("rank", False), SigParam("energy", False),
             SigParam("keep", False), SigParam("base", False), SigParam("svd", False)),
])

CONTEXT_NAMES = frozenset({"name", "layer", "num_layers", "depth"})

SETTINGS: dict[str, str] = {
    "dtype": "compute dtype: float32 (default), float64, float16 or bfloat16",
    "out_dtype": "dtype written: default, the donor model's dtype for each tensor",
    "seed": "integer seed of every random op (default 0)",
    "donor": "the model whose config.json and tokenizer files are copied "
             "(default: the first model in `output`)",
    "vocab": 'the output\'s vocabulary when the models\' differ: "union", "base" (the '
             "donor's) or a model (its tokenizer); default: the models must share one",
    "vocab_default": 'a token a model lacks takes: "others" (default: the rows of the models '
                     'that have it, the donor\'s first), "zero", "mean" or a model\'s row',
    "vocab_tokens": 'per-token sources: [[token, source], [token, source, "force"], '
                    '[token, model, "from", other token or id], ...]',
    "vocab_pad_to": "round the output's vocabulary rows up to a multiple of this",
}

COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPES = tuple(COMPUTE_DTYPES)  # the names `set dtype`, `set out_dtype` and the flags accept
