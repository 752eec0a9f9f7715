"""A PEFT LoRA adapter's `adapter_config.json`: what scales each module's `B @ A`.

PEFT gives each adapted module a rank `r` and an `alpha` (from `rank_pattern` and
`alpha_pattern` where a pattern names the module, else the config's `r` and
`lora_alpha`), and scales its product by `alpha / r`, or `alpha / sqrt(r)` with
`use_rslora`; with `lora_bias`, lora_B has a bias too, which PEFT's merge adds to the
module's bias at the same scale. `fan_in_fan_out` says the layer stores its weight
transposed (GPT-2's Conv1D), so the product is transposed too. `target_modules` and
`modules_to_save` say which modules the adapter may hold weights for. Everything here
is read and checked when the adapter is opened, so a damaged or unsupported config is a
located error before any tensor is read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError
from .jsonfile import read_json

CONFIG_NAME = "adapter_config.json"
# what PEFT puts before a model's tensor name in an adapter's file (read and written)
PREFIX = "base_model.model."
_RESAVE = ("save the adapter again with PEFT (peft_model.save_pretrained(folder)), or "
           "correct adapter_config.json")
# config keys naming LoRA variants whose merged weight is not base + scale * B @ A
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) rescale the merged weight by its norm",
    "target_parameters": "adapters on parameters (target_parameters) are stored differently",
    "layer_replication": "adapters with layer_replication change the model's layers",
    "trainable_token_indices": "adapters that train single tokens (trainable_token_indices) "
                               "store them apart",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) acts only after "
                               "its invocation tokens",
}


@dataclass(frozen=True)
class LoraConfig:
    """The parts of a LoRA adapter's config that say what its tensors mean."""

    path: Path
    r: int
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def rank(self, module: str) -> int:
        """The rank PEFT gives `module` (a module name of the model)."""
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)

    def scale(self, module: str) -> float:
        """The factor PEFT multiplies `module`'s `B @ A` by when it merges."""
        r = self.rank(module)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether `target_modules` names `module` (as PEFT matches it: a list names
        modules by their last components, a string is a regular expression for the
        whole name, "all-linear" any linear layer)."""
        wanted = self.target_modules
        if wanted is None or wanted == "all-linear":
            return True
        if isinstance(wanted, str):
            return re.fullmatch(wanted, module) is not None
        return any(module == t or module.endswith("." + t) for t in wanted)

    def saves(self, module: str) -> bool:
        """Whether `modules_to_save` names `module` (by its last components)."""
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)


def _pattern_key(patterns: dict, module: str) -> str:
    """PEFT's get_pattern_key: the first pattern whose match ends the module's name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def read_lora_config(folder: Path) -> LoraConfig:
    """Read and check `adapter_config.json` in `folder`. Raises ModelFileError."""
    path = folder / CONFIG_NAME
    raw = read_json(path, hint=_RESAVE)
    if not isinstance(raw, dict):
        raise ModelFileError(f"{path} is not a JSON object", hint=_RESAVE)
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise ModelFileError(f"{path} describes a {kind!r} adapter; lora() reads LoRA "
                             'adapters only (peft_type "LORA")',
                             hint="merge the adapter into its model with PEFT first "
                                  "(merge_and_unload), then use model(...)")
    for key, why in _UNSUPPORTED.items():
        if raw.get(key):
            raise ModelFileError(f"{path} sets {key}: {why}, which lora() cannot merge yet",
                                 hint="merge the adapter into its model with PEFT first "
                                      "(merge_and_unload), then use model(...)")
    r = _get(raw, path, "r", _is_count, "a positive integer")
    alpha = _get(raw, path, "lora_alpha", _is_number, "a number", default=8)
    config = LoraConfig(
        path=path, r=r, alpha=float(alpha),
        use_rslora=_get(raw, path, "use_rslora", _is_bool, "true or false", default=False),
        fan_in_fan_out=_get(raw, path, "fan_in_fan_out", _is_bool, "true or false",
                            default=False),
        lora_bias=_get(raw, path, "lora_bias", _is_bool, "true or false", default=False),
        target_modules=_get(raw, path, "target_modules", _is_names,
                            "a list of module names or a regular expression", default=None),
        modules_to_save=_get(raw, path, "modules_to_save", _is_name_list,
                             "a list of module names", default=None) or [],
        rank_pattern=_get(raw, path, "rank_pattern", _is_pattern(_is_count),
                          "an object from module patterns to positive integers",
                          default=None) or {},
        alpha_pattern=_get(raw, path, "alpha_pattern", _is_pattern(_is_number),
                           "an object from module patterns to numbers", default=None) or {},
    )
    for key in [*config.rank_pattern, *config.alpha_pattern] + (
            [config.target_modules] if isinstance(config.target_modules, str) else []):
        try:
            re.compile(key)
        except re.error as e:
            raise ModelFileError(f"{path}: {key!r} is not a regular expression ({e})",
                                 hint=_RESAVE) from None
    return config


_MISSING = object()


def _get(raw: dict, path: Path, key: str, valid, what: str, default=_MISSING):
    value = raw.get(key, _MISSING)
    if value is _MISSING or (value is None and default is not _MISSING):
        if default is _MISSING:
            raise ModelFileError(f'{path} has no "{key}" ({what})', hint=_RESAVE)
        return default
    if not valid(value):
        raise ModelFileError(f'"{key}" in {path} must be {what}, not {value!r}', hint=_RESAVE)
    return value


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_name_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def _is_names(v: object) -> bool:
    return (isinstance(v, str) and bool(v)) or _is_name_list(v)


def _is_pattern(valid):
    def check(v: object) -> bool:
        return isinstance(v, dict) and all(valid(x) for x in v.values())
    return check
