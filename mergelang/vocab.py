"""Models whose vocabularies differ: the output's vocabulary, and each model's rows in it.

The `vocab*` settings (docs/language.md, "Vocabularies") choose the output's vocabulary:
the donor's (`"base"`), another model's, or the union of every merged model's. Bind
reads each model's tokenizer files (small JSON, no tensors), and this module turns them
into, per model, a row map (output row -> the model's row for the same token string, or
none) and what a missing row becomes; each model's source is then wrapped
(`io.aligned.AlignedSource`) so its embedding and head tensors present the output's
rows. The rest of the pipeline sees models that agree, and does not change.

Without `set vocab`, the models must share one vocabulary, as before; that they do is
checked here, from the tokenizer files and the embeddings' headers, so a merge of models
that number their tokens differently is a located error instead of a quiet mix-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .diagnostics import Span, error
from .io.aligned import MISSING, AlignedSource, Fill
from .io.errors import ModelFileError
from .io.sources import is_derived
from .io.tokenizer import Vocabulary, has_tokenizer, read_vocabulary
from .ir import Node, Op

SETTING_KEYS = ("vocab", "vocab_default", "vocab_tokens", "vocab_pad_to")
DEFAULTS = ("others", "zero", "mean")
_INPUT = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in)\.weight$")
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head"
                    r"|output)\.(?:weight|bias)$")
_HINT = ('align them by token string: `set vocab = "union"` (every token of every model) '
         'or `set vocab = base` (one model\'s vocabulary; see "Vocabularies" in '
         "docs/language.md)")


@dataclass(frozen=True)
class TokenRule:
    """`[token, source]`, `[token, model, "from", other]` (mergekit's `model_token`:
    the row of another token, a string or an id, of that model), each optionally with
    `"force"` last, of `set vocab_tokens`."""

    token: str
    source: str      # "zero", "mean", or a model key
    force: bool = False
    other: str | int | None = None   # with "from": the model's own token (or id) to copy


@dataclass
class VocabSettings:
    mode: str | None = None          # "union", "base", or a model key
    default: str = "others"          # one of DEFAULTS, or a model key
    tokens: tuple[TokenRule, ...] = ()
    pad_to: int | None = None
    spans: dict[str, Span] = field(default_factory=dict)


@dataclass(frozen=True)
class VocabPlan:
    """The output's vocabulary: what the tokenizer files and config.json are written from."""

    mode: str                        # "union", or "copy" (one model's tokenizer as it is)
    tokens: dict[str, int]
    rows: int
    folder: Any                      # the tokenizer copied, or the union's starting point
    added: list[tuple[str, bool]]    # the union's tokens beyond the donor's (token, special)


def apply_setting(settings: VocabSettings, key: str, value: object, span: Span) -> None:
    """Check and record one `set vocab...` (lower calls this with the evaluated value)."""
    from .lower.values import describe

    settings.spans[key] = span
    if key == "vocab":
        if value in ("union", "base") or _is_model(value):
            settings.mode = value.attr if _is_model(value) else value
            return
        raise error(f'vocab must be "union", "base" or a model, not {describe(value)}', span,
                    hint='e.g. set vocab = "union", or set vocab = chat (a model\'s tokenizer)')
    if key == "vocab_default":
        if value in DEFAULTS or _is_model(value):
            settings.default = value.attr if _is_model(value) else value
            return
        raise error(f"vocab_default must be {', '.join(map(repr, DEFAULTS))} or a model, not "
                    f"{describe(value)}".replace("'", '"'), span,
                    hint='e.g. set vocab_default = "zero"')
    if key == "vocab_pad_to":
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            settings.pad_to = value
            return
        raise error(f"vocab_pad_to must be a positive integer, not {describe(value)}", span,
                    hint="e.g. set vocab_pad_to = 64")
    example = ('e.g. set vocab_tokens = [["<|im_start|>", chat], ["<pad>", "zero", "force"], '
               '["<|im_end|>", chat, "from", "</s>"]]')
    if not isinstance(value, tuple):   # a list, while lowering
        raise error(f"vocab_tokens must be a list of [token, source] lists, not "
                    f"{describe(value)}", span, hint=example)
    rules = []
    for item in value:
        rule = _rule(item)
        if rule is None:
            raise error(f"each entry of vocab_tokens is [token, source] or [token, source, "
                        f'"force"] with a source "zero", "mean" or a model, or [token, model, '
                        f'"from", other token or id] (optionally "force" last), not '
                        f"{describe(item)}", span, hint=example)
        rules.append(rule)
    settings.tokens = tuple(rules)


def _rule(item: object) -> TokenRule | None:
    """One entry of vocab_tokens, or None when it is not one of its spellings."""
    if not isinstance(item, tuple) or not item or not isinstance(item[0], str):
        return None
    force = len(item) in (3, 5) and item[-1] == "force"
    body = item[:-1] if force else item
    if len(body) == 2 and (body[1] in ("zero", "mean") or _is_model(body[1])):
        return TokenRule(body[0], body[1].attr if _is_model(body[1]) else body[1], force)
    if (len(body) == 4 and _is_model(body[1]) and body[2] == "from"
            and (isinstance(body[3], str)
                 or (isinstance(body[3], int) and not isinstance(body[3], bool)))):
        return TokenRule(body[0], body[1].attr, force, body[3])
    return None


def _is_model(value: object) -> bool:
    return isinstance(value, Node) and value.op is Op.MODEL


def embedding_name(source: Any) -> str | None:
    """The input embedding's tensor name, or None for a model without one."""
    return next((n for n, i in source.tensors.items() if _INPUT.search(n) and len(i.shape) == 2),
                None)


@dataclass
class _Model:
    key: str
    display: str
    span: Span | None
    source: Any
    rows: int
    vocab: Vocabulary | None


def align(settings: VocabSettings | None, models: dict[str, Any], donor: str | None,
          merged: set[str]) -> VocabPlan | None:
    """Check the models' vocabularies, and with `set vocab` wrap each model's source so it
    presents the output's vocabulary (in place, in `models`: key -> BoundModel). `merged`:
    the models the output reads, whose rows a missing row may take by default."""
    settings = settings or VocabSettings()
    strict = settings.mode is not None   # else an unreadable tokenizer is not checked
    cache: dict = {}
    found = [m for m in (_model(b, cache, strict=strict) for b in models.values())
             if m is not None]
    if settings.mode is None:
        for key in ("vocab_default", "vocab_tokens", "vocab_pad_to"):
            if key in settings.spans:
                raise error(f"{key} has no effect without `set vocab`", settings.spans[key],
                            hint='add e.g. set vocab = "union"')
        _check_same(found, donor)
        return None
    span = settings.spans["vocab"]
    for m in found:
        if m.vocab is None:
            raise error(f"{m.display} has no tokenizer files, so its embedding rows cannot be "
                        "matched to token strings", m.span, hint="copy its tokenizer "
                        "(tokenizer.json) into the model's folder")
    by_key = {m.key: m for m in found}
    if not any(m.key in merged for m in found):
        raise error("set vocab, but no merged model has an input embedding (embed_tokens, "
                    "wte, word_embeddings or embed_in) to align", span,
                    hint="remove `set vocab`: these models have no vocabulary rows")
    if settings.mode == "union":
        plan = _union([by_key[k] for k in by_key if k == donor] +
                      [m for m in found if m.key != donor and m.key in merged],
                      settings.pad_to)
    else:
        key = donor if settings.mode == "base" else settings.mode
        source = by_key.get(key) or _model(models[key], cache, need=True, strict=True)
        if source is None or source.vocab is None:
            raise error(f"{models[key].display} has no tokenizer files to take the vocabulary "
                        "from", span, hint="name a model whose folder has tokenizer.json")
        plan = VocabPlan("copy", dict(source.vocab.tokens),
                         _padded(source.vocab.size, settings.pad_to), source.source.folder, [])
    _wrap(found, plan, settings, donor, models, merged)
    return plan


def _model(bound: Any, cache: dict, need: bool = False, strict: bool = False) -> _Model | None:
    """A model's embedding rows and vocabulary; None when it has no embedding. A tokenizer
    that cannot be read is an error when `strict`, else it is not compared."""
    source = bound.source
    name = embedding_name(source)
    if is_derived(source) or (name is None and not need):
        return None
    folder = source.folder
    vocab = None
    if has_tokenizer(folder):
        try:
            vocab = read_vocabulary(folder, cache)
        except ModelFileError as exc:
            if strict:
                raise error(exc.message, bound.ref.span, hint=exc.hint) from None
    rows = source.tensors[name].shape[0] if name is not None else 0
    m = _Model(bound.key, bound.display, bound.ref.span, source, rows, vocab)
    if vocab is not None and name is not None and vocab.size > rows:
        raise error(f"the tokenizer of {m.display} has {vocab.size} tokens, but its embedding "
                    f"({name}) has {rows} rows", m.span,
                    hint="its tokenizer files are from another model; copy the right ones "
                    "into its folder")
    return m


def _check_same(found: list[_Model], donor: str | None) -> None:
    known = [m for m in found if m.vocab is not None]
    if len(known) < 2:
        return
    ref = next((m for m in known if m.key == donor), known[0])
    for m in known:
        if m is ref or (m.vocab.tokens == ref.vocab.tokens and m.rows == ref.rows):
            continue
        raise error(f"the vocabulary of {m.display} ({m.vocab.size} tokens, embedding "
                    f"{m.rows} rows) differs from that of {ref.display} ({ref.vocab.size} "
                    f"tokens, embedding {ref.rows} rows){_difference(ref, m)}", m.span,
                    hint=_HINT)


def _difference(a: _Model, b: _Model) -> str:
    """An example of how two vocabularies differ, for the message."""
    for token, index in b.vocab.tokens.items():
        if token not in a.vocab.tokens:
            return f': "{token}" (id {index}) is not in {a.display}'
        if a.vocab.tokens[token] != index:
            return (f': "{token}" is token {a.vocab.tokens[token]} in {a.display} and '
                    f"{index} in {b.display}")
    for token in a.vocab.tokens:
        if token not in b.vocab.tokens:
            return f': "{token}" is not in {b.display}'
    return ""


def _padded(size: int, multiple: int | None) -> int:
    return size if not multiple else -(-size // multiple) * multiple


def _union(ordered: list[_Model], pad_to: int | None) -> VocabPlan:
    """The first model's vocabulary, then each other model's new tokens in id order."""
    first = ordered[0]
    tokens = dict(first.vocab.tokens)
    added: list[tuple[str, bool]] = []
    next_id = first.vocab.size
    for m in ordered[1:]:
        for token, _ in sorted(m.vocab.tokens.items(), key=lambda kv: kv[1]):
            if token not in tokens:
                tokens[token] = next_id
                next_id += 1
                added.append((token, token in m.vocab.special))
    return VocabPlan("union", tokens, _padded(next_id, pad_to), first.source.folder, added)


def _wrap(found: list[_Model], plan: VocabPlan, settings: VocabSettings, donor: str | None,
          models: dict[str, Any], merged: set[str]) -> None:
    at = {index: token for token, index in plan.tokens.items()}
    maps = {m.key: [m.vocab.tokens.get(at[r], MISSING) if r in at else MISSING
                    for r in range(plan.rows)] for m in found}
    for m in found:   # a token beyond a model's rows is one it lacks
        maps[m.key] = [i if i < m.rows else MISSING for i in maps[m.key]]
    rules = {rule.token: rule for rule in settings.tokens}
    tokens_span = settings.spans.get("vocab_tokens")
    by_key = {m.key: m for m in found}
    others: dict[str, int] = {}   # a `from` rule's token -> the model's own row it copies
    for rule in settings.tokens:
        if rule.token not in plan.tokens:
            raise error(f'vocab_tokens names "{rule.token}", which is not in the output\'s '
                        "vocabulary", tokens_span, hint="list tokens of the output's tokenizer")
        if rule.source in models and rule.source not in maps:
            raise error(f'vocab_tokens takes "{rule.token}" from '
                        f"{models[rule.source].display}, which has no embedding to take rows "
                        "from", tokens_span, hint='take it from a model with an embedding, or '
                        '"zero"')
        if rule.other is not None:
            others[rule.token] = _other_row(rule, by_key[rule.source], models, tokens_span)
        elif rule.source in maps and maps[rule.source][plan.tokens[rule.token]] == MISSING:
            raise error(f'vocab_tokens takes "{rule.token}" from {models[rule.source].display}'
                        ", which does not have it", tokens_span,
                        hint="take it from a model that has the token, or \"zero\"")
    if settings.default in models and settings.default not in maps:
        raise error(f"{models[settings.default].display} has no embedding to take rows from",
                    settings.spans["vocab_default"], hint='use "others", "zero" or "mean"')
    peers = {m.key: m.source for m in found}
    wrapped = {}
    for m in found:
        fills, row_map = {}, list(maps[m.key])
        for row in range(plan.rows):
            rule = rules.get(at.get(row))
            if row_map[row] != MISSING and not (rule and rule.force):
                continue
            if rule and rule.other is not None:
                fills[row] = Fill(rows=((rule.source, others[rule.token]),))
            else:
                fills[row] = _fill(rule.source if rule else settings.default, row, maps,
                                   donor, merged)
            row_map[row] = MISSING
        aligned = {n for n, i in m.source.tensors.items()
                   if _VOCAB.search(n) and i.shape and i.shape[0] == m.rows}
        wrapped[m.key] = AlignedSource(m.source, aligned, plan.rows, row_map, fills, peers,
                                       embedding_name(m.source))
    for key, source in wrapped.items():
        models[key].source = source


def _other_row(rule: TokenRule, m: _Model, models: dict[str, Any], span: Span | None) -> int:
    """The row of `m` that a `from` rule copies: its own id for the token named (mergekit
    reads it from the model's own tokenizer, before any alignment), or the id given."""
    what = f'vocab_tokens takes "{rule.token}" from the row of '
    if isinstance(rule.other, str):
        if rule.other not in m.vocab.tokens:
            raise error(f'{what}"{rule.other}" of {m.display}, which does not have that token',
                        span, hint=f"name a token of {m.display}'s own tokenizer, or give "
                        "its id")
        row = m.vocab.tokens[rule.other]
    else:
        row = rule.other
    if not 0 <= row < m.rows:
        raise error(f"{what}id {row} of {m.display}, whose embedding has {m.rows} rows", span,
                    hint=f"an id from 0 to {m.rows - 1}")
    return row


def _fill(source: str, row: int, maps: dict[str, list[int]], donor: str | None,
          merged: set[str]) -> Fill:
    if source == "zero":
        return Fill()
    if source == "mean":
        return Fill(mean=True)
    if source != "others":   # a model: its row for the token, zero where it lacks it too
        own = maps[source][row]
        return Fill(rows=((source, own),)) if own != MISSING else Fill()
    having = [k for k, rows in maps.items() if k in merged and rows[row] != MISSING]
    if len(having) > 1 and donor in having:   # mergekit: the base's, when it has the token
        having = [donor]
    return Fill(rows=tuple((k, maps[k][row]) for k in having))
