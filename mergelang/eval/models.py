"""Getting a causal LM and its tokenizer from what a caller holds: a folder, a state
dict (a merge made in memory) or a `transformers` model.

Why a state dict is accepted: a sweep merges small models in memory and should not write
each point to disk to score it; the merged tensors are loaded into a model built from
the config of a folder named by `like=` (one of the inputs, usually the base).
Every failure here is an input error (MergeError, exit status 2), never a traceback.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import Diagnostic, MergeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A model ready to score: eval mode, its device, its tokenizer and how it takes a cache."""

    model: Any
    tokenizer: Any
    device: torch.device
    cache_arg: str  # "cache" (transformers >= 5) or "past_key_values"

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        for value in (tok.pad_token_id, tok.eos_token_id, 0):
            if value is not None:
                return int(value)
        return 0

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        config_eos = getattr(self.model.config, "eos_token_id", None)
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
        return {int(i) for i in ids if i is not None}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MergeError(Diagnostic(f'unknown dtype "{dtype}"',
                                    hint="one of " + ", ".join(DTYPES)))
    return DTYPES[dtype]


def load_model(model: Any, *, tokenizer: Any = None, like: str | Path | None = None,
               device: str | torch.device = "cpu",
               dtype: str | torch.dtype = "float32") -> LoadedModel:
    """Whatever `model` is, a LoadedModel on `device`; a model object keeps its device.

    Folders and state dicts are loaded in `dtype` (float32 by default, so that a score
    does not depend on the checkpoint's storage dtype).
    """
    dtype = resolve_dtype(dtype)
    if isinstance(model, (str, Path)):
        folder = _folder(model, "model")
        net = _from_pretrained(folder)
        tok_source = folder
    elif isinstance(model, Mapping):
        if like is None:
            raise MergeError(Diagnostic(
                "a state dict needs like=FOLDER: the model folder whose config.json and "
                "tokenizer it fits", hint="e.g. score(merged, tasks, like='examples/models/base')"))
        folder = _folder(like, "like=")
        net = _from_state_dict(model, folder)
        tok_source = folder
    elif isinstance(model, torch.nn.Module):
        net = model
        tok_source = Path(like) if like is not None else _name_or_path(model)
        if tokenizer is None and tok_source is None:
            raise MergeError(Diagnostic("a model object needs tokenizer= or like=FOLDER",
                                        hint="like= names a folder holding its tokenizer"))
    else:
        raise MergeError(Diagnostic(
            f"cannot score a {type(model).__name__}",
            hint="pass a model folder, a state dict (with like=FOLDER) or a transformers model"))
    if tokenizer is None:
        tokenizer = _tokenizer(tok_source)
    if not isinstance(model, torch.nn.Module):
        net = net.to(device=torch.device(device), dtype=dtype)
    net.eval()
    dev = next(net.parameters()).device
    params = inspect.signature(net.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return LoadedModel(net, tokenizer, dev, cache_arg)


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise MergeError(Diagnostic(f"{what} not found: {path}",
                                    hint="a Hugging Face model folder (config.json, weights, "
                                         "tokenizer)"))
    if not (folder / "config.json").is_file():
        raise MergeError(Diagnostic(f"{what} {path} has no config.json",
                                    hint="scoring needs a complete Hugging Face model folder"))
    return folder


def _from_pretrained(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise MergeError(Diagnostic(f"cannot load model {folder}: {_first_line(exc)}",
                                    hint="is it a complete causal-LM folder?")) from None


def _from_state_dict(state: Mapping[str, torch.Tensor], folder: Path) -> Any:
    """A model built from `folder`'s config, holding `state`'s tensors (copied)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder))
        net = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise MergeError(Diagnostic(f"cannot build a model from {folder}/config.json: "
                                    f"{_first_line(exc)}")) from None
    result = net.load_state_dict(dict(state), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        words = []
        if missing:
            words.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if result.unexpected_keys:
            words.append(f"{len(result.unexpected_keys)} unexpected "
                         f"(e.g. {result.unexpected_keys[0]})")
        raise MergeError(Diagnostic(f"the state dict does not fit {folder}: "
                                    + ", ".join(words) + " tensors",
                                    hint="like= must name a model of the same architecture"))
    if tied:
        net.tie_weights()
    return net


def _name_or_path(model: Any) -> Path | None:
    name = getattr(model, "name_or_path", "") or ""
    return Path(name) if name and Path(name).is_dir() else None


def _tokenizer(source: Path | None) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeError(Diagnostic(f"cannot load a tokenizer from {source}: {_first_line(exc)}",
                                    hint="pass tokenizer= or like=FOLDER")) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
