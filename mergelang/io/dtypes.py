"""The safetensors dtype names and the torch dtypes they stand for.

Shared by the reader and the writer so both agree on exactly which dtypes a model may hold.
The float8 types are included only when this torch build has them.
"""

from __future__ import annotations

import torch

_BASE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_OPTIONAL = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}

DTYPES: dict[str, torch.dtype] = dict(_BASE)
DTYPES.update(
    {name: getattr(torch, attr) for name, attr in _OPTIONAL.items() if hasattr(torch, attr)}
)

_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
FLOAT8: frozenset[torch.dtype] = frozenset(DTYPES[name] for name in _OPTIONAL if name in DTYPES)
"""The float8 dtypes: read and widened to the compute dtype before any arithmetic (torch
promotes no float8 type), summed only once widened."""


def dtype_from_name(name: str) -> torch.dtype | None:
    """The torch dtype for a safetensors dtype string, or None when it is not supported."""
    return DTYPES.get(name)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype; ValueError when it has none."""
    try:
        return _NAMES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in DTYPES.values())
        raise ValueError(
            f"dtype {dtype} cannot be stored in safetensors here; supported: {supported}"
        ) from None


def supported_names() -> str:
    """The supported dtype strings, for error messages."""
    return ", ".join(DTYPES)
