"""The corpus of public mergekit configs (tests/data/mergekit_configs/, each naming where it
came from, paths rewritten to local test models): every one converts, every warning is
located in its YAML and said again in the script's head, and one config per method (and
every config with a LoRA adapter or a tokenizer section) runs on tiny Llama models.

What mergekit does with each config was checked by hand against mergekit 0.1.5 itself
(docs/convert.md, "Checked against mergekit"); mergekit is not a test dependency.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergelang
from mergelang.convert import METHODS, convert_file
from tests.helpers import write_tokenized_model

CORPUS = Path(__file__).parent / "data" / "mergekit_configs"
CONFIGS = sorted(CORPUS.glob("*.yml"))
MODELS = ("base", "a", "b", "c", "d", "e")


def _method(config: Path) -> str:
    return yaml.safe_load(config.read_text())["merge_method"]


def _sample() -> list[Path]:
    """The first config of each method, and every one with an adapter."""
    seen: set[str] = set()
    out = []
    for config in CONFIGS:
        if _method(config) not in seen or "+lora" in config.read_text():
            out.append(config)
        seen.add(_method(config))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Six tiny Llama models sharing one tokenizer, and a PEFT adapter on `base`."""
    root = tmp_path_factory.mktemp("corpus")
    for seed, name in enumerate(MODELS):
        write_tokenized_model(root / name, seed=seed, layers=4)
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        adapted = peft.get_peft_model(model, peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]))
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        adapted.save_pretrained(root / "lora")
    return root


def test_the_corpus_covers_every_method_and_the_odd_keys():
    assert len(CONFIGS) >= 40
    methods = {_method(c) for c in CONFIGS}
    assert set(METHODS) - {"ram", "ramplus_tl"} <= methods   # no public configs found
    text = "\n".join(c.read_text() for c in CONFIGS)
    for odd in ("revision:", "pad_to_multiple_of", "output_dir", "dype:", "\nint8_mask:",
                "normalize: 1.0", "modules:", "+lora", "pattern:"):
        assert odd in text, odd
    for config in CONFIGS:
        assert config.read_text().startswith("# Source: "), config.name


def _convert(folder: Path, config: Path) -> tuple[Path, list]:
    copy = folder / config.name
    shutil.copy(config, copy)
    script = copy.with_suffix(".merge")
    return script, convert_file(copy, script, force=True).warnings


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_converts(folder, config):
    script, notes = _convert(folder, config)
    text = script.read_text()
    lines = len(config.read_text().splitlines())
    for warning in notes:
        assert warning.span is not None and 1 <= warning.span.line <= lines
        if "so does this script" in warning.message:   # ignored: said in the head too
            said = warning.message.split(":")[0]
            assert said in text.replace("\n#   ", " "), said
    mergelang.load(script).plan()   # compiles and binds against the models' headers


@pytest.mark.parametrize("config", _sample(), ids=[c.stem for c in _sample()])
def test_a_sample_runs(folder, config):
    script, _ = _convert(folder, config)
    out = folder / f"out_{config.stem}"
    mergelang.load(script).run(out, force=True)
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(folder / "base" / "model.safetensors"))
    settings = yaml.safe_load(config.read_text())
    slices = settings.get("slices") or next(iter(settings.get("modules", {None: {}}).values()))
    slices = slices.get("slices") if isinstance(slices, dict) else slices
    layers = (sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0]
                  for s in slices) if slices else 4)
    assert set(merged) == {re.sub(r"layers\.\d+\.", f"layers.{i}.", n)
                           for n in base for i in range(layers)}
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    expected = settings.get("out_dtype") or (
        "float32" if settings["merge_method"] == "arcee_fusion"
        else settings.get("dtype") or "float32")
    assert {str(t.dtype) for t in merged.values()} == {f"torch.{expected}"}
