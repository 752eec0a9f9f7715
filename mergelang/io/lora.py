"""`lora("folder")`: a PEFT LoRA adapter as the task vector it adds to its model.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. For each
module it adapts, the file holds `lora_A` (r x in) and `lora_B` (out x r), and PEFT's
`merge_and_unload` adds `scale * B @ A` to the module's weight (transposed for an
embedding, and for a layer stored transposed, `fan_in_fan_out`). With `lora_bias`, B is
a linear layer with a bias, `lora_B.bias` (out), which the merge adds to the module's
bias at the same scale. Other tensors in the file (`modules_to_save`, embedding layers
saved whole) replace the model's.

So the adapter denotes a delta, tensor by tensor: `scale * B @ A` on every targeted
weight, `scale * lora_B.bias` on a targeted module's bias, `saved - M` on a saved one,
zero on every other tensor of the model, where M is the model it is attached to: the
model `lora("x", base=m)` names, else the first plain `model(...)` of the program (the
REPL: the first model of the session), which gives the tensor names and shapes;
`M + lora(...)` is then what PEFT's merge makes of M. Only saved modules depend on M's
values (`needs_base`): bind warns when such an adapter is measured against the first of
several models by default. Nothing of the model is held: each delta (or a block of its
rows) is computed when the executor asks for it, from the few MB of A and B, as the
float32 rounding of an exact product (`factors`, `exact_product`), so its bytes do not
depend on the rows asked for or the threads.

Opening reads `adapter_config.json` and the safetensors header and checks their
agreement (pairs of A and B of one rank, the rank the config gives, targets the config
names, B's bias exactly where the config sets lora_bias); attaching checks every target
(and its bias) against the model's headers. Neither reads a tensor, so
`mergelang check` costs nothing more with adapters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import ModelFileError
from .lora_config import CONFIG_NAME, PREFIX, LoraConfig, read_lora_config
from .read import SafetensorsModel, TensorInfo, open_model
from .sources import register_kind

KIND = "lora"
WEIGHTS_NAME = "adapter_model.safetensors"
_LINEAR = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.(?P<side>bias)$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<side>[AB])(?:\.[^.]+)?$")
_ZERO = torch.zeros((), dtype=torch.float32)
_EMBEDDING_LAYERS = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings")
_RESAVE = "the adapter is damaged; save it again with PEFT (peft_model.save_pretrained)"
_WRONG_MODEL = "apply the adapter to the model it was trained for (base_model_name_or_path " \
               "in adapter_config.json)"


@dataclass(frozen=True)
class _Pair:
    """One adapted module: its A and B tensors in the adapter's file, and B's bias
    (lora_bias)."""

    module: str
    a: TensorInfo
    b: TensorInfo
    embedding: bool
    bias: TensorInfo | None = None


@dataclass(frozen=True)
class _Part:
    """What the delta of one model tensor is made of."""

    pair: _Pair | None = None
    scale: float = 0.0
    transposed: bool = False
    bias: TensorInfo | None = None  # lora_B's bias: scale times it is the module's bias's
    saved: str | None = None  # an adapter tensor replacing the model's


class LoraSource:
    """A LoRA adapter as a model source (bind.ModelSource) of deltas; see the module
    docstring. `tensors` is empty until `attach`, then lists every tensor of the model."""

    def __init__(self, path: Path, config: LoraConfig, weights: SafetensorsModel,
                 pairs: dict[str, _Pair], saved: dict[str, str]) -> None:
        self.path, self.lora, self.weights = path, config, weights
        self.pairs, self.saved = pairs, saved
        self.folder: Path | None = None  # not a model folder: never a donor's files
        self.config: dict | None = None
        self.tensors: dict[str, TensorInfo] = {}  # filled in place by attach
        self.model: Any = None
        self._parts: dict[str, _Part] = {}

    @property
    def needs_base(self) -> bool:
        """Whether the delta depends on the values of the model it is attached to, not
        only its names and shapes: a module saved whole is measured against them."""
        return bool(self.saved)

    def attach(self, frame: list[Any]) -> None:
        """Take the tensor names and shapes of the first model of `frame` (its `base=`,
        else the program's plain models in order); an adapter is attached once (a REPL
        session attaches it when it is first named). Raises ModelFileError, naming the
        module, for an adapter that does not fit."""
        if self.model is not None:
            return
        if not frame:
            raise ModelFileError(
                "an adapter is a change to a model, but there is no model(...) to take its "
                "tensor names and shapes from",
                hint='name the model it adapts too, e.g. model("base") + lora("adapter")')
        model = frame[0]
        parts = {f"{p.module}.weight": self._fit(p, model) for p in self.pairs.values()}
        parts.update((f"{p.module}.bias", self._fit_bias(p, model))
                     for p in self.pairs.values() if p.bias is not None)
        for name, stored in self.saved.items():
            info, mine = model.tensors.get(name), self.weights.tensors[stored]
            if info is None or info.shape != mine.shape:
                found = f"has shape {list(info.shape)}" if info else "has no such tensor"
                raise ModelFileError(
                    f"{self.path} saves {name!r} whole, with shape {list(mine.shape)}, but "
                    f"{_name(model)} {found}", hint=_WRONG_MODEL)
            parts[name] = replace(parts[name], saved=stored) if name in parts else \
                _Part(saved=stored)
        tensors = {}
        for name, info in model.tensors.items():
            if not info.dtype.is_floating_point:
                tensors[name] = info  # not a float: passed through (copied as it is)
                continue
            read = self._read(parts.get(name))  # what is read for it: nbytes counts those
            tensors[name] = TensorInfo(name, info.shape, torch.float32, self.weights.path,
                                       min((t.offset for t in read), default=0),
                                       sum(t.nbytes for t in read))
        self.model, self._parts, self.config = model, parts, model.config
        self.tensors.update(tensors)

    def _fit(self, pair: _Pair, model: Any) -> _Part:
        """The part of a targeted weight, checked against the model's header."""
        name = f"{pair.module}.weight"
        info = model.tensors.get(name)
        if info is None:
            raise ModelFileError(
                f"{self.path} adapts {pair.module!r}, but {_name(model)} has no tensor "
                f"{name!r}", hint=_WRONG_MODEL)
        transposed = pair.embedding or self.lora.fan_in_fan_out
        rows, cols = pair.b.shape[0], pair.a.shape[1]
        shape = (cols, rows) if transposed else (rows, cols)
        if info.shape != shape or not info.dtype.is_floating_point:
            hint = _WRONG_MODEL
            if info.shape == shape[::-1] and not pair.embedding:
                hint = ("the layer stores its weight the other way round: correct "
                        "fan_in_fan_out in adapter_config.json")
            raise ModelFileError(
                f"{self.path} adapts {pair.module!r} with B {list(pair.b.shape)} @ A "
                f"{list(pair.a.shape)}{' transposed' if transposed else ''}, which makes "
                f"{list(shape)}, but {name!r} of {_name(model)} is {list(info.shape)} "
                f"({str(info.dtype).removeprefix('torch.')})", hint=hint)
        return _Part(pair, self.lora.scale(pair.module), transposed)

    def _fit_bias(self, pair: _Pair, model: Any) -> _Part:
        """The part of a targeted module's bias (lora_bias): PEFT's merge adds
        `scale * lora_B.bias` to it, and fails where the module has no bias."""
        name, bias = f"{pair.module}.bias", pair.bias
        info = model.tensors.get(name)
        if info is None:
            raise ModelFileError(
                f"{self.path} adapts {pair.module!r} with a bias (lora_bias), but "
                f"{_name(model)} has no tensor {name!r}: the module has no bias to add it "
                "to, and PEFT cannot merge it either",
                hint="PEFT makes such an adapter (warning that it cannot be merged) when "
                     "lora_bias is set for layers without a bias: train it again without "
                     "lora_bias, or apply it to the model it was trained for if that one "
                     "has the biases")
        if info.shape != bias.shape or not info.dtype.is_floating_point:
            raise ModelFileError(
                f"{self.path} adapts {pair.module!r} with a bias (lora_bias) of shape "
                f"{list(bias.shape)}, but {name!r} of {_name(model)} is {list(info.shape)} "
                f"({str(info.dtype).removeprefix('torch.')})", hint=_WRONG_MODEL)
        return _Part(scale=self.lora.scale(pair.module), bias=bias)

    def _read(self, part: _Part | None) -> list[TensorInfo]:
        """The adapter's tensors a delta is computed from (none for a zero)."""
        if part is None:
            return []
        pair = [part.pair.a, part.pair.b] if part.pair else []
        pair += [part.bias] if part.bias is not None else []
        return pair + ([self.weights.tensors[part.saved]] if part.saved else [])

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor:
        """The delta of one model tensor (or rows [start, stop) of it), computed in
        float32 and converted to `dtype` if given: memory of its own, but for a view
        (view=True) of an untargeted tensor, a single zero expanded to its shape."""
        if self.model is None:
            raise ValueError(f"adapter {self.path} is not attached to a model")
        info = self.tensors[name]
        if not info.dtype.is_floating_point:
            return self.model.load(name, rows, dtype, view)
        part = self._parts.get(name)
        if part is None:
            length = rows[1] - rows[0] if rows else (info.shape[0] if info.shape else None)
            shape = (length, *info.shape[1:]) if length is not None else ()
            if view and dtype is None:  # nothing writes to a view: one zero, no memory
                return _ZERO.expand(shape)
            return torch.zeros(shape, dtype=dtype or torch.float32)
        delta = self._delta(name, part, rows)
        return delta if dtype is None or dtype == delta.dtype else delta.to(dtype)

    def _delta(self, name: str, part: _Part, rows: tuple[int, int] | None) -> torch.Tensor:
        f32 = torch.float32
        delta = None
        if part.pair is not None:
            b, a = factors(self.weights.load(part.pair.b.name, dtype=f32),
                           self.weights.load(part.pair.a.name, dtype=f32))
            if part.transposed:  # rows of (B @ A)^T are columns of A: A[:, rows]^T @ B^T
                a = a[:, rows[0]:rows[1]] if rows else a
                delta = exact_product(a.t(), b.t())
            else:
                delta = exact_product(b[rows[0]:rows[1]] if rows else b, a)
            delta.mul_(part.scale)
        elif part.bias is not None:  # as PEFT's merge: lora_B.bias * scaling, in float32
            delta = self.weights.load(part.bias.name, rows, dtype=f32).mul_(part.scale)
        if part.saved is not None:
            change = self.weights.load(part.saved, rows, dtype=f32)
            change.sub_(self.model.load(name, rows, dtype=f32))
            delta = change if delta is None else delta.add_(change)
        return delta

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Let go of a view: only a passed-through tensor of the model is one."""
        info = self.tensors.get(name)
        if info is not None and not info.dtype.is_floating_point and self.model is not None:
            self.model.release(name, rows)

    def close(self) -> None:
        """Close the adapter's file (the model is closed by whoever opened it)."""
        self.weights.close()

    def __repr__(self) -> str:
        return f"LoraSource({str(self.path)!r}, {len(self.pairs)} modules)"


def open_lora(path: Path) -> LoraSource:
    """Open a PEFT LoRA adapter folder, reading its config and its header only.
    Raises ModelFileError for a folder that is not a usable LoRA adapter."""
    p = Path(path).expanduser()
    _check_folder(p)
    config = read_lora_config(p)
    weights = open_model(p / WEIGHTS_NAME)
    try:
        pairs, saved = _read_tensors(p, config, weights)
    except ModelFileError:
        weights.close()
        raise
    return LoraSource(p, config, weights, pairs, saved)


def _check_folder(p: Path) -> None:
    try:
        is_dir = p.is_dir()
        exists = is_dir or p.exists()
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read adapter path {p}: {e}", hint="check the path") \
            from None
    if not exists:
        raise ModelFileError(f"adapter path {p} does not exist",
                             hint="check the path; a PEFT adapter is a folder saved by "
                                  "peft_model.save_pretrained(folder)")
    if not is_dir:
        raise ModelFileError(
            f"{p} is a file; lora() takes a PEFT adapter folder ({CONFIG_NAME} and "
            f"{WEIGHTS_NAME})", hint="name the adapter's folder"
            + (f" ({p.parent})" if (p.parent / CONFIG_NAME).is_file() else ""))
    if not (p / CONFIG_NAME).exists():
        full = (p / "config.json").is_file()
        raise ModelFileError(
            f"{p} is not a LoRA adapter: it has no {CONFIG_NAME}",
            hint="it holds a whole model: name it with model(...)" if full else
            "a PEFT adapter folder holds adapter_config.json beside adapter_model.safetensors")
    if not (p / WEIGHTS_NAME).exists():
        pickled = (p / "adapter_model.bin").exists()
        raise ModelFileError(
            f"{p} has no {WEIGHTS_NAME}"
            + (" (only adapter_model.bin: pickled weights are not loaded, they can run "
               "code)" if pickled else ""),
            hint="load the adapter with PEFT and save it with safe_serialization=True"
            if pickled else "the adapter is incomplete; save or download it again")


def _read_tensors(p: Path, config: LoraConfig, weights: SafetensorsModel
                  ) -> tuple[dict[str, _Pair], dict[str, str]]:
    """The adapted modules (A and B, and B's bias, paired and checked) and the saved
    tensors (model name -> name in the file), from the header."""
    sides: dict[str, dict[str, TensorInfo]] = {}
    embedding: dict[str, bool] = {}
    saved: dict[str, str] = {}
    for stored, info in weights.tensors.items():
        key = stored.removeprefix(PREFIX)
        match = _LINEAR.match(key) or _EMBEDDING.match(key) or _BIAS.match(key)
        if match is None:
            name = _model_name(p, config, stored, key)
            saved[name] = stored
            continue
        module = match["module"]
        if not config.targets(module):
            raise ModelFileError(f"{p / WEIGHTS_NAME} holds LoRA weights for {module!r}, "
                                 f"which target_modules in {CONFIG_NAME} does not name",
                                 hint=_RESAVE)
        vector = match.re is _BIAS
        if len(info.shape) != (1 if vector else 2) or not info.dtype.is_floating_point:
            raise ModelFileError(
                f"{stored!r} in {p / WEIGHTS_NAME} is {list(info.shape)} "
                f"{str(info.dtype).removeprefix('torch.')}; LoRA "
                + ("biases are float vectors" if vector else "weights are float matrices"),
                hint="convolution adapters are not supported yet" if len(info.shape) == 4
                else _RESAVE)
        sides.setdefault(module, {})[match["side"]] = info
        if not vector:
            embedding[module] = match.re is _EMBEDDING
    pairs = {}
    for module, found in sides.items():
        if not {"A", "B"} <= set(found):
            has = "lora_A" if "A" in found else "lora_B" if "B" in found else "lora_B.bias"
            lacks = " or ".join(f"lora_{side}" for side in "AB" if side not in found)
            raise ModelFileError(f"{p / WEIGHTS_NAME} holds {has} for {module!r} but "
                                 f"no {lacks}", hint=_RESAVE)
        a, b = found["A"], found["B"]
        rank = config.rank(module)
        if a.shape[0] != b.shape[1]:
            raise ModelFileError(
                f"the ranks of {module!r} in {p} disagree: lora_A is {list(a.shape)} (rank "
                f"{a.shape[0]}), lora_B is {list(b.shape)} (rank {b.shape[1]})", hint=_RESAVE)
        if a.shape[0] != rank:
            raise ModelFileError(
                f"lora_A and lora_B of {module!r} in {p} have rank {a.shape[0]}, but "
                f"{CONFIG_NAME} gives it rank {rank} (r, or rank_pattern)", hint=_RESAVE)
        pairs[module] = _Pair(module, a, b, embedding[module],
                              _lora_bias(p, config, module, found, embedding[module]))
    return pairs, saved


def _lora_bias(p: Path, config: LoraConfig, module: str, found: dict[str, TensorInfo],
               embedding: bool) -> TensorInfo | None:
    """lora_B's bias of a module, checked as PEFT builds it: there exactly when the
    config sets lora_bias, one entry per row of B, and never on an embedding (PEFT
    refuses lora_bias there, so it could not load the adapter)."""
    bias, b = found.get("bias"), found["B"]
    if bias is not None and not config.lora_bias:
        raise ModelFileError(
            f"{p / WEIGHTS_NAME} holds lora_B.bias for {module!r}, but {CONFIG_NAME} does "
            "not set lora_bias, so PEFT would leave it out", hint=_RESAVE)
    if config.lora_bias and embedding:
        raise ModelFileError(
            f"{p / CONFIG_NAME} sets lora_bias, but {module!r} is an adapted embedding, "
            "which PEFT gives no bias (it refuses to load such an adapter)",
            hint="save the adapter again without lora_bias, or without the embedding in "
                 "target_modules")
    if config.lora_bias and bias is None:
        raise ModelFileError(
            f"{p / CONFIG_NAME} sets lora_bias, but {p / WEIGHTS_NAME} holds no "
            f"lora_B.bias for {module!r}", hint=_RESAVE)
    if bias is not None and bias.shape != (b.shape[0],):
        raise ModelFileError(
            f"lora_B.bias of {module!r} in {p} is {list(bias.shape)}, but lora_B is "
            f"{list(b.shape)}: its bias has one entry per row, [{b.shape[0]}]", hint=_RESAVE)
    return bias


def _model_name(p: Path, config: LoraConfig, stored: str, key: str) -> str:
    """The model's name of a tensor saved whole (`lm_head.modules_to_save.default.weight`
    or `lm_head.weight` -> `lm_head.weight`; `embed_tokens.base_layer.weight` ->
    `embed_tokens.weight`), refusing one the config gives no reason to hold."""
    parts = key.split(".")
    marked = "base_layer" in parts or "modules_to_save" in parts
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        del parts[i:i + (2 if len(parts) - i > 2 else 1)]  # and the adapter's name
    parts = [x for x in parts if x != "base_layer"]
    name = ".".join(parts)
    module = name.rpartition(".")[0]
    if "lora_" in key or not (marked or config.saves(module)
                              or module.rpartition(".")[2] in _EMBEDDING_LAYERS):
        raise ModelFileError(
            f"{p / WEIGHTS_NAME} holds {stored!r}, which is neither a LoRA weight "
            f"(lora_A, lora_B) nor a module {CONFIG_NAME} saves (modules_to_save)",
            hint="DoRA and other LoRA variants are not supported yet; " + _RESAVE)
    return name


def factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out x r) and A (r x in) in float64, ready for an exact product.

    Each rank component k is first rescaled by a power of two, B[:, k] up and A[k, :]
    down (exact, and B @ A is unchanged), so that B's column and A's row have about the
    same largest magnitude; then each row of B and each column of A is rounded to its
    grid (on_grid, with grid_bits(r) bits). The statistics are of the whole of B and A,
    so a block of rows gets the same factors as the whole tensor."""
    b, a = b.double(), a.double()
    _, b_exp = torch.frexp(b.abs().amax(dim=0))
    _, a_exp = torch.frexp(a.abs().amax(dim=1))
    shift = torch.div(a_exp - b_exp, 2, rounding_mode="floor")
    b_bits, a_bits = grid_bits(a.shape[0])
    return (on_grid(b * _power_of_two(shift), 1, b_bits),
            on_grid(a * _power_of_two(-shift).unsqueeze(1), 0, a_bits))


def on_grid(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    """x (float64) with each entry rounded, half to even, to a multiple of 2^(e - bits),
    where 2^e is just above the largest magnitude along `dim`: the largest entries keep
    all their bits when bits >= 24 (float32's)."""
    _, exponent = torch.frexp(x.abs().amax(dim=dim, keepdim=True))
    scale = _power_of_two(bits - exponent)
    return torch.round(x * scale).div_(scale)


def exact_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A in float32 for factors on their grids (`factors`): each product is then an
    integer times one power of two per entry, and their sum an integer below 2^53, so the
    float64 matmul is exact whatever the order of its additions, and the result does
    not depend on the rows asked for, the BLAS kernel or the thread count. A float32
    matmul's rounding does, and a delta computed a block of rows at a time would differ
    in its last bits from one computed whole."""
    return (b @ a).float()


def grid_bits(rank: int) -> tuple[int, int]:
    """Bits kept of B's rows and A's columns: together 53 less those a sum of `rank`
    terms needs (25 and 24 at rank 16: float32's 24 bits for the largest entries)."""
    total = 53 - max(rank - 1, 0).bit_length()
    return (total + 1) // 2, total // 2


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2.0 ** exponent, made from its bits, so exactly a power of two (|exponent| < 1023)."""
    return ((exponent.long() + 1023) << 52).view(torch.float64)


def _name(model: Any) -> str:
    return str(getattr(model, "path", None) or model.folder or "the model")


register_kind(KIND, open_lora)
