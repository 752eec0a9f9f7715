"""One tensor of a task vector, compressed: read in blocks of rows that fit the memory
budget, encoded in its form, written part by part, its figures (bytes, ||τ||², error)
counted on the way."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..io.delta import (
    COPY,
    DENSE,
    MASK,
    SIGN,
    TOPK,
    DeltaEntry,
    digest,
    pack_bits,
    parts_digest,
    raw_bytes,
    tensor_digest,
)
from ..io.read import SafetensorsModel
from ..ops.sparsify import top_k
from ..reduce import Chunk
from ..selection import keep_top
from .writer import DeltaWriter


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


def encode_tensor(entry: DeltaEntry, base: SafetensorsModel, ft: SafetensorsModel,
                  density: float | None, budget: int, writer: DeltaWriter) -> TensorFigures:
    """Compress one tensor's τ = ft - base into `writer`, setting the entry's digests
    (its base tensor's bytes, its own parts'), and return its figures."""
    name, shape, numel = entry.name, entry.shape, entry.numel
    rows = shape[0] if shape else 1
    row_numel = numel // rows if rows else 0
    # float32 rows held at once: base, fine-tune, τ, |τ|, its keys and counts, the mask
    chunk_rows = max(1, min(rows, budget // max(1, row_numel * 4 * 8)))
    if entry.form in (SIGN, MASK):  # blocks start on a byte of bits
        step = 8 // math.gcd(row_numel or 8, 8)
        chunk_rows = max(1, min(rows, -(-chunk_rows // step) * step))
    chunks = [(r, min(r + chunk_rows, rows)) for r in range(0, rows, chunk_rows)]
    whole = len(chunks) == 1

    def load(r: tuple[int, int]) -> torch.Tensor:
        part = None if whole else r
        if entry.form == COPY:  # the fine-tune's own value, as it is
            return ft.load(name, part).reshape(-1)
        tau = ft.load(name, part, torch.float32)
        return tau.sub_(base.load(name, part, torch.float32)).reshape(-1)

    figures = TensorFigures(name, entry.form, entry.stored_bytes,
                            numel * ft.tensors[name].dtype.itemsize)
    hashes = [digest() for _ in entry.parts]
    parts = list(entry.parts)
    encode = {TOPK: _encode_topk, MASK: _encode_topk, SIGN: _encode_sign,
              DENSE: _encode_dense, COPY: _encode_copy}[entry.form]
    encode(entry, chunks, row_numel, load, density, figures,
           lambda i, first, values: (writer.write(parts[i], first, values),
                                     hashes[i].update(raw_bytes(values))))
    entry.base = tensor_digest(base, name)
    entry.data = parts_digest(h.digest() for h in hashes)
    return figures


def _sq(x: torch.Tensor) -> float:
    return float(torch.dot(x, x)) if x.numel() else 0.0


def _encode_topk(entry, chunks, row_numel, load, density, figures, put) -> None:
    name, numel = entry.name, entry.numel
    masked = entry.form == MASK
    index_dtype = None if masked else entry.parts[f"{name}/indices"][0]
    selection = top_k(numel, density, "tensor")
    stats = selection.result() if selection.sweeps(len(chunks)) == 0 else None
    # a tensor in one block is read once: the selection does not change its argument
    whole = load(chunks[0]) if len(chunks) == 1 else None
    while stats is None:  # the exact selection's sweeps (two for a tensor in blocks)
        for r in chunks:
            selection.add(whole if whole is not None else load(r),
                          Chunk(numel, r[0] * row_numel, tensor=name))
        if selection.finish_sweep():
            stats = selection.result()
    state: dict = {}
    written = 0
    for r in chunks:
        tau = whole if whole is not None else load(r)
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


def _encode_copy(entry, chunks, row_numel, load, density, figures, put) -> None:
    for r in chunks:
        put(0, r[0] * row_numel, load(r))
