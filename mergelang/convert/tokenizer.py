"""mergekit's `tokenizer_source` and `tokenizer:` section as mergelang's `vocab*` settings.

mergekit builds the output's vocabulary (the base model's, one model's, or the union),
re-maps every model's embedding and head rows to it by token string, and fills a token a
model lacks from the models that have it (the base's row first). mergelang does the same
under `set vocab` (docs/language.md, "Vocabularies"), whose default fill is that rule, so
the translation is one setting per key. A model that only gives the tokenizer is named
for `set vocab` and merged nowhere: config.json and the layers come from the merged
models, as in mergekit.
"""

from __future__ import annotations

from typing import Any

from .. import ast
from .config import ModelRef, Tokenizer


def vocab_settings(translator: Any, tokenizer: Tokenizer, base: ModelRef | None) -> None:
    """Write the settings for `tokenizer` into the translator's script (its models are
    already named, the base first)."""
    read, script = translator.read, translator.script
    make = translator._at(tokenizer.key)
    if tokenizer.kind == "union":
        script.set("vocab", make.lit("union"), "mergekit: the union of the models' "
                   "vocabularies, rows re-mapped by token string")
    elif tokenizer.kind == "base":
        if base is None:
            raise read.fail(f"{tokenizer.what}: base needs a base_model", tokenizer.key,
                            hint="add `base_model: PATH`, or name the model whose tokenizer "
                                 "to use")
        script.set("vocab", make.name(translator._name(base, True)),
                   "mergekit: the base model's vocabulary, rows re-mapped by token string")
    else:
        merged = _merged(translator)
        name = translator._name(tokenizer.ref, False)
        comment = "its vocabulary, rows re-mapped by token string"
        if tokenizer.ref.key not in merged:
            comment += " (it is not merged: config.json comes from the merged models)"
        script.set("vocab", make.name(name), comment)
    if base is not None and translator.method.base == "ignored":
        script.set("donor", make.name(translator._name(base, True)),
                   "mergekit: config.json, and a missing token's row, from base_model")
    if tokenizer.tokens:
        merged = _merged(translator)
        items: list[ast.Expr] = []
        for entry in tokenizer.tokens:
            at = translator._at(entry.node)
            if entry.ref is not None and entry.ref.key not in merged:
                raise read.fail(f'the token "{entry.token}" takes its row from '
                                f'"{entry.ref.path}", which is not merged', entry.node,
                                hint="take it from one of the merged models, or "
                                     "`{kind: zero}`")
            source = at.name(translator._name(entry.ref, False)) if entry.ref is not None \
                else at.lit("zero")
            parts = [at.lit(entry.token), source]
            if entry.other is not None:   # mergekit's `kind: model_token`
                parts += [at.lit("from"), at.lit(entry.other)]
            parts += [at.lit("force")] if entry.force else []
            items.append(ast.ListExpr(at.span, tuple(parts)))
        script.set("vocab_tokens", ast.ListExpr(make.span, tuple(items)),
                   "mergekit's tokenizer.tokens")
    if tokenizer.pad_to is not None:
        value, node = tokenizer.pad_to
        script.set("vocab_pad_to", translator._at(node).lit(value),
                   "mergekit's pad_to_multiple_of")


def _merged(translator: Any) -> set:
    """The keys of the models the config merges (the base included)."""
    config = translator.config
    keys = {src.model.key for s in config.slices for src in s.sources}
    keys |= {s.base.key for s in config.slices if s.base is not None}
    if config.base is not None:
        keys.add(config.base.key)
    return keys
