"""`mergelang compress FT --base BASE -o DELTA`: a task vector stored compactly, to be
applied later as `base + delta("DELTA")` (io/delta.py holds the file format).

Two compressions:

- `--density D`: the k = max(1, int(D * numel)) entries of largest |τ| of each tensor,
  τ = FT - BASE, chosen by `trim`'s exact selection (selection.py: the same entries, ties
  included, that `trim(ft - base, D)` keeps), stored as values and their positions (or
  a bit mask of them, where that is smaller);
- `--bits 1`: BitDelta (Liu et al. 2024): each matrix's τ as its signs and one scale per
  matrix, mean |τ|, as the reference code initialises it (FasterDecoding/BitDelta,
  `BinaryDiff`: `diff.float().abs().mean()`, bit 1 where τ >= 0); the paper then refines
  the scales by distillation, which needs data and is not done here. Vectors (norms,
  biases) are stored whole.

This is a streaming loop over the two models' tensors rather than a compiled program
written through the executor: the output is not a model (its tensors' sizes depend on
the compression, the top-k needs its two selection sweeps before anything can be
written, and the error figures need τ itself beside what is kept), so the executor's
sink, which receives finished rows of declared model tensors once, would have to buffer
whole tensors to do it. Here each tensor is read in blocks of rows that fit the memory
budget, twice more for a top-k selection of a tensor larger than one block, exactly as
`mergelang diff` feeds trim's selection.

Sizes and errors are reported per tensor and overall: stored bytes against the dense
task vector's (in the fine-tune's dtype), and the relative error ||τ - τ̂|| / ||τ||.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import Source, Span, error
from ..io.delta import (
    COPY,
    DENSE,
    SIGN,
    DeltaEntry,
    header_digest,
    plan_entry,
    sparse_form,
)
from ..io.dtypes import dtype_name
from ..io.errors import ModelFileError
from ..io.read import SafetensorsModel
from ..io.sources import open_plain_model
from ..schedule import DEFAULT_BUDGET
from .encode import TensorFigures, encode_tensor
from .writer import DeltaWriter

_COMMAND = "<command line>"


@dataclass
class Report:
    """What `compress` wrote: each tensor's figures, and the tensors left out (why)."""

    out: Path
    tensors: list[TensorFigures]

    @property
    def total(self) -> TensorFigures:
        total = TensorFigures("(all)", "", 0, 0)
        for t in self.tensors:
            total.stored += t.stored
            total.dense += t.dense
            total.norm_sq += t.norm_sq
            total.error_sq += t.error_sq
        return total

    def as_json(self) -> dict[str, Any]:
        def row(t: TensorFigures) -> dict[str, Any]:
            return {"tensor": t.name, "form": t.form, "stored_bytes": t.stored,
                    "dense_bytes": t.dense, "relative_error": t.relative_error}
        return {"output": str(self.out), "overall": row(self.total),
                "tensors": [row(t) for t in self.tensors]}


class CommandLine:
    """The compress command's arguments as one line of text, so a bad one is reported
    with a caret under it (as `-D` values are)."""

    def __init__(self, parts: list[tuple[str, str]]):
        text, self.cols = "mergelang compress", {}
        for key, value in parts:
            flag = "" if key == "ft" else f"{key} "
            text += f" {flag}"
            self.cols[key] = (len(text) + 1, len(text) + 1 + len(value))
            text += value
        self.source = Source(_COMMAND, text + "\n")

    def span(self, key: str) -> Span | None:
        if key not in self.cols:
            return None
        start, end = self.cols[key]
        return Span(self.source, 1, start, 1, max(end, start + 1))


def compress(ft: str | Path, base: str | Path, out: str | Path, *,
             density: float | None = None, bits: int | None = None, force: bool = False,
             budget: int = DEFAULT_BUDGET, values: torch.dtype | None = None,
             where: CommandLine | None = None,
             progress: Callable[[TensorFigures, int], None] | None = None) -> Report:
    """Write the task vector ft - base, compressed, to the file `out`; nothing is left
    there on an error. Kept values are stored in `values` (default: the fine-tune's
    dtype; float32 keeps them exact). `progress(figures, total)` is told of each tensor
    as it is done, and how many there are. Raises MergeError."""
    def at(key: str) -> Span | None:
        return where.span(key) if where is not None else None

    _check_options(density, bits, at)
    out = Path(out)
    _check_output(out, force, [Path(ft), Path(base)], at)
    models = []
    try:
        for key, path in (("--base", base), ("ft", ft)):
            try:
                models.append(open_plain_model(Path(path)))
            except ModelFileError as exc:
                raise error(exc.message, at(key), hint=exc.hint) from None
        base_model, ft_model = models
        plans = _layout(base_model, ft_model, density, bits, values, at)
        fields = {"base": str(base), "finetune": str(ft),
                  "base_header": header_digest(base_model.tensors),
                  "base_tensors": json.dumps(
                      {n: [list(t.shape), dtype_name(t.dtype)]
                       for n, t in base_model.tensors.items()}, separators=(",", ":")),
                  **({"density": repr(density)} if density is not None else {"bits": "1"})}
        try:
            writer = DeltaWriter(out, plans, fields)
        except ModelFileError as exc:
            raise error(exc.message, at("-o"), hint=exc.hint) from None
        try:
            figures = []
            for entry in plans:
                figures.append(encode_tensor(entry, base_model, ft_model, density, budget, writer))
                if progress is not None:
                    progress(figures[-1], len(plans))
            writer.commit()
        except ModelFileError as exc:
            writer.abort()
            raise error(exc.message, at("-o"), hint=exc.hint) from None
        except BaseException:
            writer.abort()
            raise
        return Report(out, figures)
    finally:
        for m in models:
            m.close()


def _check_options(density: float | None, bits: int | None, at) -> None:
    if density is None and bits is None:
        raise error("compress needs --density D (keep the top D of each tensor) or --bits 1 "
                    "(BitDelta)", None, hint="e.g. --density 0.1")
    if density is not None and bits is not None:
        raise error("--density and --bits are two compressions; give one", at("--bits"),
                    hint="--density 0.1 keeps a tenth of the entries; --bits 1 keeps signs")
    if density is not None and not (0 < density <= 1):  # NaN fails too
        raise error(f"--density must be in (0, 1], not {density:g}", at("--density"),
                    hint="e.g. --density 0.1: the top 10% of each tensor by magnitude")
    if bits is not None and bits != 1:
        raise error(f"--bits {bits} is not supported: only 1 (BitDelta's signs and a scale)",
                    at("--bits"), hint="--bits 1, or --density D for a sparse delta")


def _check_output(out: Path, force: bool, inputs: list[Path], at) -> None:
    span = at("-o")
    if out.is_dir():
        raise error(f"output {out} is a folder; a delta is one file", span,
                    hint="name a file, e.g. -o math.delta")
    if (out.exists() or out.is_symlink()) and not force:
        raise error(f"output {out} already exists", span, hint="pass --force to replace it")
    if not out.parent.is_dir():
        raise error(f"the folder of {out} does not exist", span,
                    hint=f"make it first (mkdir -p {out.parent})")
    real = Path(os.path.realpath(out))
    for path in inputs:
        kept = Path(os.path.realpath(path))
        if kept == real or kept in real.parents:
            raise error(f"output {out} is inside {path}, which compress reads", span,
                        hint="write the delta elsewhere")


def _layout(base: SafetensorsModel, ft: SafetensorsModel, density: float | None,
            bits: int | None, values: torch.dtype | None, at
            ) -> list[DeltaEntry]:
    """Each tensor's form and parts, from the headers alone; errors for models that are
    not a fine-tune and its base."""
    extra = [n for n in ft.tensors if n not in base.tensors]
    if extra:
        raise error(f"tensor {extra[0]!r} of the fine-tune is not in the base"
                    + (f" ({len(extra) - 1} more are not either)" if len(extra) > 1 else ""),
                    at("--base"), hint="compress takes a fine-tune and the base it was "
                                       "trained from")
    plans = []
    order = sorted(base.tensors.values(), key=lambda t: (str(t.file), t.offset))
    for info in order:
        other = ft.tensors.get(info.name)
        if other is None:
            raise error(f"tensor {info.name!r} of the base is not in the fine-tune", at("ft"),
                        hint="compress takes a fine-tune and the base it was trained from")
        if other.shape != info.shape:
            raise error(f"tensor {info.name!r} is {list(info.shape)} in the base but "
                        f"{list(other.shape)} in the fine-tune", at("ft"),
                        hint="compress takes a fine-tune and the base it was trained from")
        if not info.dtype.is_floating_point or not other.dtype.is_floating_point:
            plans.append(plan_entry(info.name, info.shape, other.dtype, COPY))
            continue
        numel = math.prod(info.shape)
        if density is not None:
            k = min(numel, max(1, int(density * numel)))
            plans.append(plan_entry(info.name, info.shape, values or other.dtype,
                                    sparse_form(numel, k), k))
        else:
            form = SIGN if len(info.shape) >= 2 else DENSE
            plans.append(plan_entry(info.name, info.shape, values or other.dtype, form))
    return plans


def add_parser(sub: Any) -> Any:
    """The `compress` subcommand (cli.py registers it)."""
    from .command import add_parser as add
    return add(sub)
