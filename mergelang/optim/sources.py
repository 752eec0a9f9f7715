"""Where the reference task vector comes from, and how the optimizers keep it.

tau = reference - base, per parameter name: the two models are Hugging Face folders or
safetensors files (read one tensor at a time, never whole), state dicts, or modules. Each
tau is sparsified once when the optimizer starts, and kept as what survived: the values and
their int32 positions when that is smaller than the dense tensor, so that at keep=0.01 the
optimizer holds about 2% of the model's size for it (values in the parameter's dtype, plus
4 bytes of position per kept entry) where the reference code holds the dense tensor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..sparse import Sparse

Source = str | os.PathLike | Mapping[str, torch.Tensor] | torch.nn.Module


class Tensors:
    """Tensors by name from a model: a Hugging Face folder or a .safetensors file (opened
    lazily, read one tensor at a time), a state dict, or a module (its state dict)."""

    def __init__(self, source: Source, what: str):
        self.what = what
        self.files: dict[str, Path] = {}
        self.opened: dict[Path, object] = {}
        if isinstance(source, torch.nn.Module):
            self.mapping: Mapping[str, torch.Tensor] | None = source.state_dict(keep_vars=False)
        elif isinstance(source, Mapping):
            self.mapping = source
        else:
            self.mapping = None
            self._index(Path(source))

    def _index(self, path: Path) -> None:
        if path.is_file():
            files = [path]
        elif (path / "model.safetensors.index.json").is_file():
            index = json.loads((path / "model.safetensors.index.json").read_text())
            files = sorted({path / f for f in index["weight_map"].values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.what} {str(path)!r}: no .safetensors file there "
                                    "(give a Hugging Face folder, a .safetensors file, a state "
                                    "dict or a module)")
        from safetensors import safe_open
        for file in files:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is no dict)
                    self.files[name] = file

    def names(self) -> set[str]:
        return set(self.mapping) if self.mapping is not None else set(self.files)

    def get(self, name: str) -> torch.Tensor | None:
        if self.mapping is not None:
            tensor = self.mapping.get(name)
            return None if tensor is None else tensor.detach()
        file = self.files.get(name)
        if file is None:
            return None
        if file not in self.opened:
            from safetensors import safe_open
            self.opened[file] = safe_open(str(file), "pt")
        return self.opened[file].get_tensor(name)

    def close(self) -> None:
        self.opened.clear()


def task_vectors(named: Iterable[tuple[str, torch.Tensor]], reference: Source, base: Source
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, reference[name] - base[name]) in float32 on the CPU, for each named parameter,
    one at a time. A name missing from either model, or a shape that differs from the
    parameter's, is an error that names it."""
    ref, bas = Tensors(reference, "reference"), Tensors(base, "base")
    try:
        for name, param in named:
            a, b = ref.get(name), bas.get(name)
            for tensor, model, source in ((a, "reference", ref), (b, "base", bas)):
                if tensor is None:
                    raise KeyError(f"parameter {name!r} is not in the {model} model"
                                   + _nearest(name, source.names()))
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(f"parameter {name!r} has shape {tuple(param.shape)} but "
                                     f"{tuple(tensor.shape)} in the {model} model")
            yield name, a.float().cpu() - b.float().cpu()
    finally:
        ref.close()
        bas.close()


def _nearest(name: str, names: set[str]) -> str:
    import difflib
    close = difflib.get_close_matches(name, sorted(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" ({len(names)} tensors there)"


# --- the kept task vector, in an optimizer's per-parameter state -------------------------


def store(kept: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state entries that hold a sparsified task vector for parameter `like`: its
    nonzero values (in the parameter's dtype, on its device) and their flat int32 positions
    ("ref_values", "ref_index"), or the dense tensor alone ("ref_values") when that is
    smaller (more than a third or half of it kept)."""
    values = kept.to(device=like.device, dtype=like.dtype)
    flat = values.reshape(-1)
    at = flat.nonzero().squeeze(1)
    item = values.element_size()
    if at.numel() * (item + 4) >= flat.numel() * item or flat.numel() >= 2**31:
        return {"ref_values": values.contiguous()}
    return {"ref_values": flat[at].clone(), "ref_index": at.to(torch.int32)}


def dense(state: Mapping[str, torch.Tensor], like: torch.Tensor,
          out: torch.Tensor | None = None) -> torch.Tensor:
    """The kept task vector as a dense tensor shaped like the parameter (into `out`, a
    tensor of that shape and dtype, when given)."""
    values = state["ref_values"]
    if "ref_index" not in state:
        return values
    if out is None:
        out = torch.zeros(like.shape, dtype=values.dtype, device=values.device)
    else:
        out.zero_()
    out.view(-1)[state["ref_index"]] = values
    return out


def kept_task_vector(state: Mapping[str, torch.Tensor], like: torch.Tensor
                     ) -> torch.Tensor | Sparse:
    """The kept task vector as a rule reads it: a Sparse of its kept entries (the int32
    positions widened for the step), or the dense tensor when it is stored dense."""
    values, index = state["ref_values"], state.get("ref_index")
    if index is None:
        return values
    return Sparse(index.to(torch.int64), values, like.shape)


def ref_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(state[k].numel() * state[k].element_size() for k in ("ref_values", "ref_index")
               if k in state)
