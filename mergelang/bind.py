"""Bind: open every model the program names, read headers only, learn the layer structure.

After this stage each `model(...)` in the IR has a `BoundModel`: its tensor names,
shapes and dtypes (from safetensors headers, nothing loaded), and which tensors belong
to which repeated block ("layer"). Errors about the files themselves (a missing folder,
a truncated header, a pickled checkpoint) are reported here, at the `model(...)` call
in the script.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .diagnostics import Diagnostic, Span, error
from .io.errors import ModelFileError
from .io.read import TensorInfo
from .io.sources import frame_of, is_derived, key_options, open_source, split_key
from .ir import Op, nodes_of
from .lower import Lowered, ModelRef
from .sparse import Difference, Sparse
from .vocab import VocabPlan, align

# `model.layers.12.`, `transformer.h.3.`, `encoder.layer.7.`, `blocks.0.`
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_BEFORE_BLOCKS = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_IN_MEMORY = Path("<memory>")  # the file of every tensor an embedding program holds


class ModelSource(Protocol):
    """What the back end needs of a model: headers, and one tensor at a time."""

    tensors: dict[str, TensorInfo]
    config: dict | None
    folder: Path | None

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor: ...

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None: ...

    def close(self) -> None: ...


class InMemoryModel:
    """A state dict (or a single tensor) held by the caller, for `mergelang.evaluate`; a
    value may be a mergelang.sparse.Sparse (an optimizer's kept task vector) or Difference
    (its update)."""

    def __init__(self, state: dict[str, torch.Tensor | Sparse | Difference]):
        self.state = state
        self.config = None
        self.folder = None
        self.tensors = {
            name: TensorInfo(name, tuple(t.shape), t.dtype, _IN_MEMORY, i,
                             t.numel() * t.element_size())
            for i, (name, t) in enumerate(state.items())
        }

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False
             ) -> torch.Tensor | Sparse | Difference:
        """Rows of a tensor converted to `dtype`, or as they are with view=True (the
        executor never writes to a view), else a copy."""
        tensor = self.state[name]
        if isinstance(tensor, (Sparse, Difference)):  # never written: no copy
            part = tensor.rows(*rows) if rows is not None else tensor
            return part.to(dtype)
        part = tensor[rows[0]:rows[1]] if rows is not None else tensor
        if dtype is not None and dtype != part.dtype:
            return part.to(dtype)
        return part if view else part.clone()

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class BoundModel:
    key: str
    ref: ModelRef
    source: ModelSource
    num_layers: int

    @property
    def display(self) -> str:
        """The path as the user wrote it, for messages."""
        return self.ref.written


@dataclass(frozen=True)
class TensorContext:
    """The per-tensor names a script can use (LANGUAGE.md §4)."""

    name: str
    layer: int | None
    num_layers: int
    depth: float


@dataclass
class Bound:
    lowered: Lowered
    models: dict[str, BoundModel]
    donor: BoundModel | None
    vocab: VocabPlan | None = None   # with `set vocab`: the output's vocabulary
    warnings: list[Diagnostic] = field(default_factory=list)

    def close(self) -> None:
        for model in self.models.values():
            model.source.close()

    def __enter__(self) -> Bound:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def input_paths(self) -> list[Path]:
        """Every file and folder this merge reads: what an output must never replace."""
        paths: set[Path] = set()
        for key, model in self.models.items():
            if isinstance(model.source, InMemoryModel):
                continue
            paths.add(split_key(key)[1])
            if model.source.folder is not None:
                paths.add(Path(model.source.folder))
            paths.update(t.file for t in model.source.tensors.values())
        return sorted(paths)

    @property
    def num_layers(self) -> int:
        """The output's layer count when it does not stack: the donor's, else the first
        input's (a script whose inputs are all derived, `output delta("x")`, has no donor)."""
        model = self.donor or next(iter(self.models.values()), None)
        return model.num_layers if model is not None else 0

    def names(self, num_layers: int | None = None) -> list[str]:
        """Every tensor name of the output's candidates, the donor's first, each in file
        order. With `num_layers`, each layer tensor's name is made for every layer
        0..num_layers-1 (a stack may have more layers than any model)."""
        ordered = [self.donor] if self.donor is not None else []
        ordered += [m for m in self.models.values() if m is not self.donor]
        seen: dict[str, None] = {}
        for model in ordered:
            for name in model.source.tensors:
                if num_layers is None or layer_of(name) is None:
                    seen.setdefault(name, None)
                    continue
                for layer in range(num_layers):
                    seen.setdefault(with_layer(name, layer), None)
        return list(seen)

    def context(self, name: str, num_layers: int | None = None) -> TensorContext:
        if num_layers is None:
            num_layers = self.num_layers
        layer = layer_of(name)
        if layer is not None:
            return TensorContext(name, layer, num_layers, layer / max(num_layers - 1, 1))
        return TensorContext(name, None, num_layers, 0.0 if is_before_layers(name) else 1.0)


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (`model.layers.12.mlp...` -> 12), or None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def with_layer(name: str, layer: int) -> str:
    """The same tensor name in another layer."""
    match = _LAYER.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


def is_before_layers(name: str) -> bool:
    """Embeddings come before the layers; final norms and heads after."""
    return _BEFORE_BLOCKS.search(name) is not None


def bind(lowered: Lowered, sources: dict[str, ModelSource] | None = None) -> Bound:
    """Open the models' headers. `sources` supplies in-memory models by key.

    Derived inputs (an adapter, a compressed task vector) are attached to the plain
    models once every input is open and the plain models are aligned to the output's
    vocabulary (`set vocab`): their tensors are defined relative to those."""
    sources = sources or {}
    opened: dict[str, ModelSource] = {}
    try:
        for key, ref in lowered.models.items():
            opened[key] = sources.get(key) or _open(key, ref.span)
        plain = {key: _bound(key, ref, opened[key], sources)
                 for key, ref in lowered.models.items() if not is_derived(opened[key])}
        merged = {n.attr for n in nodes_of(lowered.output, Op.MODEL)} \
            if lowered.output is not None else set(opened)
        vocab = align(lowered.vocab, plain, lowered.donor, merged)
        frame = {key: model.source for key, model in plain.items()}  # aligned to the vocabulary
        models = {key: plain.get(key) or _bound(key, ref, opened[key], sources, frame,
                                                  aligned=vocab is not None)
                  for key, ref in lowered.models.items()}
    except BaseException:
        for source in opened.values():
            source.close()
        raise
    donor = models.get(lowered.donor) if lowered.donor else None
    warnings = [_measured_against(list(plain.values()), m) for key, m in models.items()
                if key not in plain and len(plain) > 1 and "base" not in key_options(key)
                and getattr(m.source, "needs_base", False)]
    return Bound(lowered, models, donor, vocab, warnings)


def _measured_against(plain: list[BoundModel], adapter: BoundModel) -> Diagnostic:
    """The warning for an adapter measured against the first of several models by
    default: which model that is, and how to name another."""
    others = ", ".join(m.display for m in plain[1:4]) + (", ..." if len(plain) > 4 else "")
    return Diagnostic(
        f"{adapter.display} saves modules whole (modules_to_save), and its change to them "
        f"is measured against the script's first model, {plain[0].display}, not {others}",
        adapter.ref.span, severity="warning",
        hint=f'if it was trained on another, name it, e.g. lora("{adapter.display}", '
             f'base=model("{plain[1].display}"))')


def _bound(key: str, ref: ModelRef, source: ModelSource, given: dict[str, ModelSource],
           frame: dict[str, ModelSource] | None = None, aligned: bool = False) -> BoundModel:
    """One input, checked; a derived one first attached to plain models (`frame`, key ->
    source: its `base=`, else all of them; `aligned` when `set vocab` re-rowed them)."""
    try:
        if frame is not None:
            source.attach(frame_of(key, frame))
        if key not in given:
            check_tensors(source)
        return BoundModel(key, ref, source, count_layers(source))
    except ModelFileError as exc:
        hint = exc.hint
        if frame is not None and aligned:
            hint = (f"{hint}; note that `set vocab` gave the models the output's vocabulary "
                    "rows, and this input, made for the rows its model had, is not aligned")
        raise error(exc.message, ref.span, hint=hint) from None


def _open(key: str, span: Span) -> ModelSource:
    try:
        return open_source(key)
    except ModelFileError as exc:
        raise error(exc.message, span, hint=exc.hint) from None


def check_tensors(source: ModelSource) -> None:
    """Refuse, naming the tensor, a layer number larger than the tensors can fill
    (`layers.999999999.`): each layer has a tensor of its own, and a stack makes names
    for every layer. (float8 tensors are read and widened to the compute dtype, and a
    tensor with no rows passes through the row-chunking as one empty chunk.)"""
    found = _layers_named(source)
    if found > len(source.tensors):
        name = next(n for n in source.tensors if layer_of(n) == found - 1)
        raise ModelFileError(
            f"tensor {name!r} of {_where(source)} names layer {found - 1}, but the model "
            f"has only {len(source.tensors)} tensors",
            hint="the tensor names are damaged; " + _REDOWNLOAD,
        )


def count_layers(source: ModelSource) -> int:
    """The number of repeated blocks: from config.json, else from the tensor names.

    A config claiming more layers than the tensors have is refused (ModelFileError),
    so it cannot make a stack of a million layers, nor a config that disagrees with
    the weights."""
    found = _layers_named(source)
    for key in NUM_LAYERS_KEYS:
        value = (source.config or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            if value > max(found, 1) and (found or value > len(source.tensors)):
                layers = f"layers 0 to {found - 1}" if found else "no layers"
                raise ModelFileError(
                    f"config.json of {_where(source)} says {key} = {value}, but its "
                    f"tensors have {layers}",
                    hint=f"correct {key} in config.json"
                    + (f" (to {found})" if found else ""),
                )
            return value
    return found


_REDOWNLOAD = "download the model again"


def _layers_named(source: ModelSource) -> int:
    """One more than the largest layer number in the tensor names, or 0."""
    indices = {int(m.group(1)) for n in source.tensors if (m := _LAYER.search(n))}
    return max(indices) + 1 if indices else 0


def _where(source: ModelSource) -> str:
    return str(getattr(source, "path", None) or source.folder or "the model")
