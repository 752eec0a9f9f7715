"""Writing a delta file (the format is io/delta.py's): every part's place is fixed
before any is computed, so each is written as it is made, and nothing is left at the
target unless the whole file is written."""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..io.delta import FORMAT, VERSION, DeltaEntry, raw_bytes
from ..io.errors import ModelFileError
from ..io.header import HeaderEntry, encode_header


def _metadata(entries: Iterable[DeltaEntry], fields: Mapping[str, str]) -> dict[str, str]:
    tensors = {e.name: e.as_json() for e in entries}
    return {FORMAT: VERSION, **fields,
            "tensors": json.dumps(tensors, separators=(",", ":"), ensure_ascii=False)}


class DeltaWriter:
    """Writes a delta file: every part's place is fixed before any is computed, so parts
    are written as they are made; the digests, known only at the end, are written into
    the header then (they have a fixed length, so the header keeps its size). The file
    is built under a hidden name beside `path` and renamed into place by `commit`."""

    def __init__(self, path: Path, entries: list[DeltaEntry], fields: Mapping[str, str]):
        self.path, self.entries, self.fields = Path(path), entries, dict(fields)
        self.temp = self.path.parent / f".{self.path.name}.{secrets.token_hex(4)}.tmp"
        layout: list[HeaderEntry] = []
        position = 0
        for e in entries:
            for part, (dtype, shape) in e.parts.items():
                nbytes = math.prod(shape) * dtype.itemsize
                layout.append(HeaderEntry(part, dtype, shape, position, position + nbytes))
                position += nbytes
        self.layout = layout
        header = encode_header(_metadata(entries, fields), layout)
        self.header_size = len(header)
        self.offsets = {e.name: self.header_size + e.begin for e in layout}
        try:
            with open(self.temp, "xb") as f:
                f.write(header)
                f.truncate(self.header_size + position)
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from None
        self.file = open(self.temp, "r+b")  # noqa: SIM115 (closed by commit or abort)

    def write(self, part: str, first: int, values: torch.Tensor) -> None:
        """Elements [first, first + len) of a part, in the part's dtype."""
        try:
            self.file.seek(self.offsets[part] + first * values.element_size())
            self.file.write(raw_bytes(values))
        except OSError as exc:
            raise _write_error(self.path, exc) from None

    def commit(self) -> None:
        """Write the final header (with the digests) and put the file in place."""
        header = encode_header(_metadata(self.entries, self.fields), self.layout)
        if len(header) != self.header_size:
            raise AssertionError("a delta's header changed size")
        try:
            self.file.seek(0)
            self.file.write(header)
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temp, self.path)
        except OSError as exc:
            self.abort()
            raise _write_error(self.path, exc) from None

    def abort(self) -> None:
        """Remove the unfinished file."""
        if getattr(self, "file", None) is not None:
            self.file.close()
        self.temp.unlink(missing_ok=True)


def _write_error(path: Path, exc: OSError) -> ModelFileError:
    return ModelFileError(f"cannot write {path}: {exc.strerror or exc}",
                          hint="check that the output's folder exists, is writable and has "
                               "room")
