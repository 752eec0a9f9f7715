"""The dtype mergekit computes in, and its weights as that dtype holds them.

mergekit 0.1.5 merges each tensor in the promoted dtype of its inputs unless `dtype:`
is given: bfloat16 models without `dtype:` (most real configs) are merged in bfloat16.
Its task-arithmetic family and multislerp build the weights as a tensor of that dtype
(`torch.tensor(weights, dtype=deltas.dtype)`), so 0.846 is used as 0.84765625. The
converter reproduces both: `set dtype` to the models' dtype (read from the local
safetensors headers), and each weight written as the value that dtype holds, with a
comment that names the rounding.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..io.dtypes import dtype_name
from ..io.errors import ModelFileError
from ..io.header import read_header

if TYPE_CHECKING:
    from .translate import Translator

REDUCED = ("bfloat16", "float16")   # where rounding a weight changes it
_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_dtype(path: Path) -> str | None:
    """The floating dtype a local model's tensors are stored in (promoted over all of
    them), from its safetensors headers or else its config.json; None when unknown."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    found: torch.dtype | None = None
    for file in files:
        try:
            header = read_header(file)
        except (ModelFileError, OSError):
            return None
        for entry in header.entries.values():
            if entry.dtype.is_floating_point and dtype_name(entry.dtype) in _NAMES:
                found = entry.dtype if found is None else torch.promote_types(found,
                                                                              entry.dtype)
    if found is not None:
        return _NAMES[dtype_name(found)]
    return _config_dtype(path / "config.json") if path.is_dir() else None


def _config_dtype(config: Path) -> str | None:
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    value = data.get("torch_dtype") or data.get("dtype") if isinstance(data, dict) else None
    return value if value in _NAMES.values() else None


def promoted(names: list[str]) -> str:
    """The dtype torch promotes `names` to (mergekit's `promoted_dtype`)."""
    out = getattr(torch, names[0])
    for name in names[1:]:
        out = torch.promote_types(out, getattr(torch, name))
    return _NAMES[dtype_name(out)]


def rounded(value: float, dtype: str) -> float:
    """`value` as a tensor of `dtype` holds it: what mergekit multiplies by."""
    return torch.tensor(value, dtype=getattr(torch, dtype)).item()


def dtype_settings(tr: Translator) -> None:
    """`set dtype` and `set out_dtype` as mergekit computes and writes, and the dtype the
    weights are rounded to."""
    config, method, script = tr.config, tr.method, tr.script
    compute = config.dtype[0] if config.dtype is not None else _models_dtype(tr)
    if config.dtype is not None:
        dtype, node = config.dtype
        make = tr._at(node)
        if method.upcasts and dtype != "float64":
            script.set("dtype", make.lit("float32"),
                       f"mergekit: loaded in {dtype}, {method.name} computes in float32")
        else:
            script.set("dtype", make.lit(dtype), "mergekit loads and merges in `dtype`")
    elif compute in REDUCED and not method.upcasts:
        script.set("dtype", tr._at(config.method_node).lit(compute),
                   f"mergekit merges in the models' dtype ({compute}) when there is no `dtype`")
    elif compute is None and not method.upcasts:
        tr.notes.append("without `dtype`, mergekit merges in the dtype the models are stored "
                        "in, which is not known here (they are not local): if it is bfloat16, "
                        'add `set dtype = "bfloat16"` and write the weights as bfloat16 holds '
                        "them for mergekit's exact numbers")
    if compute in REDUCED and not method.upcasts:
        tr.values.round_to = compute
    out = config.out_dtype
    if out is not None:
        script.set("out_dtype", tr._at(out[1]).lit(out[0]))
    elif method.name == "arcee_fusion":   # its mask is float32, and so is what it returns
        script.set("out_dtype", tr._at(config.method_node).lit("float32"),
                   "mergekit's arcee_fusion returns float32 and writes it without `out_dtype`")
    elif config.dtype is not None:
        script.set("out_dtype", tr._at(config.dtype[1]).lit(config.dtype[0]),
                   "and writes in it when there is no `out_dtype`")


def _models_dtype(tr: Translator) -> str | None:
    """The promoted stored dtype of every local model of the merge; None if one is not
    local or not readable."""
    refs = [src.model for s in tr.config.slices for src in s.sources]
    if tr.config.base is not None:
        refs.append(tr.config.base)
    found = []
    for ref in refs:
        folder = tr._local_dir(ref.path)
        dtype = stored_dtype(folder) if folder is not None else None
        if dtype is None:
            return None
        found.append(dtype)
    return promoted(found) if found else None


def weight_notes(tr: Translator) -> list[str]:
    """The head comments on the weights' rounding (and a warning where it falls short)."""
    values, notes = tr.values, []
    if values.rounded:
        pairs = ", ".join(f"{a!r} as {b!r}" for a, b in values.rounded.items())
        notes.append(f"mergekit builds the weights as a {values.round_to} tensor, so each is "
                     f"written as {values.round_to} holds it: {pairs}")
    if values.per_layer:
        notes.append(f"mergekit rounds each layer's weight of a gradient to {values.round_to}, "
                     "so those gradients are written one value a layer")
    if values.unrounded_gradient:
        text = (f"a weight gradient's values between its points are not rounded to "
                f"{values.round_to} as mergekit rounds them; those layers can differ by that "
                "rounding")
        notes.append(text)
        tr.read.warn(text, tr.config.method_node)
    return notes
