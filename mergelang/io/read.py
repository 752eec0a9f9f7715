"""Opening a model: find its safetensors files, read their headers, load tensors on demand.

`open_model` reads headers only, so a script is checked against every model's names, shapes
and dtypes before any weight is read, and every problem with the files (missing shards,
truncated downloads, pickled checkpoints) is reported up front as a ModelFileError.

Tensors are loaded one at a time, or a block of rows at a time, with positioned reads
(`os.preadv`) of their file at the offsets the (validated) header gives, straight into a
tensor's memory. Not through a memory map, as before: a mapped file that another process
truncates kills the reader with SIGBUS at the next page it touches, which no check before
the read can rule out (the file can shrink between the check and the read) and which a
Python process cannot handle; a read of a file cut short just returns fewer bytes, and
the load stops with a ModelFileError naming the file. The copy a read makes replaces the
one a map needed anyway (into memory of its own, or converted to the compute dtype), and
no page of the inputs counts towards the process's resident memory. Opening the file with
the safetensors library for every load gave the same bytes at about 1.7x the CPU time of
the map (a one-off timing, loading one 271M-parameter model).
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import torch

from .errors import ModelFileError
from .header import FileIdentity, Header, read_header
from .jsonfile import read_json

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_SUFFIX = ".safetensors.index.json"

_PICKLED_MESSAGE = "pickled checkpoints are not loaded: they can run code"
_PICKLED_HINT = (
    "convert it to safetensors, e.g. load it with transformers and call "
    "model.save_pretrained(folder, safe_serialization=True)"
)
_REDOWNLOAD = "the download is incomplete or mixed up; download the model again"
_KEEP_INPUTS = ("leave the input models unchanged until the merge has finished, then run "
                "it again")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is; `offset` is absolute, for ordering reads."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int
    nbytes: int


class SafetensorsModel:
    """An opened model: its tensors' headers, its config, and tensors loaded on demand."""

    def __init__(
        self,
        path: Path,
        folder: Path | None,
        tensors: dict[str, TensorInfo],
        config: dict | None,
        identities: dict[Path, FileIdentity] | None = None,
    ) -> None:
        self.path = path
        self.folder = folder
        self.tensors = tensors
        self.config = config
        self.identities = identities or {}
        self._closed = False
        self._lock = threading.Lock()
        self._files: dict[Path, BinaryIO] = {}

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor:
        """Read one tensor, or rows [start, stop) of its first dimension, into memory of
        its own, converted to `dtype` if given.

        view=True (and no conversion): the caller will not write to it, and calls
        release(name, rows) when it is done with it (both are free now that a load reads
        into memory of its own; they leave the reader free to share a cache again)."""
        if self._closed:
            raise ValueError(f"model {self.path} is closed")
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"{name!r} is not a tensor of {self.path}")
        shape = info.shape
        first, length = self._span(info, rows)
        opened = self._open_file(info.file)
        self._check_unchanged(info.file)
        raw = torch.empty(length, dtype=torch.uint8)
        self._read_into(opened, info.file, raw, first)
        part = raw.view(info.dtype).reshape((rows[1] - rows[0], *shape[1:]) if rows
                                            else shape)
        out = part.to(dtype) if dtype is not None and dtype != info.dtype else part
        self._check_unchanged(info.file)  # a change while reading would mix two files
        return out

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        """Done with a load(view=True) (nothing to do: a load's memory is its own)."""

    def _read_into(self, opened: BinaryIO, file: Path, raw: torch.Tensor, first: int) -> None:
        """Fill `raw` with the file's bytes from `first`; a file that ends before is a
        ModelFileError (it was cut short after its header was read)."""
        done, length = 0, raw.numel()
        while done < length:
            window = (ctypes.c_char * (length - done)).from_address(raw.data_ptr() + done)
            try:
                got = _pread(opened, self._lock, window, first + done)
            except (OSError, ValueError) as e:
                raise ModelFileError(f"cannot read {file}: {e}", hint=_KEEP_INPUTS) from e
            if got == 0:
                self._check_unchanged(file)  # names what happened, when it can
                raise ModelFileError(f"{file} ends at byte {first + done}, before the "
                                     "tensor it holds: it was cut short while the merge "
                                     "read it", hint=_KEEP_INPUTS)
            done += got

    @staticmethod
    def _span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
        """(first byte, length) of a tensor's rows in its file."""
        shape = info.shape
        start, stop = (0, shape[0] if shape else 1) if rows is None else rows
        row_bytes = info.nbytes // shape[0] if shape and shape[0] else info.nbytes
        return info.offset + start * row_bytes, (stop - start) * row_bytes

    def _open_file(self, file: Path) -> BinaryIO:
        with self._lock:
            opened = self._files.get(file)
            if opened is None:
                try:
                    opened = open(file, "rb", buffering=0)  # noqa: SIM115 - kept open
                except OSError as e:
                    raise ModelFileError(
                        f"cannot read {file}: {e}",
                        hint="the file may have been changed or removed since the model "
                             "was opened",
                    ) from e
                if file not in self.identities and not self._unchanged(file):
                    opened.close()
                    raise ModelFileError(f"{file} changed since the model was opened",
                                         hint="do not modify input models while a merge runs")
                self._files[file] = opened
            return opened

    def _check_unchanged(self, file: Path) -> None:
        """Stop, naming the file, if it is not the file the header was read from: one
        rewritten or replaced would mix bytes of two files into the output. One stat
        before and one after each read (a file cut short during the read is caught by
        the read itself)."""
        expected = self.identities.get(file)
        if expected is None:
            return
        try:
            now = FileIdentity.of(os.stat(file))
        except OSError as e:
            raise ModelFileError(
                f"{file} can no longer be read while the merge reads it: {e.strerror or e}",
                hint=_KEEP_INPUTS,
            ) from None
        if now == expected:
            return
        if (now.device, now.inode) != (expected.device, expected.inode):
            what = "another file was put in its place"
        elif now.size != expected.size:
            what = f"its size went from {expected.size} to {now.size} bytes"
        else:
            what = "it was written to"
        raise ModelFileError(f"{file} changed while the merge was reading it: {what}",
                             hint=_KEEP_INPUTS)

    def _unchanged(self, file: Path) -> bool:
        """Whether the file's header still describes the tensors read from it at open."""
        header = read_header(file)
        mine = {n: t for n, t in self.tensors.items() if t.file == file}
        return set(header.entries) >= set(mine) and all(
            (e.dtype, e.shape, header.data_start + e.begin, e.end - e.begin)
            == (t.dtype, t.shape, t.offset, t.nbytes)
            for n, t in mine.items() for e in [header.entries[n]])

    def close(self) -> None:
        """Let go of the files; loads after this are errors. (A tensor already loaded
        stays readable: its memory is its own.)"""
        with self._lock:
            self._closed = True
            files, self._files = list(self._files.values()), {}
        for opened in files:
            opened.close()

    def __enter__(self) -> SafetensorsModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsModel({str(self.path)!r}, {len(self.tensors)} tensors)"


def open_model(path: str | Path) -> SafetensorsModel:
    """Open a model folder (single file, sharded with an index, or one other .safetensors file)
    or a single .safetensors file, reading headers only."""
    p = Path(path).expanduser()
    try:
        return _open(p)
    except ValueError as e:  # an embedded NUL byte
        raise ModelFileError(f"invalid model path {str(p)!r}: {e}",
                             hint="check the path") from None
    except OSError as e:
        raise ModelFileError(
            f"cannot read {e.filename or p}: {e.strerror or e}",
            hint="check that the model's files and folders are readable",
        ) from e


def _open(p: Path) -> SafetensorsModel:
    try:
        os.stat(p)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ModelFileError(f"model path {p} is a loop of symbolic links",
                                 hint="point the link at the model's folder") from None
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise
        where = f" (a link to {os.readlink(p)}, which does not exist)" if p.is_symlink() else ""
        raise ModelFileError(
            f"model path {p} does not exist{where}",
            hint="check the path, or download the model first "
            "(e.g. `huggingface-cli download ORG/NAME --local-dir DIR`)",
        ) from None
    if p.is_dir():
        return _open_folder(p)
    if p.name.endswith(INDEX_SUFFIX):
        return _model(p, p.parent, _read_sharded(p.parent, p))
    if p.suffix.lower() in PICKLED_SUFFIXES:
        raise ModelFileError(f"{p}: {_PICKLED_MESSAGE}", hint=_PICKLED_HINT)
    return _model(p, None, [read_header(p)])


def _open_folder(folder: Path) -> SafetensorsModel:
    single = folder / "model.safetensors"
    if single.is_file():
        return _model(folder, folder, [read_header(single)])
    index = folder / ("model" + INDEX_SUFFIX)
    indexes = [index] if index.is_file() else sorted(folder.glob("*" + INDEX_SUFFIX))
    if len(indexes) == 1:
        return _model(folder, folder, _read_sharded(folder, indexes[0]))
    if indexes:
        raise ModelFileError(
            f"{folder} holds several indexes ({', '.join(i.name for i in indexes)})",
            hint=f"name the index of the model you mean directly, e.g. {indexes[0]}",
        )
    files = sorted(f for f in folder.glob("*.safetensors") if f.is_file())
    if len(files) == 1:
        return _model(folder, folder, [read_header(files[0])])
    if files:
        names = ", ".join(f.name for f in files[:4]) + (", ..." if len(files) > 4 else "")
        raise ModelFileError(
            f"{folder} holds {len(files)} .safetensors files ({names}) but no "
            f"model{INDEX_SUFFIX} saying which tensors belong to the model",
            hint=f"name one file directly (e.g. {files[0]}), or add the index that came "
            "with the shards",
        )
    pickled = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLED_SUFFIXES)
    if pickled:
        raise ModelFileError(
            f"{folder} holds only pickled weights ({', '.join(pickled[:3])}): {_PICKLED_MESSAGE}",
            hint=_PICKLED_HINT,
        )
    nested = sorted(folder.glob("*/*.safetensors"))
    hint = (
        f"name the subfolder that holds the weights, e.g. {nested[0].parent}"
        if nested
        else "check the path, or download the model's weights into it"
    )
    raise ModelFileError(f"{folder} holds no model weights (no .safetensors file)", hint=hint)


def _read_sharded(folder: Path, index: Path) -> list[Header]:
    parsed = read_json(index, hint=_REDOWNLOAD)
    weight_map = parsed.get("weight_map") if isinstance(parsed, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise ModelFileError(
            f'{index} has no usable "weight_map" (an object from tensor names to shard files)',
            hint=_REDOWNLOAD,
        )
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, held in by_shard.items():
        _check_shard_name(index, shard, held[0])
    missing = [s for s in sorted(by_shard) if not (folder / s).is_file()]
    if missing:
        first = missing[0]
        held = by_shard[first]
        more = f" and {len(held) - 1} more" if len(held) > 1 else ""
        others = f"; {len(missing) - 1} other shards are missing too" if len(missing) > 1 else ""
        raise ModelFileError(
            f"shard {first} named in {index} is missing from {folder} "
            f"(it should hold {held[0]!r}{more}){others}",
            hint="the download is incomplete; download the missing shards again",
        )
    headers: list[Header] = []
    for shard in sorted(by_shard):
        header = read_header(folder / shard)
        names = set(by_shard[shard])
        absent = [n for n in by_shard[shard] if n not in header.entries]
        if absent:
            more = f" ({len(absent) - 1} more are absent too)" if len(absent) > 1 else ""
            raise ModelFileError(
                f"tensor {absent[0]!r} is listed in {index} under {shard}, but that shard "
                f"does not contain it{more}",
                hint="the index and the shards come from different versions; " + _REDOWNLOAD,
            )
        kept = {n: e for n, e in header.entries.items() if n in names}
        headers.append(replace(header, entries=kept))
    return headers


def _check_shard_name(index: Path, shard: str, tensor: str) -> None:
    """A shard must be a file in the index's own folder (or below it), named without
    "..": an index is data from the download, and must not make mergelang read (or
    `--force` refuse to protect) files elsewhere on the machine."""
    parts = PurePosixPath(shard.replace("\\", "/")).parts
    if (not shard or "\0" in shard or PurePosixPath(shard).is_absolute()
            or PureWindowsPath(shard).is_absolute() or PureWindowsPath(shard).drive
            or ".." in parts):
        raise ModelFileError(
            f"{index} places tensor {tensor!r} in {shard!r}, outside the model's folder",
            hint="an index names shard files beside it; " + _REDOWNLOAD,
        )


def _model(path: Path, folder: Path | None, headers: list[Header]) -> SafetensorsModel:
    tensors: dict[str, TensorInfo] = {}
    for header in headers:
        for e in header.entries.values():
            tensors[e.name] = TensorInfo(
                name=e.name,
                shape=e.shape,
                dtype=e.dtype,
                file=header.path,
                offset=header.data_start + e.begin,
                nbytes=e.end - e.begin,
            )
    config = _read_config(folder / "config.json") if folder is not None else None
    identities = {h.path: h.identity for h in headers if h.identity is not None}
    return SafetensorsModel(path, folder, tensors, config, identities)


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    config = read_json(path, hint=_REDOWNLOAD)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path} is not a JSON object", hint=_REDOWNLOAD)
    return config


def _pread(opened: BinaryIO, lock: threading.Lock, window: ctypes.Array, at: int) -> int:
    """Read into `window` from byte `at`: how many bytes came (0 at the end of the
    file). A positioned read where the system has one (any thread may read at once),
    else a seek and a read under the model's lock (Windows)."""
    if hasattr(os, "preadv"):
        return os.preadv(opened.fileno(), [window], at)
    with lock:
        opened.seek(at)
        return opened.readinto(window) or 0
