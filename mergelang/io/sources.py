"""The kinds of input a script can name, and how each is opened from its key.

`model("x")` names a checkpoint; other kinds (`lora("x")`, `delta("x")`) name files
that are not a model but denote one, tensor by tensor (an adapter's `B @ A`, a
compressed task vector). Every kind opens to a `ModelSource` (bind.py), so the rest of
the pipeline sees one thing: headers first, one tensor at a time.

A kind is registered with a function from a path to its source. The key of an input
is its resolved path, prefixed by its kind unless the kind is `model`, so that
`model("x")` and `lora("x")` are different inputs; a derived input's options (the
`base=` of `lora("x", base=b)`: b's key) are part of its key, as JSON after the kind,
so the same adapter against two bases is two inputs.

A source of a *derived* kind may not know its tensors' names and shapes from its own
files (an adapter is zero on every tensor it does not target). Such a source has an
`attach(frame)` method: bind calls it once every input is open, with the sources of
the program's plain models, and it raises ModelFileError when it does not fit them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .header import read_header
from .read import SafetensorsModel, open_model

MODEL = "model"
# The files of the derived kinds, named here so that model(...) can tell them from a
# model (io/lora.py and io/delta.py define them; they import this module).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_DELTA_FORMAT = "mergelang_delta"


def open_plain_model(path: Path) -> SafetensorsModel:
    """Open `model("x")`, refusing an adapter or a delta file: their tensors are
    factors or stored parts, which would otherwise merge as if they were weights."""
    model = open_model(path)
    files = {info.file for info in model.tensors.values()}
    if len(files) != 1:
        return model
    (file,) = files
    kind = None
    if file.name == _ADAPTER_FILES[1] and (file.parent / _ADAPTER_FILES[0]).is_file():
        kind, call = "a LoRA adapter", f'lora("{file.parent}")'
    elif _DELTA_FORMAT in read_header(file).metadata:
        kind, call = "a compressed task vector (mergelang compress)", f'delta("{file}")'
    if kind is None:
        return model
    model.close()
    raise ModelFileError(f"{path} is {kind}, not a model",
                         hint=f"name it with {call}, added to the model it was made from")


_OPENERS: dict[str, Callable[[Path], Any]] = {MODEL: open_plain_model}


def register_kind(kind: str, opener: Callable[[Path], Any]) -> None:
    """Make `kind` an input kind, opened by `opener(path)`."""
    _OPENERS[kind] = opener


def source_key(kind: str, path: str, options: dict[str, str] | None = None) -> str:
    """The identity of an input: its resolved path, prefixed by its kind and options
    (sorted, so equal options make equal keys)."""
    if kind == MODEL:
        return path
    written = json.dumps(dict(sorted(options.items())), separators=(",", ":")) \
        if options else ""
    return f"{kind}{written}:{path}"


def split_key(key: str) -> tuple[str, Path]:
    """The kind and the path of an input's key."""
    kind, _, path = _parse_key(key)
    return kind, path


def key_options(key: str) -> dict[str, str]:
    """The options of an input's key (`{"base": KEY}`), empty for none."""
    return _parse_key(key)[1]


def _parse_key(key: str) -> tuple[str, dict[str, str], Path]:
    kind = key[:min((i for i in (key.find(":"), key.find("{")) if i >= 0), default=0)]
    if kind in _OPENERS and kind != MODEL:
        rest, options = key[len(kind):], {}
        if rest.startswith("{"):
            try:
                options, end = json.JSONDecoder().raw_decode(rest)
            except ValueError:
                return MODEL, {}, Path(key)
            rest = rest[end:]
        if rest.startswith(":") and isinstance(options, dict):
            return kind, options, Path(rest[1:])
    return MODEL, {}, Path(key)


def open_source(key: str) -> Any:
    """Open the input `key` names, reading headers only. Raises ModelFileError."""
    kind, path = split_key(key)
    return _OPENERS[kind](path)


def frame_of(key: str, plain: dict[str, Any]) -> list[Any]:
    """The plain models (key -> source) a derived input `key` is attached to: its
    `base` when its key names one, else all of them (the first gives the names)."""
    base = key_options(key).get("base")
    return [plain[base]] if base is not None else list(plain.values())


def is_derived(source: Any) -> bool:
    """A source whose tensors are defined relative to the program's plain models."""
    return callable(getattr(source, "attach", None))
