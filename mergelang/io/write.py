"""Streaming safetensors output: every shard's layout is fixed before any tensor is computed.

Because the compiler knows each output tensor's shape and dtype from the input headers, the
writer can assign tensors to shards, write each shard's header and size the file up front,
then put each tensor's bytes at its offset the moment it is computed, in any order. Memory
never holds more than the tensor being written, where a buffering writer holds a whole shard.
The safetensors library only writes whole dictionaries of tensors, so the format is written here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import torch

from .dtypes import dtype_name
from .errors import ModelFileError
from .header import HeaderEntry, encode_header

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutputTensor:
    """An output tensor as declared before it is computed."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str, minimum: int = 0) -> int:
    """Bytes in a size such as "5GB" (powers of 1000), "2GiB" (powers of 1024) or "123";
    ValueError below `minimum` (1 for a shard size or a memory budget: 0 would make no
    shard, or compute one row at a time)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: write a number with an optional unit, such as 500MB, "
            "5GB or 2GiB (B, KB, MB, GB, TB count in 1000s; KiB, MiB, GiB, TiB in 1024s)"
        )
    size = int(Decimal(match.group(1)) * _UNITS[unit])
    if size < minimum:
        raise ValueError(f"invalid size {text!r}: a size must be at least {minimum} "
                         f"byte{'s' if minimum != 1 else ''}")
    return size


@dataclass(frozen=True)
class _Slot:
    spec: OutputTensor
    path: Path
    offset: int
    nbytes: int


class ShardedWriter:
    """Writes declared tensors into preallocated safetensors shards, in any order.

    `weight_map` (tensor name -> shard file name), `paths` (the shard files) and `total_size`
    (bytes of tensor data) are known as soon as the writer is made.

    `shards` (indices into `paths`) makes a writer of those shards only, for one of several
    processes that write a model together (mergelang.cluster): it lays out every shard
    as the whole writer would, creates only its own, and writes no index (`write_index`).
    """

    def __init__(
        self,
        folder: Path,
        tensors: list[OutputTensor],
        shard_size: int,
        metadata: dict[str, str],
        shards: Collection[int] | None = None,
    ) -> None:
        if shard_size <= 0:
            raise ValueError(f"shard size must be positive, not {shard_size}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        _check_declarations(tensors)
        self.folder = Path(folder)
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        groups = _assign_shards(tensors, shard_size)
        count = len(groups)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        )
        header_metadata = {"format": "pt", **{k: v for k, v in metadata.items() if k != "format"}}
        self.paths = [self.folder / n for n in names]
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        self._slots: dict[str, _Slot] = {}
        self.whole = shards is None
        for i, (path, group) in enumerate(zip(self.paths, groups, strict=True)):
            entries: list[HeaderEntry] = []
            position = 0
            for t in group:
                nbytes = _nbytes(t)
                entries.append(HeaderEntry(t.name, t.dtype, t.shape, position, position + nbytes))
                position += nbytes
            header = encode_header(header_metadata, entries)
            mine = shards is None or i in shards
            if mine:
                _create_shard(path, header, len(header) + position)
            for t, e in zip(group, entries, strict=True):
                if mine:
                    self._slots[t.name] = _Slot(t, path, len(header) + e.begin, e.end - e.begin)
                self.weight_map[t.name] = path.name
            self.total_size += position
        self._written: set[str] = set()
        self._rows_written: dict[str, int] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor's bytes at its place; ValueError if it does not match."""
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} was not declared to the writer")
        if tuple(tensor.shape) != slot.spec.shape or tensor.dtype != slot.spec.dtype:
            raise ValueError(
                f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, but was declared "
                f"as {slot.spec.shape} {slot.spec.dtype}"
            )
        with self._lock:
            if self._closed:
                raise ValueError("the writer is closed")
            if name in self._written or name in self._pending:
                raise ValueError(f"tensor {name!r} was written twice")
            self._pending.add(name)
        try:
            data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
            if slot.nbytes:
                with writing(slot.path), open(slot.path, "r+b") as f:
                    f.seek(slot.offset)
                    f.write(memoryview(data))
        finally:
            with self._lock:
                self._pending.discard(name)
        with self._lock:
            self._written.add(name)

    def write_rows(self, name: str, row0: int, part: torch.Tensor) -> None:
        """Write rows [row0, row0 + len(part)) of a declared tensor (its first dimension;
        a scalar is one row). The tensor counts as written once all its bytes are."""
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} was not declared to the writer")
        shape = slot.spec.shape
        row_shape = shape[1:] if shape else ()
        if tuple(part.shape[1:]) != tuple(row_shape) or part.dtype != slot.spec.dtype:
            raise ValueError(f"rows of {name!r} are {tuple(part.shape)} {part.dtype}, but it "
                             f"was declared as {shape} {slot.spec.dtype}")
        data = part.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        row_bytes = slot.nbytes // shape[0] if shape and shape[0] else slot.nbytes
        start = row0 * row_bytes
        if start + len(data) > slot.nbytes:
            raise ValueError(f"rows {row0}.. of {name!r} run past its end")
        with self._lock:
            if self._closed:
                raise ValueError("the writer is closed")
            if name in self._written:
                raise ValueError(f"tensor {name!r} was written twice")
        if len(data):
            with writing(slot.path), open(slot.path, "r+b") as f:
                f.seek(slot.offset + start)
                f.write(memoryview(data))
        with self._lock:
            self._rows_written[name] = self._rows_written.get(name, 0) + len(data)
            if self._rows_written[name] == slot.nbytes:
                self._written.add(name)

    def close(self) -> None:
        """Check every declared tensor was written, then write the index (for several shards)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            missing = [n for n in self._slots if n not in self._written]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{len(missing)} declared tensors were never written: {shown}{more}")
        if self.whole:
            self.write_index()

    def write_index(self) -> None:
        """The index of a model in several shards (none for one)."""
        if len(self.paths) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            text = json.dumps(index, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            with writing(self.folder / INDEX_NAME):
                (self.folder / INDEX_NAME).write_text(text, encoding="utf-8")

    def abort(self) -> None:
        """Stop without checks or index; the caller discards the folder (see OutputFolder)."""
        with self._lock:
            self._closed = True

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_declarations(tensors: list[OutputTensor]) -> None:
    seen: set[str] = set()
    for t in tensors:
        if not t.name or t.name == "__metadata__":
            raise ValueError(f"{t.name!r} cannot be a tensor name")
        if t.name in seen:
            raise ValueError(f"tensor {t.name!r} is declared twice")
        seen.add(t.name)
        if not all(isinstance(d, int) and d >= 0 for d in t.shape):
            raise ValueError(f"tensor {t.name!r} has an invalid shape {t.shape!r}")
        dtype_name(t.dtype)


def _nbytes(t: OutputTensor) -> int:
    return math.prod(t.shape) * t.dtype.itemsize


def _assign_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Fill shards in declaration order; a tensor larger than a shard gets one of its own."""
    groups: list[list[OutputTensor]] = [[]]
    filled = 0
    for t in tensors:
        nbytes = _nbytes(t)
        if groups[-1] and filled + nbytes > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(t)
        filled += nbytes
    return groups


def _create_shard(path: Path, header: bytes, size: int) -> None:
    """Write the header and reserve the file's full size, so a full disk shows up now."""
    with writing(path, size), open(path, "wb") as f:
        f.write(header)
        f.truncate(size)
        f.flush()
        if hasattr(os, "posix_fallocate") and size > len(header):
            try:
                os.posix_fallocate(f.fileno(), len(header), size - len(header))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise


@contextlib.contextmanager
def writing(path: Path, size: int | None = None) -> Iterator[None]:
    """OSErrors while writing output (a full disk, a read-only folder) as ModelFileError,
    which the command reports as a diagnostic, naming the file, with exit status 2."""
    try:
        yield
    except OSError as e:
        what = f"reserve {size} bytes for" if size is not None else "write"
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        raise ModelFileError(
            f"cannot {what} {path}: {e.strerror or e}",
            hint="free some space or choose an output folder on another disk" if full
            else "check that the output location is writable",
        ) from None
