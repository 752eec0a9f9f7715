"""Models whose vocabularies differ: embedding and head rows aligned by token string.

Each merged row is checked against an independent computation: each input model's row
for the same token, found through that model's own tokenizer as transformers loads it,
merged by the closed form of the script; and the output is loaded and used by
transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.schedule import schedule
from tests.helpers import (
    VOCAB_WORDS,
    assert_error,
    assert_nothing_written,
    at,
    run,
    run_all,
    write,
    write_model,
    write_tokenized_model,
)

transformers = pytest.importorskip("transformers")

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vocab")
    write_tokenized_model(root / "base", seed=0)
    write_tokenized_model(root / "a", added=["<x>", "zebra"], seed=1)
    write_tokenized_model(root / "b", added=["zebra"], special=["<|im|>"], seed=2)
    write_tokenized_model(root / "r", words=tuple(reversed(VOCAB_WORDS)), seed=3)
    write_tokenized_model(root / "tied", seed=4, tied=True)
    write_tokenized_model(root / "tied_x", added=["<x>"], seed=5, tied=True)
    write_tokenized_model(root / "deep", added=["<x>"], seed=6, layers=3)
    return root


def rows(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """A model's vocabulary (as transformers reads it) and its tensors."""
    vocab = transformers.AutoTokenizer.from_pretrained(str(folder)).get_vocab()
    return vocab, load_file(str(folder / "model.safetensors"))


def row(folder: Path, token: str, name: str = EMBED) -> torch.Tensor | None:
    vocab, state = rows(folder)
    if token not in vocab:
        return None
    return state.get(name, state[EMBED])[vocab[token]]


def merge(tmp_path: Path, models: Path, text: str) -> Path:
    script = write(tmp_path, text.replace("MODELS", str(models)))
    out = tmp_path / "out"
    mergelang.load(script).run(out)
    return out


def others(token: str, folders: list[Path], name: str) -> torch.Tensor:
    """mergekit's default for a token a model lacks: the base's row (the first folder),
    else the only model's that has it, else the mean of those that have it."""
    having = [r for r in (row(f, token, name) for f in folders) if r is not None]
    first = row(folders[0], token, name)
    if first is not None and len(having) > 1:
        return first
    return torch.stack(having).mean(0) if having else torch.zeros(8)


def test_union_rows_match_token_strings(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
base = model("MODELS/base")
a = model("MODELS/a")
b = model("MODELS/b")
output base + task_arithmetic(a - base, b - base, weights=[1.0, 0.5])
""")
    folders = [models / n for n in ("base", "a", "b")]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    vocab = tokenizer.get_vocab()
    union = set().union(*(rows(f)[0] for f in folders))
    assert set(vocab) == union and len(vocab) == 14
    merged = load_file(str(out / "model.safetensors"))
    for name in (EMBED, HEAD):
        assert merged[name].shape == (14, 8)
        for token, index in vocab.items():
            base, a, b = (row(f, token, name) for f in folders)
            fill = others(token, folders, name)
            base, a, b = (fill if r is None else r for r in (base, a, b))
            expected = base + 1.0 * (a - base) + 0.5 * (b - base)
            torch.testing.assert_close(merged[name][index], expected, rtol=0, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 14 and config["num_hidden_layers"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    ids = tokenizer("the zebra <x> <|im|> cat")["input_ids"]
    assert ids == [vocab[t] for t in ("the", "zebra", "<x>", "<|im|>", "cat")]
    assert model(torch.tensor([ids])).logits.shape == (1, 5, 14)
    assert "<|im|>" in tokenizer.all_special_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the zebra <x> cat"


def test_different_order_is_aligned_to_the_donors(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "base"
base = model("MODELS/base")
r = model("MODELS/r")
output linear(base, r, weights=[0.25, 0.75])
""")
    vocab, _ = rows(models / "base")
    assert rows(models / "r")[0] != vocab   # the same tokens, numbered differently
    merged = load_file(str(out / "model.safetensors"))
    for name in (EMBED, HEAD):
        for token, index in vocab.items():
            expected = 0.25 * row(models / "base", token, name) + \
                0.75 * row(models / "r", token, name)
            torch.testing.assert_close(merged[name][index], expected, rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (models / "base/tokenizer.json").read_bytes()


@pytest.mark.parametrize("default", ["zero", "mean", "a"])
def test_defaults_for_a_missing_token(tmp_path, models, default):
    value = default if default == "a" else f'"{default}"'
    out = merge(tmp_path, models, f"""
set vocab = a
set vocab_default = {value}
base = model("MODELS/base")
a = model("MODELS/a")
output base + 2 * (a - base)
""")
    merged = load_file(str(out / "model.safetensors"))
    vocab, base_state = rows(models / "base")
    out_vocab = rows(out)[0]
    assert out_vocab == rows(models / "a")[0]
    for token in ("<x>", "zebra"):
        a_row = row(models / "a", token)
        fill = {"zero": torch.zeros(8), "mean": base_state[EMBED].mean(0), "a": a_row}[default]
        torch.testing.assert_close(merged[EMBED][out_vocab[token]], fill + 2 * (a_row - fill),
                                   rtol=0, atol=1e-6)


def test_per_token_sources_and_force(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
set vocab_tokens = [["zebra", "zero"], ["cat", b, "force"]]
base = model("MODELS/base")
a = model("MODELS/a")
b = model("MODELS/b")
output linear(base, a, b)
""")
    merged = load_file(str(out / "model.safetensors"))
    vocab = rows(out)[0]
    folders = [models / n for n in ("base", "a", "b")]
    # zebra: base lacks it and takes zero; a and b have their own rows
    expected = (row(folders[1], "zebra") + row(folders[2], "zebra")) / 3
    torch.testing.assert_close(merged[EMBED][vocab["zebra"]], expected, rtol=0, atol=1e-6)
    # cat: every model takes b's row, even those that have one of their own
    torch.testing.assert_close(merged[EMBED][vocab["cat"]], row(folders[2], "cat"),
                               rtol=0, atol=1e-6)


def test_tied_embeddings_stay_tied(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
t = model("MODELS/tied")
x = model("MODELS/tied_x")
output linear(t, x)
""")
    merged = load_file(str(out / "model.safetensors"))
    assert HEAD not in merged and merged[EMBED].shape == (12, 8)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 12
    vocab = rows(out)[0]
    torch.testing.assert_close(merged[EMBED][vocab["<x>"]], row(models / "tied_x", "<x>"),
                               rtol=0, atol=1e-6)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_vocabulary_of_a_model_not_merged(tmp_path, models):
    """The tokenizer's model gives the vocabulary only: the layer count and config.json
    come from the merged models (a donor outside the merge used to give them)."""
    out = merge(tmp_path, models, """
set vocab = model("MODELS/deep")
base = model("MODELS/base")
a = model("MODELS/a")
output linear(base, a)
""")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["vocab_size"] == 12
    assert rows(out)[0] == rows(models / "deep")[0]
    merged = load_file(str(out / "model.safetensors"))
    assert not any(".layers.2." in n for n in merged)
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


def test_pad_to_a_multiple(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
set vocab_pad_to = 8
base = model("MODELS/base")
a = model("MODELS/a")
output linear(base, a)
""")
    merged = load_file(str(out / "model.safetensors"))
    assert merged[EMBED].shape == (16, 8)
    assert torch.count_nonzero(merged[EMBED][13:]) == 0
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 16
    transformers.AutoModelForCausalLM.from_pretrained(str(out))


def test_row_blocks_give_the_same_bytes(tmp_path, models):
    """The executor asks for rows in blocks when memory is short: each block of the
    aligned rows is gathered on its own, fills included, with the same result."""
    script = write(tmp_path, """
set vocab = "union"
set vocab_default = "mean"
base = model("MODELS/base")
a = model("MODELS/a")
b = model("MODELS/b")
output base + ties(a - base, b - base, density=0.5)
""".replace("MODELS", str(models)))
    with mergelang.load(script).plan() as p:
        whole = run_all(p, budget=10**9)
        tiny = run_all(p, budget=1)
        chunks = {k.tensor.name: len(k.chunks) for k in schedule(p, 1)}
        assert chunks[EMBED] == chunks[HEAD] == 14   # one row per block
        for name in whole:
            assert torch.equal(whole[name], tiny[name]), name


def test_bfloat16_models(tmp_path, models):
    """Rows are gathered in the models' dtype; the merge computes in float32 as always."""
    import shutil

    from safetensors.torch import save_file

    for n in ("base", "a"):
        shutil.copytree(models / n, tmp_path / n)
        state = load_file(str(models / n / "model.safetensors"))
        save_file({k: v.bfloat16() for k, v in state.items()},
                  str(tmp_path / n / "model.safetensors"), metadata={"format": "pt"})
    out = merge(tmp_path, tmp_path, """
set vocab = "union"
base = model("MODELS/base")
a = model("MODELS/a")
output linear(base, a, weights=[1, 3])
""")
    merged = load_file(str(out / "model.safetensors"))
    assert merged[EMBED].dtype == torch.bfloat16
    vocab = rows(out)[0]
    for token in ("<x>", "cat"):
        b, a = row(tmp_path / "base", token), row(tmp_path / "a", token)
        b = a if b is None else b
        expected = ((b.float() + 3 * a.float()) / 4).bfloat16()
        assert torch.equal(merged[EMBED][vocab[token]], expected), token


def test_unreadable_tokenizer_is_not_compared_without_set_vocab(tmp_path, models, capsys):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(models / "base", odd)
    (odd / "tokenizer.json").write_text('{"t": 1}')
    script = script_of(tmp_path, models, f'o = model("{odd}")\n'
                       'base = model("MODELS/base")\noutput linear(o, base)\n')
    assert run(capsys, script, tmp_path / "out").code == 0
    (script.parent / "v.merge").write_text('set vocab = "union"\n' + script.read_text())
    assert_error(run(capsys, script.parent / "v.merge", tmp_path / "out2"),
                 at(script.parent / "v.merge", 2, 11), None, "has no vocabulary",
                 hint="save_pretrained")


# --- errors, found before a tensor is loaded ---------------------------------------------


def script_of(tmp_path: Path, models: Path, text: str) -> Path:
    return write(tmp_path, text.replace("MODELS", str(models)))


def test_different_vocabularies_without_a_setting(tmp_path, models, capsys):
    script = script_of(tmp_path, models, 'base = model("MODELS/base")\n'
                       'a = model("MODELS/a")\noutput base + (a - base)\n')
    out = tmp_path / "out"
    assert_error(run(capsys, script, out), at(script, 2, 11), f'"{models}/a"',
                 "13 tokens", "11 tokens", "embedding 13 rows", '"<x>"',
                 hint='set vocab = "union"')
    assert_nothing_written(out)


def test_different_order_without_a_setting(tmp_path, models, capsys):
    script = script_of(tmp_path, models, 'base = model("MODELS/base")\n'
                       'r = model("MODELS/r")\noutput linear(base, r)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 2, 11), None,
                 "differs from that of", "is token", hint="set vocab = base")


def test_tokenizer_larger_than_the_embedding(tmp_path, models, capsys):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(models / "base", wrong)
    shutil.copyfile(models / "a/tokenizer.json", wrong / "tokenizer.json")
    script = script_of(tmp_path, models, f'w = model("{wrong}")\n'
                       'a = model("MODELS/a")\noutput linear(w, a)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 1, 11), None,
                 "has 13 tokens", "has 11 rows", hint="tokenizer files")


BAD_SETTINGS = [
    ('set vocab = "all"', '"union", "base" or a model', 'set vocab = "union"'),
    ('set vocab_default = "one"', "vocab_default must be", 'set vocab_default = "zero"'),
    ("set vocab_pad_to = 0", "positive integer", "set vocab_pad_to = 64"),
    ('set vocab_tokens = "x"', "list of [token, source] lists", "set vocab_tokens"),
    ('set vocab_tokens = [["x", "b"]]', "each entry of vocab_tokens", "set vocab_tokens"),
]


@pytest.mark.parametrize(("line", "words", "hint"), BAD_SETTINGS)
def test_bad_settings(tmp_path, models, capsys, line, words, hint):
    script = script_of(tmp_path, models, f'{line}\nbase = model("MODELS/base")\n'
                       "output base\n")
    col = line.index("=") + 3
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 1, col), None, words,
                 hint=hint)


def test_setting_without_vocab(tmp_path, models, capsys):
    script = script_of(tmp_path, models, 'set vocab_default = "zero"\n'
                       'base = model("MODELS/base")\noutput base\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 1, 21), '"zero"',
                 "no effect without `set vocab`", hint='set vocab = "union"')


def test_token_rule_not_in_the_vocabulary(tmp_path, models, capsys):
    script = script_of(tmp_path, models, 'set vocab = "union"\n'
                       'set vocab_tokens = [["<nope>", "zero"]]\n'
                       'base = model("MODELS/base")\noutput base\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 2, 20), None,
                 '"<nope>"', "not in the output's vocabulary")


def test_token_rule_from_a_model_without_the_token(tmp_path, models, capsys):
    script = script_of(tmp_path, models, 'set vocab = "union"\n'
                       'base = model("MODELS/base")\na = model("MODELS/a")\n'
                       'set vocab_tokens = [["<x>", base]]\noutput linear(base, a)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 4, 20), None,
                 '"<x>"', "does not have it")


def test_model_without_tokenizer_under_set_vocab(tmp_path, models, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(models / "base/model.safetensors", bare / "model.safetensors")
    script = script_of(tmp_path, models, f'set vocab = "union"\nb = model("{bare}")\n'
                       'a = model("MODELS/a")\noutput linear(b, a)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 2, 11), None,
                 "no tokenizer files", hint="tokenizer.json")


def test_set_vocab_without_any_embedding(tmp_path, capsys):
    write_model(tmp_path / "m", {"model.layers.0.mlp.weight": torch.ones(2, 2)})
    script = write(tmp_path, 'set vocab = "union"\nm = model("m")\noutput m\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 1, 13), '"union"',
                 "no merged model has an input embedding", hint="remove `set vocab`")


def test_padded_embedding_without_and_with_set_vocab(tmp_path, models, capsys):
    """Same tokenizer, but one embedding padded to 16 rows (as many checkpoints are):
    an error without `set vocab`; with `set vocab = base` the rows beyond the tokens are
    dropped and the token rows merged."""
    import shutil

    from safetensors.torch import save_file

    padded = tmp_path / "padded"
    shutil.copytree(models / "base", padded)
    state = load_file(str(padded / "model.safetensors"))
    for name in (EMBED, HEAD):
        state[name] = torch.cat([state[name], torch.ones(5, 8)])
    save_file(state, str(padded / "model.safetensors"), metadata={"format": "pt"})
    script = script_of(tmp_path, models, 'r = model("MODELS/base")\n'
                       f'p = model("{padded}")\noutput linear(r, p)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 2, 11), None,
                 "embedding 16 rows", "embedding 11 rows", hint="set vocab = base")
    fixed = write(tmp_path, "set vocab = r\n" + script.read_text(), "fixed.merge")
    assert run(capsys, fixed, tmp_path / "out").code == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    base = load_file(str(models / "base" / "model.safetensors"))
    assert merged[EMBED].shape == (11, 8)
    torch.testing.assert_close(merged[EMBED], base[EMBED], rtol=0, atol=1e-6)


def test_base_vocabulary_needs_the_donors_tokenizer(tmp_path, models, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(models / "base/model.safetensors", bare / "model.safetensors")
    script = script_of(tmp_path, models, f'set vocab = "base"\nb = model("{bare}")\n'
                       'a = model("MODELS/a")\noutput linear(b, a)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 2, 11), None,
                 "no tokenizer files")


def test_an_adapter_merges_with_models_whose_vocabularies_differ(models, tmp_path, capsys):
    """An adapter is attached to the plain models after their rows are aligned: one that
    adapts attention only fits a union vocabulary, its delta zero on the aligned rows."""
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(str(models / "base"))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                             init_lora_weights=False)
    torch.manual_seed(7)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    script = write(tmp_path, f'set vocab = "union"\nbase = model("{models / "base"}")\n'
                             f'a = model("{models / "a"}")\n'
                             'output base + 0.5 * (a - base) + lora("adapter")\n')
    out = tmp_path / "out"
    result = run(capsys, script, out)
    assert result.code == 0, result.text
    merged = load_file(str(out / "model.safetensors"))
    factors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    vocab, a_state = rows(models / "a")
    _, base_state = rows(models / "base")
    q = "model.layers.1.self_attn.q_proj.weight"
    peft_q = f"base_model.model.{q[:-len('.weight')]}"
    lora_delta = 2.0 * factors[f"{peft_q}.lora_B.weight"] @ factors[f"{peft_q}.lora_A.weight"]
    expected = base_state[q] + 0.5 * (a_state[q] - base_state[q]) + lora_delta
    torch.testing.assert_close(merged[q], expected, rtol=0, atol=1e-6)
    assert merged[EMBED].shape[0] == len(vocab)  # the union: base's tokens and a's two more
    zebra = row(out, "zebra")
    torch.testing.assert_close(zebra, row(models / "a", "zebra"), rtol=0, atol=1e-6)


def test_a_delta_made_before_the_rows_were_aligned_is_refused_at_its_call(models, tmp_path,
                                                                           capsys):
    compressed = tmp_path / "t.delta"
    assert mergelang.cli.main(["compress", str(models / "r"), "--base", str(models / "base"),
                               "--density", "0.5", "-o", str(compressed), "--quiet"]) == 0
    script = write(tmp_path, f'set vocab = "union"\nbase = model("{models / "base"}")\n'
                             f'a = model("{models / "a"}")\n'
                             'output base + 0.5 * (a - base) + delta("t.delta")\n')
    result = run(capsys, script, tmp_path / "out")
    assert_error(result, at(script, 4, 40), '"t.delta"', "another base",
                 "set vocab")
    assert_nothing_written(tmp_path / "out")


# --- a row from another token (mergekit's `model_token`) --------------------------------


def test_a_row_from_another_token_of_a_model(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
base = model("MODELS/base")
a = model("MODELS/a")
b = model("MODELS/b")
set vocab_tokens = [["<|im|>", a, "from", "</s>"], ["zebra", b, "from", 3, "force"]]
output linear(base, a, b)
""")
    merged = load_file(str(out / "model.safetensors"))
    vocab = rows(out)[0]
    folders = [models / n for n in ("base", "a", "b")]
    b_state = load_file(str(folders[2] / "model.safetensors"))
    for name in (EMBED, HEAD):
        # <|im|>: b has it and keeps its row; base and a lack it and take a's "</s>" row,
        # found through a's own tokenizer
        expected = (2 * row(folders[1], "</s>", name) + row(folders[2], "<|im|>", name)) / 3
        torch.testing.assert_close(merged[name][vocab["<|im|>"]], expected, rtol=0,
                                   atol=1e-6)
        # zebra, forced: every model takes row 3 of b's own tensor
        torch.testing.assert_close(merged[name][vocab["zebra"]], b_state[name][3], rtol=0,
                                   atol=1e-6)
        assert not torch.equal(b_state[name][3], row(folders[2], "zebra", name))


@pytest.mark.parametrize(("rule", "words", "hint"), [
    ('["zebra", a, "from", "<nope>"]', ('"<nope>"', "does not have that token"),
     "own tokenizer"),
    ('["zebra", a, "from", 99]', ("id 99", "13 rows"), "from 0 to 12"),
    ('["zebra", a, "from"]', ("each entry of vocab_tokens", '"from"'), "set vocab_tokens"),
    ('["zebra", "zero", "from", "x"]', ("each entry of vocab_tokens",), "set vocab_tokens"),
    ('["zebra", n, "from", "x"]', ("has no embedding to take rows from",), "with an "
     "embedding"),
])
def test_bad_rows_from_another_token(tmp_path, models, capsys, rule, words, hint):
    write_model(tmp_path / "n", {"model.layers.0.mlp.weight": torch.ones(2, 2)})
    script = script_of(tmp_path, models, 'set vocab = "union"\nbase = model("MODELS/base")\n'
                       f'a = model("MODELS/a")\nn = model("{tmp_path}/n")\n'
                       f"set vocab_tokens = [{rule}]\noutput linear(base, a)\n")
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 5, 20), None, *words,
                 hint=hint)
    assert_nothing_written(tmp_path / "out")


# --- a multimodal config.json: the vocabulary size in text_config ------------------------


PATCH = "vision_tower.vision_model.embeddings.position_embedding.weight"
VISION = {"model_type": "clip_vision_model", "hidden_size": 8, "num_attention_heads": 2,
          "intermediate_size": 16, "num_hidden_layers": 1}


def multimodal(folder: Path, source: Path, top_level: bool) -> Path:
    """A copy of `source` laid out as Llava's and Gemma 3's checkpoints are: config.json
    hand-written with the language model's settings, vocab_size among them, inside
    `text_config`; the language model's tensors under `language_model.`, beside a vision
    tensor whose first dimension happens to be the base's vocabulary size (not a vocabulary
    tensor: it must be left as it is)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, folder)
    text = json.loads((source / "config.json").read_text())
    config = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
              "image_token_index": 5, "text_config": text,
              "vision_config": VISION}
    if top_level:
        config["vocab_size"] = text["vocab_size"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {f"language_model.{k}": v for k, v in rows(source)[1].items()}
    state[PATCH] = torch.arange(88.0).reshape(11, 8)   # the base's vocabulary size
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("top_level", [False, True])
def test_vocab_size_inside_text_config(tmp_path, models, top_level):
    base = multimodal(tmp_path / "mm_base", models / "base", top_level)
    multimodal(tmp_path / "mm_a", models / "a", top_level)
    assert json.loads((base / "config.json").read_text())["text_config"]["vocab_size"] == 11
    out = merge(tmp_path, tmp_path, """
set vocab = "union"
base = model("MODELS/mm_base")
a = model("MODELS/mm_a")
output linear(base, a)
""")
    config = json.loads((out / "config.json").read_text())
    merged = load_file(str(out / "model.safetensors"))
    vocab = rows(out)[0]
    assert merged["language_model." + EMBED].shape[0] == len(vocab) == 13
    for token, index in vocab.items():   # rows by token string, under the prefix
        expected = others(token, [models / "base", models / "a"], HEAD)
        mine = [row(models / n, token, HEAD) for n in ("base", "a")]
        mine = [expected if r is None else r for r in mine]
        torch.testing.assert_close(merged["language_model." + HEAD][index],
                                   (mine[0] + mine[1]) / 2, rtol=0, atol=1e-6)
    assert torch.equal(merged[PATCH], torch.arange(88.0).reshape(11, 8))
    assert config["text_config"]["vocab_size"] == 13
    assert config["text_config"]["num_hidden_layers"] == 2   # the rest is kept
    assert config["vision_config"] == VISION
    assert ("vocab_size" in config) == top_level
    if top_level:
        assert config["vocab_size"] == 13


# --- a sentencepiece tokenizer without tokenizer.json ----------------------------------


def test_sentencepiece_only_tokenizer_names_the_conversion(tmp_path, models, capsys):
    import shutil

    sp = tmp_path / "sp"
    sp.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(models / "a" / name, sp / name)
    (sp / "tokenizer.model").write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    script = script_of(tmp_path, models, f'set vocab = "union"\nbase = model("MODELS/base")\n'
                       f'sp = model("{sp}")\noutput linear(base, sp)\n')
    assert_error(run(capsys, script, tmp_path / "out"), at(script, 3, 12), None,
                 "only a sentencepiece tokenizer", "tokenizer.model",
                 hint="pip install sentencepiece protobuf")
    assert_nothing_written(tmp_path / "out")


# --- set vocab with a layer stack, and on a cluster -------------------------------------


def test_set_vocab_with_a_layer_stack(tmp_path, models):
    out = merge(tmp_path, models, """
set vocab = "union"
base = model("MODELS/base")
deep = model("MODELS/deep")
output stack(base.layers[0:2], deep.layers[1:3])
""")
    merged = load_file(str(out / "model.safetensors"))
    vocab = rows(out)[0]
    base, deep = models / "base", models / "deep"
    assert set(vocab) == set(rows(base)[0]) | {"<x>"} and merged[EMBED].shape == (12, 8)
    for token, index in vocab.items():
        # the embedding is the first slice's (base's; <x> from deep, the one that has it),
        # the head the last slice's (deep's), each by token string
        expected = row(base, token, EMBED)
        expected = row(deep, token, EMBED) if expected is None else expected
        torch.testing.assert_close(merged[EMBED][index], expected, rtol=0, atol=0)
        torch.testing.assert_close(merged[HEAD][index], row(deep, token, HEAD), rtol=0, atol=0)
    state = rows(deep)[1]
    for out_layer, deep_layer in ((2, 1), (3, 2)):
        key = "model.layers.{}.mlp.up_proj.weight"
        assert torch.equal(merged[key.format(out_layer)], state[key.format(deep_layer)])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and config["vocab_size"] == 12
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model(torch.tensor([[vocab["<x>"], vocab["cat"]]])).logits.shape == (1, 2, 12)


def test_set_vocab_on_a_cluster_of_two_workers(tmp_path, models, capsys):
    """`--workers 2`: each worker process compiles the script again and aligns the rows
    itself; the output is the local run's, byte for byte, tokenizer included."""
    pytest.importorskip("distributed")
    from mergelang.cli import main

    text = ('set vocab = "union"\nbase = model("MODELS/base")\na = model("MODELS/a")\n'
            'b = model("MODELS/b")\noutput linear(base, a, b, weights=[1, 2, 3])\n')
    script = script_of(tmp_path, models, text)
    local = tmp_path / "local"
    mergelang.load(script).run(local, shard_size="1KB")
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(script), "-o", str(tmp_path / "out"), "--workers", "2",
                     "--shard-size", "1KB", "--quiet"]) == 0, capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    for name in names:
        assert (local / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
