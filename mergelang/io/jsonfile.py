"""JSON from model folders, read so that no file content can crash the reader.

Model folders come from anywhere. Python's json module raises RecursionError on deeply
nested input and ValueError on integers longer than 4,300 digits, and a FIFO or device
named `config.json` would block a plain read forever; here every such case is a
ModelFileError naming the file, like any other damaged download.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import ModelFileError

JSON_LIMIT = 256 * 2**20
"""The largest JSON file read (an index of a million tensors is about 100 MB)."""


def parse_json(raw: bytes | str, path: Path, hint: str, subject: str | None = None) -> object:
    """Decode JSON text from `path`; ModelFileError (with `hint`) when it cannot be.
    `subject` starts the message (default: the path)."""
    subject = subject or str(path)
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{subject} is not UTF-8 text (byte {e.start})", hint=hint) from None
    except RecursionError:
        raise ModelFileError(f"{subject} is JSON nested too deeply to read", hint=hint) from None
    except ValueError as e:  # a JSONDecodeError, or an integer too long to convert
        raise ModelFileError(f"{subject} is not valid JSON ({e})", hint=hint) from None


def read_json(path: Path, hint: str) -> object:
    """Read and decode the JSON file at `path`, refusing anything but a regular file."""
    return parse_json(read_regular_file(path, JSON_LIMIT, hint), path, hint)


def read_regular_file(path: Path, limit: int, hint: str) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Opened without blocking, so a FIFO is refused instead of waiting for a writer."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}",
                             hint="check that the file is readable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelFileError(f"{path} is not a regular file", hint=hint)
        if info.st_size > limit:
            raise ModelFileError(
                f"{path} is {info.st_size} bytes long; at most {limit} are read", hint=hint)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}",
                             hint="check that the file is readable") from None
    finally:
        os.close(fd)
