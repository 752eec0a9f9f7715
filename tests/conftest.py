"""Shared fixtures: the example models, and small Hugging Face model folders made on the spot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import small_tensors, write_hf_folder

EXAMPLE_MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"


@pytest.fixture
def make_model(tmp_path: Path) -> Callable[..., Path]:
    """make_model(name, tensors=None, config=None): a model folder at tmp_path/name;
    without `tensors`, `small_tensors()`."""

    def make(name: str, tensors: dict[str, torch.Tensor] | None = None,
             config: dict | None = None) -> Path:
        tensors = small_tensors() if tensors is None else tensors
        return write_hf_folder(tmp_path / name, tensors, config)

    return make


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """tmp_path/examples: the example models (base, math, code, chat), linked in, so a script
    in tmp_path can say `model("examples/base")`."""
    link = tmp_path / "examples"
    link.symlink_to(EXAMPLE_MODELS, target_is_directory=True)
    return link
