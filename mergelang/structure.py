"""What a model holds, from its headers alone: `mergelang inspect`, and the REPL's model
summaries.

Everything here comes from the safetensors headers and config.json, so it costs the same
on a 100M and a 100B model: names, shapes and dtypes; parameter counts by module type
(`self_attn.q_proj.weight` across the layers) and by layer; tensors that are tied (the
config says the head is the embedding) or missing (a layer that lacks a tensor the other
layers have, a layer count that disagrees with config.json); the weight files' sizes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bind import count_layers, is_before_layers, layer_of, with_layer
from .diagnostics import Diagnostic, MergeError
from .io.errors import ModelFileError
from .io.read import TensorInfo, open_model

CONFIG_HIGHLIGHTS = ("model_type", "architectures", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "vocab_size", "max_position_embeddings", "rope_theta", "torch_dtype",
                     "tie_word_embeddings")
PLACE_LABELS = {"before": "before layers", "after": "after layers"}
_MARK = 987654321  # a layer number no real name has: where with_layer puts it is the layer


def module_of(name: str) -> str:
    """A tensor's module type: its name after the layer index (`model.layers.3.mlp.up_proj
    .weight` -> `mlp.up_proj.weight`), or the whole name outside the layers."""
    if layer_of(name) is None:
        return name
    marked = with_layer(name, _MARK)
    return marked[marked.index(str(_MARK)) + len(str(_MARK)) + 1:]


def place_of(name: str) -> str:
    """Where a tensor sits: its layer index, or "before" / "after" the layers."""
    layer = layer_of(name)
    if layer is not None:
        return str(layer)
    return "before" if is_before_layers(name) else "after"


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


@dataclass
class Group:
    """Tensors that share a module type (or a layer): how many, how large, in what forms."""

    tensors: int = 0
    parameters: int = 0
    shapes: Counter = field(default_factory=Counter)
    dtypes: Counter = field(default_factory=Counter)

    def add(self, info: TensorInfo) -> None:
        self.tensors += 1
        self.parameters += numel(info.shape)
        self.shapes[info.shape] += 1
        self.dtypes[dtype_name(info.dtype)] += 1

    def as_json(self) -> dict[str, Any]:
        return {"tensors": self.tensors, "parameters": self.parameters,
                "shapes": [list(s) for s in self.shapes], "dtypes": dict(self.dtypes)}


@dataclass
class Structure:
    """A model's structure, as `mergelang inspect` shows it."""

    path: Path
    files: dict[Path, int]                  # weight file -> its size in bytes
    tensors: dict[str, TensorInfo]
    config: dict | None
    num_layers: int
    modules: dict[str, Group]               # module type -> its tensors
    layers: dict[str, Group]                # place_of() -> its tensors, in model order
    dtypes: Counter                         # dtype name -> parameters
    tied: list[str]
    missing: list[str]

    @property
    def parameters(self) -> int:
        return sum(numel(t.shape) for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(self.files.values())

    def highlights(self) -> dict[str, Any]:
        return {k: self.config[k] for k in CONFIG_HIGHLIGHTS if self.config and k in self.config}

    def as_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "files": [{"file": str(f), "bytes": n} for f, n in self.files.items()],
            "file_bytes": self.file_bytes,
            "tensors": len(self.tensors),
            "parameters": self.parameters,
            "dtypes": dict(self.dtypes),
            "num_layers": self.num_layers,
            "config": self.highlights(),
            "modules": {k: g.as_json() for k, g in self.modules.items()},
            "layers": {k: g.as_json() for k, g in self.layers.items()},
            "tied": self.tied,
            "missing": self.missing,
        }


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def inspect_model(path: str | Path) -> Structure:
    """Read a model's headers (no tensor data) and describe it. Raises MergeError."""
    try:
        model = open_model(Path(path))
    except ModelFileError as exc:
        raise MergeError(Diagnostic(exc.message, hint=exc.hint)) from None
    with model:
        try:
            layers = count_layers(model)
        except ModelFileError:  # config.json disagrees with the weights: say so, below
            layers = 1 + max((layer_of(n) for n in model.tensors
                              if layer_of(n) is not None), default=-1)
        return describe(Path(path), model.tensors, model.config, layers)


def describe(path: Path, tensors: dict[str, TensorInfo], config: dict | None,
             num_layers: int) -> Structure:
    """The structure of a set of tensors (a model's, or a merge's output)."""
    modules: dict[str, Group] = {}
    layers: dict[str, Group] = {}
    dtypes: Counter = Counter()
    files: dict[Path, int] = {}
    for name, info in tensors.items():
        modules.setdefault(module_of(name), Group()).add(info)
        layers.setdefault(place_of(name), Group()).add(info)
        dtypes[dtype_name(info.dtype)] += numel(info.shape)
        if info.file not in files and info.file.is_file():
            files[info.file] = info.file.stat().st_size
    layers = dict(sorted(layers.items(), key=lambda kv: place_order(kv[0])))
    structure = Structure(path, files, tensors, config, num_layers, modules, layers, dtypes,
                          [], [])
    _tied_and_missing(structure)
    return structure


def place_order(place: str) -> tuple[int, int]:
    """Sorts places as a model runs: before the layers, the layers, after them."""
    if place == "before":
        return (0, 0)
    if place == "after":
        return (2, 0)
    return (1, int(place))


def _tied_and_missing(s: Structure) -> None:
    config = s.config or {}
    embed = next((n for n in s.tensors if "embed_tokens" in n or n.endswith("wte.weight")), None)
    head = next((n for n in s.tensors if n.startswith("lm_head.")), None)
    tie = config.get("tie_word_embeddings")
    if embed is not None and head is None:
        if tie:
            s.tied.append(f"lm_head.weight is {embed} (tie_word_embeddings is true)")
        elif tie is False:
            s.missing.append("lm_head.weight: there is no output head, and config.json says "
                             "tie_word_embeddings is false")
    found = {int(p) for p in s.layers if p.isdigit()}
    if found:
        absent = sorted(set(range(max(found) + 1)) - found)
        if absent:
            s.missing.append(f"layers {_ranges(absent)}: no tensors at all")
    expected = config.get("num_hidden_layers")
    if isinstance(expected, int) and found and expected != max(found) + 1:
        s.missing.append(f"config.json says {expected} layers; the weights have "
                         f"{max(found) + 1}")
    where: dict[str, set[int]] = {}
    for name in s.tensors:
        layer = layer_of(name)
        if layer is not None:
            where.setdefault(module_of(name), set()).add(layer)
    for module, have in where.items():
        lacking = sorted(found - have)
        if lacking:
            s.missing.append(f"{module}: not in layers {_ranges(lacking)}")


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    out: list[str] = []
    start = prev = None
    for n in numbers + [None]:
        if start is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(out)


def count_text(n: float) -> str:
    """1234567 -> "1.23M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


def bytes_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def layer_runs(s: Structure) -> list[tuple[str, Group]]:
    """The layers grouped into runs of identical ones ("0-15" -> their common group), with
    the tensors before and after the layers as their own rows."""
    out: list[tuple[str, Group]] = []
    run: list[int] = []

    def close() -> None:
        if run:
            out.append((_ranges(run), s.layers[str(run[0])]))
            run.clear()

    for place, group in s.layers.items():
        if not place.isdigit():
            close()
            out.append((place, group))
            continue
        if run and _signature(s, place) != _signature(s, str(run[0])):
            close()
        run.append(int(place))
    close()
    return out


def _signature(s: Structure, place: str) -> tuple:
    g = s.layers[place]
    return (g.tensors, g.parameters, tuple(sorted(g.shapes.items())),
            tuple(sorted(g.dtypes.items())))


def render(s: Structure, console: Any) -> None:
    """`mergelang inspect` as rich tables."""
    from rich.table import Table

    console.print(f"[bold]{s.path}[/]  {len(s.tensors)} tensors, "
                  f"{count_text(s.parameters)} parameters, "
                  f"{bytes_text(s.file_bytes)} in {len(s.files)} file(s), "
                  f"{s.num_layers} layers")
    console.print("dtypes: " + ", ".join(f"{d} {count_text(n)}" for d, n in s.dtypes.items()))
    if s.highlights():
        console.print("config: " + ", ".join(f"{k}={v}" for k, v in s.highlights().items()))
    modules = Table(title="by module type", title_justify="left")
    for column in ("module", "tensors", "parameters", "share", "shape", "dtype"):
        modules.add_column(column, justify="right" if column in ("tensors", "parameters",
                                                                  "share") else "left")
    total = max(s.parameters, 1)
    for module, g in s.modules.items():
        modules.add_row(module, str(g.tensors), count_text(g.parameters),
                        f"{100 * g.parameters / total:.1f}%", _shapes(g), ", ".join(g.dtypes))
    console.print(modules)
    layers = Table(title="by layer", title_justify="left")
    for column in ("layers", "tensors", "parameters each"):
        layers.add_column(column, justify="left" if column == "layers" else "right")
    for place, g in layer_runs(s):
        layers.add_row(PLACE_LABELS.get(place, place), str(g.tensors), count_text(g.parameters))
    console.print(layers)
    if len(s.files) > 1:
        console.print("files: " + ", ".join(f"{f.name} {bytes_text(n)}"
                                            for f, n in s.files.items()))
    for line in s.tied:
        console.print(f"tied: {line}")
    for line in s.missing:
        console.print(f"[yellow]missing:[/] {line}")


def _shapes(g: Group) -> str:
    shapes = [f"{list(shape)}" for shape in g.shapes]
    return ", ".join(shapes[:2]) + (f" (+{len(shapes) - 2})" if len(shapes) > 2 else "")
