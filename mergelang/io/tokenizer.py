"""A model's vocabulary read from its tokenizer files, and the output's tokenizer written.

Reading is plain JSON (tokenizer.json, else vocab.json or vocab.txt, with the added
tokens): bind reads every model's vocabulary before a tensor is loaded, and importing
transformers for that would cost seconds. Writing a union vocabulary does use
transformers: it is what loads the result, so letting it add the tokens and save keeps
tokenizer.json, tokenizer_config.json and the special-tokens map consistent with each
other in the way its own loader expects.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFileError
from .jsonfile import JSON_LIMIT, parse_json, read_json, read_regular_file

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json",
)
"""The files that make a tokenizer (the chat template stays the donor's)."""

_HINT = "save the tokenizer again, e.g. with transformers' tokenizer.save_pretrained(folder)"


@dataclass(frozen=True)
class Vocabulary:
    """Token strings and their ids, as a model's tokenizer gives them."""

    tokens: dict[str, int]
    special: frozenset[str]
    file: Path

    @property
    def size(self) -> int:
        """One more than the largest id: the rows an embedding needs for it."""
        return max(self.tokens.values(), default=-1) + 1


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((Path(folder) / n).is_file() for n in TOKENIZER_FILES)


def read_vocabulary(folder: Path, cache: dict | None = None) -> Vocabulary:
    """The vocabulary of the tokenizer in `folder`. Raises ModelFileError when it has none
    that can be read without the tokenizer's own library (a sentencepiece model alone).
    `cache` (bytes' digest -> Vocabulary) parses a tokenizer.json that several models share
    once: a real one is megabytes of JSON."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if path.is_file():
        raw = read_regular_file(path, JSON_LIMIT, hint=_HINT)
        digest = hashlib.sha256(raw).digest()
        if cache is not None and digest in cache:
            return cache[digest]
        data = parse_json(raw, path, hint=_HINT)
        if not isinstance(data, dict):
            raise ModelFileError(f"{path} is not a JSON object", hint=_HINT)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        vocab = model.get("vocab")
        if isinstance(vocab, list):   # Unigram: [piece, score] pairs, the id is the index
            tokens = {_piece(p, path): i for i, p in enumerate(vocab)}
        elif isinstance(vocab, dict):
            tokens = dict(vocab)
        else:
            raise ModelFileError(f"{path} has no vocabulary (model.vocab)", hint=_HINT)
        special = set()
        for entry in data.get("added_tokens") or ():
            if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
                raise ModelFileError(f"{path} has a malformed added token: {entry!r}",
                                     hint=_HINT)
            tokens[entry["content"]] = entry.get("id")
            if entry.get("special"):
                special.add(entry["content"])
        vocabulary = _checked(tokens, frozenset(special), path)
        if cache is not None:
            cache[digest] = vocabulary
        return vocabulary
    if (folder / "vocab.json").is_file():
        path = folder / "vocab.json"
        tokens = dict(_object(path))
    elif (folder / "vocab.txt").is_file():
        path = folder / "vocab.txt"
        lines = path.read_text(encoding="utf-8").splitlines()
        tokens = {line: i for i, line in enumerate(lines)}
    elif (folder / "tokenizer.model").is_file():
        raise ModelFileError(
            f"{folder} has only a sentencepiece tokenizer (tokenizer.model, no "
            "tokenizer.json), whose vocabulary needs the sentencepiece library to read",
            hint="convert it once to a fast tokenizer, which writes tokenizer.json: pip "
            "install sentencepiece protobuf, then in Python: transformers.AutoTokenizer."
            "from_pretrained(FOLDER).save_pretrained(FOLDER)")
    else:
        raise ModelFileError(
            f"{folder} has no tokenizer.json (nor vocab.json or vocab.txt), so its "
            "vocabulary cannot be read", hint=_HINT + " (a fast tokenizer writes "
            "tokenizer.json)")
    added = folder / "added_tokens.json"
    if added.is_file():
        tokens.update(_object(added))
    return _checked(tokens, frozenset(), path)


def _object(path: Path) -> dict:
    value = read_json(path, hint=_HINT)
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is not a JSON object", hint=_HINT)
    return value


def _piece(entry: object, path: Path) -> str:
    if isinstance(entry, list) and entry and isinstance(entry[0], str):
        return entry[0]
    raise ModelFileError(f"{path} has a malformed vocabulary entry: {entry!r}", hint=_HINT)


def _checked(tokens: dict, special: frozenset[str], path: Path) -> Vocabulary:
    for token, index in tokens.items():
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ModelFileError(f"{path} gives token {token!r} the id {index!r}", hint=_HINT)
    return Vocabulary(tokens, special, path)


def copy_tokenizer(out: Path, folder: Path) -> None:
    """Make `out`'s tokenizer files those of `folder` (replacing any copied before)."""
    for name in TOKENIZER_FILES:
        (Path(out) / name).unlink(missing_ok=True)
        source = Path(folder) / name
        if source.is_file():
            try:
                shutil.copyfile(source, Path(out) / name)
            except OSError as e:
                raise ModelFileError(f"cannot copy {source} into the output: "
                                     f"{e.strerror or e}", hint="check that the file is "
                                     "readable and the output location has free space") from e


def write_union(out: Path, folder: Path, added: list[tuple[str, bool]],
                expected: dict[str, int]) -> None:
    """Write `folder`'s tokenizer into `out` with `added` tokens (string, special) appended
    in order, and check that the result has exactly the `expected` ids."""
    try:
        from tokenizers import AddedToken
        from transformers import AutoTokenizer
    except ImportError:
        raise ModelFileError("writing a union vocabulary needs the transformers library",
                             hint="pip install transformers") from None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for token, special in added:   # one at a time: each takes the next id, in this order
        new = AddedToken(token, special=special, normalized=not special)
        if special:   # registered as an extra special token (transformers 5's name first)
            params = inspect.signature(tokenizer.add_special_tokens).parameters
            kind = "extra" if "replace_extra_special_tokens" in params else "additional"
            tokenizer.add_special_tokens({f"{kind}_special_tokens": [new]},
                                         **{f"replace_{kind}_special_tokens": False})
        else:
            tokenizer.add_tokens([new])
    staging = Path(out) / ".tokenizer"
    tokenizer.save_pretrained(str(staging))
    try:
        for name in TOKENIZER_FILES:
            (Path(out) / name).unlink(missing_ok=True)
            if (staging / name).is_file():
                (staging / name).replace(Path(out) / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = read_vocabulary(out).tokens
    if written != expected:
        wrong = next(t for t in expected if written.get(t) != expected[t])
        raise ModelFileError(
            f"the union tokenizer written gives {wrong!r} the id {written.get(wrong)}, not "
            f"{expected[wrong]} as the embeddings do; the output was discarded",
            hint=f"the tokenizer of {folder} has ids that transformers renumbers when tokens "
            "are added; use `set vocab` with that model instead of \"union\"")


def write_output_tokenizer(out: Path, plan: Any, donor_folder: Path | None) -> None:
    """Make the output's tokenizer files match its embeddings (`plan`: a vocab.VocabPlan).
    The donor's files are already there (write_donor_files); they are replaced when the
    vocabulary is another model's, and extended when it is a union with new tokens."""
    if plan.mode == "copy":
        if plan.folder is not None and plan.folder != donor_folder:
            copy_tokenizer(out, plan.folder)
    elif plan.added:
        write_union(out, plan.folder, plan.added, plan.tokens)


def vocab_size_updates(config: dict | None, rows: int) -> dict:
    """The keys of config.json to replace so that it gives `rows` as the vocabulary size:
    `vocab_size`, or where a multimodal model (Llava, Gemma 3) keeps it, in `text_config`
    (both where a config has both). The result replaces whole top-level keys."""
    config = config if isinstance(config, dict) else {}
    text = config.get("text_config")
    if not isinstance(text, dict) or "vocab_size" not in text:
        return {"vocab_size": rows}
    updates: dict = {"text_config": {**text, "vocab_size": rows}}
    if "vocab_size" in config:
        updates["vocab_size"] = rows
    return updates
