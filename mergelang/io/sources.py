"""The kinds of input a script can name, and how each is opened from its key.

`model("x")` names a checkpoint; other kinds (`lora("x")`, `delta("x")`) name files
that are not a model but denote one, tensor by tensor (an adapter's `B @ A`, a
compressed task vector). Every kind opens to a `ModelSource` (bind.py), so the rest of
the pipeline sees one thing: headers first, one tensor at a time.

A kind is registered with a function from a path to its source. The key of an input
is its resolved path, prefixed by its kind unless the kind is `model`, so that
`model("x")` and `lora("x")` are different inputs.

A source of a *derived* kind may not know its tensors' names and shapes from its own
files (an adapter is zero on every tensor it does not target). Such a source has an
`attach(frame)` method: bind calls it once every input is open, with the sources of
the program's plain models, and it raises ModelFileError when it does not fit them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .read import open_model

MODEL = "model"
_OPENERS: dict[str, Callable[[Path], Any]] = {MODEL: open_model}


def register_kind(kind: str, opener: Callable[[Path], Any]) -> None:
    """Make `kind` an input kind, opened by `opener(path)`."""
    _OPENERS[kind] = opener


def source_key(kind: str, path: str) -> str:
    """The identity of an input: its resolved path, prefixed by its kind."""
    return path if kind == MODEL else f"{kind}:{path}"


def split_key(key: str) -> tuple[str, Path]:
    """The kind and the path of an input's key."""
    kind, sep, rest = key.partition(":")
    if sep and kind in _OPENERS and kind != MODEL:
        return kind, Path(rest)
    return MODEL, Path(key)


def open_source(key: str) -> Any:
    """Open the input `key` names, reading headers only. Raises ModelFileError."""
    kind, path = split_key(key)
    return _OPENERS[kind](path)


def is_derived(source: Any) -> bool:
    """A source whose tensors are defined relative to the program's plain models."""
    return callable(getattr(source, "attach", None))
