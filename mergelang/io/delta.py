"""A compressed task vector on disk (`mergelang compress`), and `delta("x")` reading it back.

A delta file is one safetensors file. Each tensor of the base is stored in one form:

- "topk": the k = max(1, int(density * numel)) entries of largest |τ| (trim's exact
  selection), as `NAME/values` (the fine-tune's dtype) and `NAME/indices` (int32, or
  int64 past 2^31 entries: row-major positions, ascending);
- "mask": the same entries, their positions as a bit mask instead (`NAME/mask`, uint8,
  entry i at bit i % 8 of byte i // 8), then `NAME/values` in row-major order: chosen
  per tensor when it is smaller, which it is when more than 1 entry in 32 is kept;
- "sign": BitDelta's 1 bit per entry (`NAME/signs`, uint8, entry i at bit i % 8 of
  byte i // 8: 1 for τ >= 0, 0 for τ < 0) and one float32 scale per tensor
  (`NAME/scale`, mean |τ|); the entry is +scale or -scale;
- "dense": τ itself in the fine-tune's dtype (`NAME/dense`; vectors under --bits 1);
- "copy": a tensor that is not floating point (an integer buffer), the fine-tune's own
  value (`NAME/copy`): the language copies such tensors, it does not add them, so
  `base + delta(...)` takes it where base and fine-tune agree.

The header's `__metadata__` records, as JSON, every tensor's dense shape, dtype and form,
so the file is a model source by itself: names and shapes come from its header, values
are decoded on demand, any block of rows at a time. It also records the base it applies
to, by content:

- `base_header`: a SHA-256 of the base's header (every tensor's name, shape and dtype),
  checked when the script is bound (`attach`): a script whose models all have another
  header is refused at the `delta(...)` call, before anything is read;
- per tensor, a SHA-256 of the base tensor's bytes, checked as that tensor is first
  loaded: a fine-tune and its base have the same header, so only the bytes tell them
  apart, and hashing every base tensor at bind time would read the whole base (about
  0.5 s a GB) before `check` could answer; at load time the bytes are in the page cache
  because the merge reads them anyway;
- per tensor, a SHA-256 of its own stored parts, all checked when the file is opened:
  the file is small by design (a tenth of the model or less), and a damaged file is then
  refused at the `delta(...)` call rather than halfway through a merge.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dtypes import dtype_from_name, dtype_name
from .errors import ModelFileError
from .header import read_header
from .read import SafetensorsModel, TensorInfo, open_model
from .sources import register_kind

KIND = "delta"
FORMAT = "mergelang_delta"
VERSION = "1"
TOPK, MASK, SIGN, DENSE, COPY = "topk", "mask", "sign", "dense", "copy"
DIGEST_CHARS = 32  # hex digits kept of each SHA-256 (128 bits)
_UNSET = "0" * DIGEST_CHARS
_REMAKE = "make the delta again with `mergelang compress`"
_OTHER_BASE = ("add the delta to the model it was made from (`mergelang compress FT --base "
               "BASE` names it), or make a delta against this one")
HASH_BLOCK = 64 << 20
BIND_CHECK_BYTES = 1 << 20
"""Base bytes hashed when a script is bound, smallest tensors first; the rest are
hashed as they are loaded."""


def digest() -> Any:
    """The hash every digest of a delta file uses (SHA-256: about 1.1 GB/s with the
    CPU's SHA instructions, twice blake2b's speed here)."""
    return hashlib.sha256()


def header_digest(tensors: Mapping[str, TensorInfo]) -> str:
    """What identifies a model's header: its tensors' names, shapes and dtypes."""
    described = sorted((n, list(t.shape), dtype_name(t.dtype)) for n, t in tensors.items())
    h = digest()
    h.update(json.dumps(described, separators=(",", ":")).encode())
    return h.hexdigest()[:DIGEST_CHARS]


def tensor_digest(source: Any, name: str, block: int = 0) -> str:
    """A hash of one tensor's stored bytes, read in blocks of rows of about `block`
    bytes (HASH_BLOCK by default), so hashing a large embedding holds no more."""
    return _hashed(source, name, block).hexdigest()[:DIGEST_CHARS]


def _hashed(source: Any, name: str, block: int = 0) -> Any:
    block = block or HASH_BLOCK
    info = source.tensors[name]
    rows = info.shape[0] if info.shape else 0
    spans: list[tuple[int, int] | None] = [None]
    if rows > 1 and info.nbytes > block:
        step = max(1, block // (info.nbytes // rows))
        spans = [(r, min(r + step, rows)) for r in range(0, rows, step)]
    h = digest()
    for span in spans:
        data = source.load(name, span, view=True)
        try:
            h.update(raw_bytes(data))
        finally:
            source.release(name, span)
    return h


def parts_digest(part_hashes: Iterable[bytes]) -> str:
    """The digest of a delta tensor's stored parts from each part's SHA-256: a hash of
    the parts' hashes, so the parts can be hashed as they are written, block by block,
    side by side."""
    combined = digest()
    for h in part_hashes:
        combined.update(h)
    return combined.hexdigest()[:DIGEST_CHARS]


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


@dataclass
class DeltaEntry:
    """One tensor of the delta: its dense shape and dtype, its form, and its parts (part
    name -> (dtype, shape)) in file order; `base` and `data` are the digests."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    form: str
    parts: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    base: str = _UNSET
    data: str = _UNSET

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for d, s in self.parts.values())

    def as_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": dtype_name(self.dtype), "form": self.form,
                "base": self.base, "data": self.data}


def plan_entry(name: str, shape: tuple[int, ...], dtype: torch.dtype, form: str,
               k: int = 0) -> DeltaEntry:
    """The parts a tensor of `shape` takes in `form` (`k` entries kept, for topk and
    mask)."""
    numel = math.prod(shape)
    if form == TOPK:
        index = torch.int32 if numel <= 2**31 - 1 else torch.int64
        parts = {f"{name}/values": (dtype, (k,)), f"{name}/indices": (index, (k,))}
    elif form == MASK:
        parts = {f"{name}/mask": (torch.uint8, ((numel + 7) // 8,)),
                 f"{name}/values": (dtype, (k,))}
    elif form == SIGN:
        parts = {f"{name}/signs": (torch.uint8, ((numel + 7) // 8,)),
                 f"{name}/scale": (torch.float32, ())}
    else:
        parts = {f"{name}/{form}": (dtype, tuple(shape))}
    return DeltaEntry(name, tuple(shape), dtype, form, parts)


def sparse_form(numel: int, k: int) -> str:
    """TOPK or MASK for k kept entries of numel: whichever stores the positions in
    fewer bytes (the mask when more than 1 entry in 32 is kept)."""
    return MASK if (numel + 7) // 8 < k * (4 if numel <= 2**31 - 1 else 8) else TOPK


# --- reading ----------------------------------------------------------------------------


class DeltaSource:
    """A delta file as a model source: the dense task vector, decoded on demand in
    float32. Derived (it has `attach`): bind shows it the script's plain models, one of
    which must be the base it was made from."""

    def __init__(self, path: Path, file: SafetensorsModel, entries: dict[str, DeltaEntry],
                 fields: dict[str, str], base_tensors: dict[str, list]):
        self.path, self.file, self.entries = path, file, entries
        self.fields, self.base_tensors = fields, base_tensors
        self.config = None
        self.folder = None
        self.tensors = {
            n: TensorInfo(n, e.shape, e.dtype, path, file.tensors[next(iter(e.parts))].offset,
                          e.stored_bytes)
            for n, e in entries.items()}
        self.bases: list[Any] = []
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def attach(self, frame: list[Any]) -> None:
        """Find the base among the script's plain models: by its header, then by the
        bytes of its smallest tensors (up to BIND_CHECK_BYTES: the norms of a
        transformer, which a fine-tune changes too); ModelFileError naming the first
        difference when no model passes. The other tensors' bytes are checked as they
        are loaded. With no plain model (a script that writes the task vector itself)
        there is nothing to check."""
        if not frame:
            return
        wanted = self.fields.get("base_header")
        same_header = [s for s in frame if header_digest(s.tensors) == wanted]
        if not same_header:
            raise ModelFileError(
                f"{self.path} was made against another base ({self.fields.get('base')}): "
                + _difference(self.base_tensors, frame[0]), hint=_OTHER_BASE)
        small = _smallest(self.entries.values(), same_header[0].tensors)
        self.bases = [s for s in same_header
                      if all(tensor_digest(s, e.name) == e.base for e in small)]
        if not self.bases:
            differs = next(e.name for e in small
                           if tensor_digest(same_header[0], e.name) != e.base)
            raise ModelFileError(self._other_bytes(differs, same_header[:1]),
                                 hint=_OTHER_BASE)
        self._checked.update(e.name for e in small)

    def _other_bytes(self, name: str, models: list[Any]) -> str:
        where = ", ".join(_shown(b) for b in models)
        return (f"tensor {name!r} of {where} is not the one {self.path} was made against "
                f"(the base {self.fields.get('base')}): its bytes differ, though the names, "
                "shapes and dtypes agree")

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor:
        """Rows [start, stop) of the dense task vector (all of it without `rows`), in
        float32 unless `dtype` says otherwise (a copied integer tensor in its own)."""
        entry = self.entries[name]
        self._check_base(entry)
        shape = entry.shape
        count = shape[0] if shape else 1
        start, stop = rows if rows is not None else (0, count)
        row_numel = entry.numel // count if count else 0
        lo, hi = start * row_numel, stop * row_numel
        flat = _DECODE[entry.form](self.file, entry, lo, hi)
        out = flat.reshape((stop - start, *shape[1:]) if rows is not None else shape)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    def _check_base(self, entry: DeltaEntry) -> None:
        if not self.bases or entry.name in self._checked:
            return
        with self._lock:
            if entry.name in self._checked:
                return
            if not any(entry.name in b.tensors and tensor_digest(b, entry.name) == entry.base
                       for b in self.bases):
                raise ModelFileError(self._other_bytes(entry.name, self.bases),
                                     hint=_OTHER_BASE)
            self._checked.add(entry.name)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        pass

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"DeltaSource({str(self.path)!r}, {len(self.entries)} tensors)"


def _topk(file: SafetensorsModel, e: DeltaEntry, lo: int, hi: int) -> torch.Tensor:
    values_part, index_part = e.parts
    count = e.parts[index_part][1][0]
    a = 0 if lo == 0 else _first_at_least(file, index_part, count, lo)
    b = count if hi == e.numel else _first_at_least(file, index_part, count, hi)
    out = torch.zeros(hi - lo, dtype=torch.float32)
    if b > a:
        at = file.load(index_part, (a, b)).long() - lo
        out[at] = file.load(values_part, (a, b), torch.float32)
    return out


def _first_at_least(file: SafetensorsModel, part: str, count: int, value: int) -> int:
    """The first place in an ascending part of `count` positions that holds `value` or
    more: a bisection reading one position at a time, so the rows of a large tensor
    do not read all its positions."""
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if int(file.load(part, (mid, mid + 1))[0]) < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _mask(file: SafetensorsModel, e: DeltaEntry, lo: int, hi: int) -> torch.Tensor:
    mask_part, values_part = e.parts
    first = lo // 8
    before = count_bits(file.load(mask_part, (0, first))) if first else 0
    bits = unpack_bits(file.load(mask_part, (first, (hi + 7) // 8)))
    before += int(bits[:lo % 8].sum())
    bits = bits[lo % 8:lo % 8 + hi - lo]
    kept = int(bits.sum())
    out = torch.zeros(hi - lo, dtype=torch.float32)
    if kept:
        out[bits] = file.load(values_part, (before, before + kept), torch.float32)
    return out


def count_bits(packed: torch.Tensor) -> int:
    """The number of bits set in a uint8 tensor (a table of 256 counts, no unpacking)."""
    if not packed.numel():
        return 0
    return int(torch.bincount(packed.reshape(-1), minlength=256) @ _POPCOUNT)


def _sign(file: SafetensorsModel, e: DeltaEntry, lo: int, hi: int) -> torch.Tensor:
    signs_part, scale_part = e.parts
    scale = file.load(scale_part, dtype=torch.float32)
    packed = file.load(signs_part, (lo // 8, (hi + 7) // 8))
    bits = unpack_bits(packed)[lo % 8:lo % 8 + hi - lo]
    return torch.where(bits, scale, -scale)


def _dense(file: SafetensorsModel, e: DeltaEntry, lo: int, hi: int) -> torch.Tensor:
    (part,) = e.parts
    row_numel = e.numel // e.shape[0] if e.shape and e.shape[0] else 1
    rows = (lo // row_numel, hi // row_numel) if e.shape else None
    return file.load(part, rows, torch.float32 if e.form == DENSE else None).reshape(-1)


_DECODE = {TOPK: _topk, MASK: _mask, SIGN: _sign, DENSE: _dense, COPY: _dense}
_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans, 8 to a byte: entry i at bit i % 8 of byte i // 8 (zero padded)."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 8))
    return (flat.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    """pack_bits undone: 8 booleans per byte."""
    return ((packed.reshape(-1, 1) >> _SHIFTS) & 1).reshape(-1).bool()


def open_delta(path: Path) -> DeltaSource:
    """Open a delta file, reading its header and checking its stored bytes (their
    digests, and that top-k indices ascend inside the tensor). ModelFileError if it is
    not a delta file mergelang wrote, or is damaged."""
    file = open_model(path)
    try:
        if file.folder is not None or not Path(path).is_file():
            raise ModelFileError(f"{path} is not a delta file (it is a folder)",
                                 hint="name the file `mergelang compress -o` wrote")
        fields, entries, base_tensors = _read_metadata(path, file)
        for entry in entries.values():
            _check_stored(path, file, entry)
        return DeltaSource(Path(path), file, entries, fields, base_tensors)
    except BaseException:
        file.close()
        raise


def _read_metadata(path: Path, file: SafetensorsModel
                   ) -> tuple[dict[str, str], dict[str, DeltaEntry], dict[str, list]]:
    fields = read_header(Path(path)).metadata
    if fields.get(FORMAT) != VERSION:
        found = f"version {fields[FORMAT]}" if FORMAT in fields else "no delta metadata"
        raise ModelFileError(
            f"{path} is not a delta file this mergelang reads ({found})",
            hint="delta(...) takes a file written by `mergelang compress`; a model is "
                 'named with model("...")')
    try:
        described = json.loads(fields["tensors"])
        base_tensors = json.loads(fields["base_tensors"])
        entries = {}
        for name, d in described.items():
            dtype = dtype_from_name(d["dtype"])
            if dtype is None or d["form"] not in _DECODE:
                raise ValueError(f"tensor {name!r} has dtype {d['dtype']!r}, form "
                                 f"{d['form']!r}")
            shape = tuple(int(s) for s in d["shape"])
            values = file.tensors.get(f"{name}/values")  # a missing part is named below
            k = values.shape[0] if values is not None and values.shape else 0
            entry = plan_entry(name, shape, dtype, d["form"], k)
            entry.base, entry.data = str(d["base"]), str(d["data"])
            entries[name] = entry
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise ModelFileError(f"{path} has damaged delta metadata ({type(exc).__name__}: "
                             f"{exc})", hint=_REMAKE) from None
    for entry in entries.values():
        for part, (dtype, shape) in entry.parts.items():
            info = file.tensors.get(part)
            if info is None or info.dtype != dtype or info.shape != shape:
                raise ModelFileError(
                    f"{path} is damaged: the part {part!r} of tensor {entry.name!r} is "
                    + ("missing" if info is None else f"{list(info.shape)} "
                       f"{dtype_name(info.dtype)}, not {list(shape)} {dtype_name(dtype)}"),
                    hint=_REMAKE)
    return fields, entries, base_tensors


def _check_stored(path: Path, file: SafetensorsModel, entry: DeltaEntry) -> None:
    if parts_digest(_hashed(file, part).digest() for part in entry.parts) != entry.data:
        raise ModelFileError(f"{path} is damaged: the stored bytes of tensor {entry.name!r} "
                             "do not match the hash recorded when it was written",
                             hint="copy the file again, or " + _REMAKE)
    if entry.form == TOPK and not _ascending(file, f"{entry.name}/indices", entry.numel):
        raise ModelFileError(f"{path} is damaged: the positions of tensor {entry.name!r} "
                             f"are not ascending inside its {entry.numel} entries",
                             hint=_REMAKE)
    if entry.form == MASK:
        packed = file.load(f"{entry.name}/mask", view=True)
        kept = count_bits(packed)
        file.release(f"{entry.name}/mask")
        if kept != entry.parts[f"{entry.name}/values"][1][0]:
            raise ModelFileError(f"{path} is damaged: the mask of tensor {entry.name!r} "
                                 f"marks {kept} entries for "
                                 f"{entry.parts[f'{entry.name}/values'][1][0]} values",
                                 hint=_REMAKE)


def _smallest(entries: Iterable[DeltaEntry], tensors: Mapping[str, TensorInfo]
              ) -> list[DeltaEntry]:
    """The entries of the smallest base tensors, up to BIND_CHECK_BYTES of them (at
    least one)."""
    chosen, total = [], 0
    for e in sorted(entries, key=lambda e: tensors[e.name].nbytes):
        total += tensors[e.name].nbytes
        if chosen and total > BIND_CHECK_BYTES:
            break
        chosen.append(e)
    return chosen


def _ascending(file: SafetensorsModel, part: str, numel: int) -> bool:
    """Whether a part's positions ascend strictly inside [0, numel), read in blocks."""
    count = file.tensors[part].shape[0]
    previous = -1
    for start in range(0, count, HASH_BLOCK // 8):
        block = file.load(part, (start, min(start + HASH_BLOCK // 8, count))).long()
        if int(block[0]) <= previous or not bool((block[1:] > block[:-1]).all()):
            return False
        previous = int(block[-1])
    return previous < numel


def _shown(model: Any) -> str:
    """A model as a message names it: its path, or what it is when it has none (a
    model given in memory to evaluate or an expression)."""
    return str(getattr(model, "path", None) or model.folder or "the model given in memory")


def _difference(recorded: dict[str, list], model: Any) -> str:
    """The first way `model`'s header differs from the base's, in words."""
    where = _shown(model)
    for name, (shape, dtype) in recorded.items():
        info = model.tensors.get(name)
        if info is None:
            return f"its tensor {name!r} is not in {where}"
        if list(info.shape) != shape or dtype_name(info.dtype) != dtype:
            return (f"tensor {name!r} is {shape} {dtype} in that base but "
                    f"{list(info.shape)} {dtype_name(info.dtype)} in {where}")
    extra = next((n for n in model.tensors if n not in recorded), None)
    if extra is not None:
        return f"{where} has a tensor {extra!r} that base lacks"
    return f"{where} has the same tensors but another header"


register_kind(KIND, open_delta)
