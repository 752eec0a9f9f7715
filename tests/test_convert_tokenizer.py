"""`mergelang convert` of mergekit's tokenizer_source and tokenizer: section: the script
it writes sets the vocabulary as mergekit builds it, and the merged rows are checked by
token string against an independent computation of mergekit's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.convert import convert, convert_file
from tests.helpers import write_tokenized_model

transformers = pytest.importorskip("transformers")

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert_vocab")
    write_tokenized_model(root / "base", seed=0)
    write_tokenized_model(root / "a", added=["<x>", "zebra"], seed=1)
    write_tokenized_model(root / "b", added=["zebra"], special=["<|im|>"], seed=2)
    write_tokenized_model(root / "deep", added=["<x>"], seed=6, layers=3)
    return root


def convert_and_run(tmp_path: Path, folder: Path, config: str) -> tuple[str, Path]:
    yml = folder / f"{tmp_path.name}.yml"   # model paths are relative to the YAML's folder
    yml.write_text(config)
    script = tmp_path / "config.merge"
    convert_file(yml, script)
    text = script.read_text().replace('model("', f'model("{folder}/')
    script.write_text(text)
    out = tmp_path / "out"
    mergelang.load(script).run(out)
    return text, out


def row(folder: Path, token: str, name: str = EMBED) -> torch.Tensor | None:
    vocab = transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    state = load_file(str(folder / "model.safetensors"))
    return state[name][vocab[token]] if token in vocab else None


def test_union_with_token_sources_and_padding(tmp_path, folder):
    text, out = convert_and_run(tmp_path, folder, """\
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 0.5}
tokenizer:
  source: union
  tokens:
    zebra:
      source: {kind: zero}
    cat:
      source: b
      force: true
  pad_to_multiple_of: 8
""")
    assert 'set vocab = "union"' in text and "set vocab_pad_to = 8" in text
    assert "surgery" not in text
    merged = load_file(str(out / "model.safetensors"))
    vocab = transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert len(vocab) == 14 and merged[EMBED].shape == (16, 8)
    base, a, b = (folder / n for n in ("base", "a", "b"))
    for name in (EMBED, HEAD):
        # mergekit: zebra is zero where a model lacks it (the base), its own row elsewhere
        expected = 1.0 * row(a, "zebra", name) + 0.5 * row(b, "zebra", name)
        torch.testing.assert_close(merged[name][vocab["zebra"]], expected, rtol=0, atol=1e-6)
        # forced: every model takes b's row for cat, so every delta is zero
        torch.testing.assert_close(merged[name][vocab["cat"]], row(b, "cat", name),
                                   rtol=0, atol=1e-6)
        # <x>: only a has it; the others take a's row (mergekit's rule)
        torch.testing.assert_close(merged[name][vocab["<x>"]], row(a, "<x>", name),
                                   rtol=0, atol=1e-6)
        for token in ("the", "dog"):
            r = [row(f, token, name) for f in (base, a, b)]
            expected = r[0] + 1.0 * (r[1] - r[0]) + 0.5 * (r[2] - r[0])
            torch.testing.assert_close(merged[name][vocab[token]], expected, rtol=0,
                                       atol=1e-6)
        assert torch.count_nonzero(merged[name][14:]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


def test_tokenizer_of_a_model_not_merged_legacy_prefix(tmp_path, folder):
    """`model:deep` (the old spelling) gives the tokenizer only: the output has the merged
    models' two layers, not deep's three, and transformers loads it."""
    text, out = convert_and_run(tmp_path, folder, """\
merge_method: linear
models:
  - model: base
    parameters: {weight: 1.0}
  - model: a
    parameters: {weight: 3.0}
tokenizer_source: model:deep
""")
    assert "set vocab = deep" in text and "set donor" not in text
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 12
    merged = load_file(str(out / "model.safetensors"))
    vocab = transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()
    assert vocab == transformers.AutoTokenizer.from_pretrained(str(folder / "deep")).get_vocab()
    for token in ("<x>", "mat"):
        b, a = row(folder / "base", token), row(folder / "a", token)
        b = a if b is None else b   # the base lacks <x>: a's row, the only model with it
        torch.testing.assert_close(merged[EMBED][vocab[token]], (b + 3 * a) / 4,
                                   rtol=0, atol=1e-6)
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


def test_tokenizer_source_base_names_the_base(tmp_path, folder):
    text, out = convert_and_run(tmp_path, folder, """\
merge_method: linear
base_model: base
parameters: {weight: 1.0}
models:
  - model: a
tokenizer_source: base
""")
    assert "set vocab = base" in text and "set donor = base" in text
    assert (out / "tokenizer.json").read_bytes() == (folder / "base/tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 11


MT = "merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  tokens:\n    x: {source: "
BAD = [
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer_source: base\n",
     "base needs a base_model", ":4:1"),
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  tokens:\n    x:\n"
     "      source: c\n", '"x" takes its row from "c", which is not merged', ":6:5"),
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  pad_to_multiple_of: 0\n",
     "pad_to_multiple_of must be a whole number", ":5:23"),
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  tokens: [x]\n",
     "must map each token", ":5:11"),
    ("merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  tokens:\n    x: {force: true}\n",
     'the token "x" has no `source:`', ":6:8"),
    (MT + "{kind: model_token, token: y}}\n", "a model_token source needs `model:`", ":6:17"),
    (MT + "{kind: model_token, model: a}}\n", "one of `token:` or `token_id:`", ":6:17"),
    (MT + "{kind: model_token, model: a, token: y, token_id: 1}}\n",
     "one of `token:` or `token_id:`", ":6:57"),
    (MT + "{kind: model_token, model: a, token_id: -1}}\n", "token_id must be a whole number",
     ":6:57"),
    (MT + "{kind: model_token, model: c, token: y}}\n",
     '"x" takes its row from "c", which is not merged', ":6:5"),
    (MT + "{kind: other}}\n", 'unknown token source kind "other"', ":6:24"),
]


@pytest.mark.parametrize(("config", "message", "where"), BAD)
def test_bad_tokenizer_configs(config, message, where):
    with pytest.raises(mergelang.MergeError) as info:
        convert(config, "bad.yml")
    text = str(info.value)
    assert message in text and f"bad.yml{where}" in text, text


def test_model_token_sources_take_another_tokens_row(tmp_path, folder):
    """mergekit's `kind: model_token`: a token a model lacks (or, forced, every model)
    gets the row of another token of the model named, by its string (looked up in that
    model's own tokenizer) or by its id."""
    text, out = convert_and_run(tmp_path, folder, """\
merge_method: linear
models:
  - model: base
    parameters: {weight: 1.0}
  - model: a
    parameters: {weight: 3.0}
tokenizer:
  source: union
  tokens:
    <x>:
      source: {kind: model_token, model: a, token: "</s>"}
    cat:
      source: {kind: model_token, model: base, token_id: 7}
      force: true
""")
    assert '["<x>", a, "from", "</s>"]' in text and '["cat", base, "from", 7, "force"]' in text
    merged = load_file(str(out / "model.safetensors"))
    vocab = transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()
    base, a = folder / "base", folder / "a"
    base_state = load_file(str(base / "model.safetensors"))
    for name in (EMBED, HEAD):
        # <x>: a has it; the base lacks it and takes a's "</s>" row
        expected = (row(a, "</s>", name) + 3 * row(a, "<x>", name)) / 4
        torch.testing.assert_close(merged[name][vocab["<x>"]], expected, rtol=0, atol=1e-6)
        # cat, forced: both models take row 7 (a) of the base's own tensor
        torch.testing.assert_close(merged[name][vocab["cat"]], base_state[name][7], rtol=0,
                                   atol=1e-6)
        assert not torch.equal(base_state[name][7], row(base, "cat", name))
