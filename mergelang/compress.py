"""`mergelang compress FT --base BASE -o DELTA`: a task vector stored compactly, to be
applied later as `base + delta("DELTA")` (io/delta.py holds the file format).

Two compressions:

- `--density D`: the k = max(1, int(D * numel)) entries of largest |τ| of each tensor,
  τ = FT - BASE, chosen by `trim`'s exact selection (selection.py: the same entries, ties
  included, that `trim(ft - base, D)` keeps), stored as values and positions;
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

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .diagnostics import Diagnostic, MergeError, Source, Span, error
from .io.delta import (
    DENSE,
    DIGEST_CHARS,
    MASK,
    SIGN,
    TOPK,
    DeltaEntry,
    DeltaWriter,
    digest,
    header_digest,
    pack_bits,
    plan_entry,
    sparse_form,
    tensor_digest,
)
from .io.dtypes import dtype_name
from .io.errors import ModelFileError
from .io.read import SafetensorsModel, open_model
from .io.write import parse_size
from .ops.sparsify import top_k
from .reduce import Chunk
from .schedule import DEFAULT_BUDGET, DEFAULT_BUDGET_TEXT
from .selection import keep_top

_COMMAND = "<command line>"
_VALUES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TensorFigures:
    """One tensor's compression: bytes stored and dense, and the squared norms of τ and
    of the error τ - τ̂."""

    name: str
    form: str
    stored: int
    dense: int
    norm_sq: float = 0.0
    error_sq: float = 0.0

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.norm_sq) if self.norm_sq else 0.0


@dataclass
class Report:
    """What `compress` wrote: each tensor's figures, and the tensors left out (why)."""

    out: Path
    tensors: list[TensorFigures]
    skipped: dict[str, str] = field(default_factory=dict)

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
                "tensors": [row(t) for t in self.tensors],
                "skipped": [{"tensor": k, "reason": v} for k, v in self.skipped.items()]}


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
             progress: Callable[[TensorFigures], None] | None = None) -> Report:
    """Write the task vector ft - base, compressed, to the file `out`; nothing is left
    there on an error. Kept values are stored in `values` (default: the fine-tune's
    dtype; float32 keeps them exact). Raises MergeError."""
    def at(key: str) -> Span | None:
        return where.span(key) if where is not None else None

    _check_options(density, bits, at)
    out = Path(out)
    _check_output(out, force, [Path(ft), Path(base)], at)
    models = []
    try:
        for key, path in (("--base", base), ("ft", ft)):
            try:
                models.append(open_model(Path(path)))
            except ModelFileError as exc:
                raise error(exc.message, at(key), hint=exc.hint) from None
        base_model, ft_model = models
        plans, skipped = _layout(base_model, ft_model, density, bits, values, at)
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
                figures.append(_tensor(entry, base_model, ft_model, density, budget, writer))
                if progress is not None:
                    progress(figures[-1])
            writer.commit()
        except ModelFileError as exc:
            writer.abort()
            raise error(exc.message, at("-o"), hint=exc.hint) from None
        except BaseException:
            writer.abort()
            raise
        return Report(out, figures, skipped)
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
            ) -> tuple[list[DeltaEntry], dict[str, str]]:
    """Each tensor's form and parts, from the headers alone; errors for models that are
    not a fine-tune and its base."""
    extra = [n for n in ft.tensors if n not in base.tensors]
    if extra:
        raise error(f"tensor {extra[0]!r} of the fine-tune is not in the base"
                    + (f" ({len(extra) - 1} more are not either)" if len(extra) > 1 else ""),
                    at("--base"), hint="compress takes a fine-tune and the base it was "
                                       "trained from")
    plans, skipped = [], {}
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
            skipped[info.name] = "not a floating-point tensor"
            continue
        numel = math.prod(info.shape)
        if density is not None:
            k = min(numel, max(1, int(density * numel)))
            plans.append(plan_entry(info.name, info.shape, values or other.dtype,
                                    sparse_form(numel, k), k))
        else:
            form = SIGN if len(info.shape) >= 2 else DENSE
            plans.append(plan_entry(info.name, info.shape, values or other.dtype, form))
    return plans, skipped


def _tensor(entry: DeltaEntry, base: SafetensorsModel, ft: SafetensorsModel,
            density: float | None, budget: int, writer: DeltaWriter) -> TensorFigures:
    name, shape, numel = entry.name, entry.shape, entry.numel
    rows = shape[0] if shape else 1
    row_numel = numel // rows if rows else 0
    # float32 rows held at once: base, fine-tune, τ, |τ|, its keys and counts, the mask
    chunk_rows = max(1, min(rows, budget // max(1, row_numel * 4 * 8)))
    if entry.form in (SIGN, MASK):  # blocks start on a byte of bits
        step = 8 // math.gcd(row_numel or 8, 8)
        chunk_rows = min(rows, -(-chunk_rows // step) * step)
    chunks = [(r, min(r + chunk_rows, rows)) for r in range(0, rows, chunk_rows)]
    whole = len(chunks) == 1

    def load(r: tuple[int, int]) -> torch.Tensor:
        part = None if whole else r
        tau = ft.load(name, part, torch.float32)
        return tau.sub_(base.load(name, part, torch.float32)).reshape(-1)

    figures = TensorFigures(name, entry.form, entry.stored_bytes,
                            numel * ft.tensors[name].dtype.itemsize)
    hashes = [digest() for _ in entry.parts]
    parts = list(entry.parts)
    encode = {TOPK: _encode_topk, MASK: _encode_topk, SIGN: _encode_sign,
              DENSE: _encode_dense}[entry.form]
    encode(entry, chunks, row_numel, load, density, figures,
           lambda i, first, values: (writer.write(parts[i], first, values),
                                     hashes[i].update(_raw(values))))
    entry.base = tensor_digest(base, name)
    combined = digest()
    for h in hashes:
        combined.update(h.digest())
    entry.data = combined.hexdigest()[:DIGEST_CHARS]
    return figures


def _raw(values: torch.Tensor) -> memoryview:
    flat = values.reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _sq(x: torch.Tensor) -> float:
    return float(torch.dot(x, x)) if x.numel() else 0.0


def _encode_topk(entry, chunks, row_numel, load, density, figures, put) -> None:
    name, numel = entry.name, entry.numel
    masked = entry.form == MASK
    index_dtype = None if masked else entry.parts[f"{name}/indices"][0]
    selection = top_k(numel, density, "tensor")
    stats = selection.result() if selection.sweeps(len(chunks)) == 0 else None
    while stats is None:  # the exact selection's sweeps (two for a tensor in blocks)
        for r in chunks:
            selection.add(load(r).abs_(), Chunk(numel, r[0] * row_numel, tensor=name))
        if selection.finish_sweep():
            stats = selection.result()
    state: dict = {}
    written = 0
    for r in chunks:
        tau = load(r)
        keep = keep_top(tau.abs(), *stats, state)
        at = keep.nonzero().squeeze(1)
        kept = tau[at]
        stored = kept.to(entry.dtype)
        if masked:  # parts: the mask, then the values
            put(0, r[0] * row_numel // 8, pack_bits(keep))
            put(1, written, stored)
        else:  # the values, then their positions
            put(0, written, stored)
            put(1, written, (at + r[0] * row_numel).to(index_dtype))
        written += at.numel()
        figures.norm_sq += _sq(tau)
        figures.error_sq += _sq(tau.masked_fill_(keep, 0)) + _sq(kept - stored.float())
    if written != entry.parts[f"{name}/values"][1][0]:
        raise AssertionError(f"the top-k of {name!r} kept {written} entries")


def _encode_sign(entry, chunks, row_numel, load, density, figures, put) -> None:
    total_abs = 0.0
    for r in chunks:
        tau = load(r)
        put(0, r[0] * row_numel // 8, pack_bits(tau >= 0))
        total_abs += float(tau.abs().sum(dtype=torch.float64))
        figures.norm_sq += _sq(tau)
    n = entry.numel
    scale = torch.tensor(total_abs / n if n else 0.0, dtype=torch.float32)
    put(1, 0, scale)
    s = float(scale)
    # sum (|τ| - s)^2, τ = 0 counting as +s as the reference code does
    figures.error_sq = max(0.0, figures.norm_sq - 2 * s * total_abs + n * s * s)


def _encode_dense(entry, chunks, row_numel, load, density, figures, put) -> None:
    for r in chunks:
        tau = load(r)
        stored = tau.to(entry.dtype)
        put(0, r[0] * row_numel, stored)
        figures.norm_sq += _sq(tau)
        figures.error_sq += _sq(tau - stored.float())


# --- the command ------------------------------------------------------------------------


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `compress` subcommand (cli.py registers it)."""
    p = sub.add_parser("compress", help="store a fine-tune's task vector compactly (sparse "
                                        "or 1-bit), to apply later as base + delta(...)")
    p.add_argument("ft", type=Path, help="the fine-tuned model")
    p.add_argument("--base", type=Path, required=True, help="the model it was trained from")
    p.add_argument("--density", help="keep the top DENSITY of each tensor by magnitude, "
                                     "in (0, 1]")
    p.add_argument("--bits", help="1: BitDelta's signs and a scale per matrix")
    p.add_argument("--values", choices=sorted(_VALUES),
                   help="the dtype kept values are stored in (default: the fine-tune's); "
                        "float32 keeps them exact")
    p.add_argument("-o", "--output", type=Path, required=True, help="the delta file")
    p.add_argument("--force", action="store_true", help="replace an existing delta file")
    p.add_argument("--max-memory", default=DEFAULT_BUDGET_TEXT,
                   help=f"tensor data held at once (default {DEFAULT_BUDGET_TEXT})")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace, console: Console) -> int:
    where = CommandLine([(k, v) for k, v in (
        ("ft", str(args.ft)), ("--base", str(args.base)), ("--density", args.density),
        ("--bits", args.bits), ("-o", str(args.output)),
        ("--max-memory", args.max_memory if args.max_memory != DEFAULT_BUDGET_TEXT else None))
        if v is not None])
    density = _number(args.density, float, "--density", where, "0.1")
    bits = _number(args.bits, int, "--bits", where, "1")
    try:
        budget = parse_size(args.max_memory, minimum=1)
    except ValueError as exc:
        raise error(str(exc), where.span("--max-memory"), hint="e.g. --max-memory 500MB"
                    ) from None
    report = compress(args.ft, args.base, args.output, density=density, bits=bits,
                      values=_VALUES.get(args.values),
                      force=args.force, budget=budget, where=where)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    elif not args.quiet:
        _render(report, Console(highlight=False))
        console.print(f"wrote {args.output}")
    return 0


def _number(text: str | None, kind: type, key: str, where: CommandLine, example: str) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise MergeError(Diagnostic(f"{key} takes a number, not {text!r}", where.span(key),
                                    hint=f"e.g. {key} {example}")) from None


def _render(report: Report, out: Console) -> None:
    table = Table(title=f"{report.out}", show_edge=False)
    for column in ("tensor", "form", "stored", "dense", "ratio", "rel. error"):
        table.add_column(column, justify="left" if column in ("tensor", "form") else "right")
    for t in [*report.tensors, report.total]:
        table.add_row(t.name, t.form, _bytes(t.stored), _bytes(t.dense),
                      f"{t.stored / t.dense:.3f}" if t.dense else "-",
                      f"{t.relative_error:.4f}", end_section=t is report.tensors[-1])
    out.print(table)
    for name, why in report.skipped.items():
        out.print(f"left out {name}: {why}", markup=False)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
