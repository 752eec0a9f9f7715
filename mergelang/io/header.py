"""The safetensors header: read and checked without touching tensor data, or encoded for writing.

A safetensors file is an 8-byte little-endian header length, a JSON header, then the tensors'
bytes. Everything the compiler needs before execution (names, shapes, dtypes, where the bytes
are) is in the header, so it is read here directly. It is also checked against the file's
real size, so a truncated download is reported when the model is opened rather than halfway
through a merge, and laid out exactly as the safetensors library will insist on at load time.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .dtypes import dtype_from_name, dtype_name, supported_names
from .errors import ModelFileError
from .jsonfile import parse_json

HEADER_LIMIT = 100 * 2**20
"""The safetensors library refuses headers larger than this; a bigger length means corruption."""

_REDOWNLOAD = "the file is damaged or was not fully downloaded; download it again"


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor as its header describes it; `begin` and `end` are relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from another: which file (device, inode), how
    long it is, and when it was last written. A file truncated, rewritten in place or
    replaced by another since it was opened has another identity."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> FileIdentity:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


@dataclass(frozen=True)
class Header:
    """A checked safetensors header. `entries` is ordered by position in the file;
    `identity` is the file's as the header was read."""

    path: Path
    data_start: int
    metadata: dict[str, str]
    entries: dict[str, HeaderEntry]
    identity: FileIdentity | None = None


def read_header(path: Path) -> Header:
    """Read and check the header of the safetensors file at `path`; ModelFileError if unusable.

    Only a regular file is read (a FIFO or a device is refused, never waited on), and
    the identity of the file read (FileIdentity) is kept, so later reads can tell
    whether the file was changed or replaced since."""
    try:
        f = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as e:
        raise ModelFileError(
            f"cannot read {path}: {e.strerror or e}", hint="check that the file is readable"
        ) from e
    with f:
        try:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ModelFileError(
                    f"{path} is not a regular file (a FIFO, device or socket cannot hold a "
                    "model)", hint="name the model's .safetensors file or its folder",
                )
            size = info.st_size
            if size < 8:
                raise ModelFileError(
                    f"{path} is not a safetensors file: it is only {size} bytes long",
                    hint=_REDOWNLOAD,
                )
            (length,) = struct.unpack("<Q", _read_exactly(f, 8, path))
            if length > size - 8 or length > HEADER_LIMIT:
                raise ModelFileError(
                    f"{path} is truncated or not a safetensors file: its header claims "
                    f"{length} bytes but the file has only {size} bytes",
                    hint=_REDOWNLOAD,
                )
            raw = _read_exactly(f, length, path)
        except OSError as e:
            raise ModelFileError(
                f"cannot read {path}: {e.strerror or e}", hint="check that the file is readable"
            ) from e
    parsed = parse_json(raw, path, _REDOWNLOAD, f"{path} has a corrupt header: it")
    if not isinstance(parsed, dict):
        raise ModelFileError(f"{path} has a corrupt header: it is not a JSON object", _REDOWNLOAD)
    data_start = 8 + length
    metadata = _metadata(path, parsed.pop("__metadata__", None))
    entries = [_entry(path, name, spec) for name, spec in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    _check_layout(path, entries, size - data_start, data_start)
    return Header(path, data_start, metadata, {e.name: e for e in entries},
                  FileIdentity.of(info))


def _read_exactly(f, n: int, path: Path) -> bytes:
    """n bytes from `f`; a file cut short while it is read is reported as truncated."""
    data = f.read(n)
    if len(data) != n:
        raise ModelFileError(f"{path} is truncated: it ended while its header was read",
                             hint=_REDOWNLOAD)
    return data


def _metadata(path: Path, value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ModelFileError(
            f"{path} has a corrupt header: __metadata__ must map strings to strings", _REDOWNLOAD
        )
    return dict(value)


def _corrupt(path: Path, name: str, what: str) -> ModelFileError:
    return ModelFileError(f"{path} has a corrupt header: tensor {name!r} {what}", _REDOWNLOAD)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(path: Path, name: str, spec: object) -> HeaderEntry:
    if not name:
        raise ModelFileError(
            f"{path} holds a tensor with an empty name, which no output can hold",
            hint="rename it (load the file with safetensors, give the tensor a name, and "
            "save it again)",
        )
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise _corrupt(path, name, "lacks dtype, shape or data_offsets")
    dtype_str, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    dtype = dtype_from_name(dtype_str) if isinstance(dtype_str, str) else None
    if dtype is None:
        raise ModelFileError(
            f"tensor {name!r} in {path} has dtype {dtype_str!r}, which mergelang does not read",
            hint=f"supported dtypes: {supported_names()}; convert the model to one of them",
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _corrupt(path, name, f"has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _corrupt(path, name, f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise _corrupt(
            path,
            name,
            f"has data_offsets {offsets} holding {end - begin} bytes, but its shape "
            f"{shape} and dtype {dtype_str} need {needed}",
        )
    return HeaderEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: list[HeaderEntry], data_size: int, data_start: int) -> None:
    """The data must tile the rest of the file exactly, as the safetensors library requires."""
    position = 0
    for e in entries:
        if e.end > data_size:
            raise ModelFileError(
                f"{path} is truncated: tensor {e.name!r} ends at byte {data_start + e.end} "
                f"but the file is only {data_start + data_size} bytes long",
                hint=_REDOWNLOAD,
            )
        if e.begin != position:
            gap = "overlaps the previous tensor" if e.begin < position else "leaves a gap before it"
            raise _corrupt(path, e.name, gap)
        position = e.end
    if position != data_size:
        raise ModelFileError(
            f"{path} is corrupt: it has {data_size - position} unexpected bytes after its "
            "last tensor",
            hint=_REDOWNLOAD,
        )


def encode_header(metadata: dict[str, str], entries: list[HeaderEntry]) -> bytes:
    """The length prefix and JSON header for `entries`, padded with spaces to a multiple of 8.

    Padding keeps the data section 8-byte aligned, as the safetensors library does itself.
    """
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for e in entries:
        header[e.name] = {
            "dtype": dtype_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [e.begin, e.end],
        }
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
