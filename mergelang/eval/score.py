"""Scoring a causal LM: exact match of greedy answers, the answers' log-likelihood, and
perplexity over a text file.

Why it is written here rather than with `model.generate`: the figures must not depend on
how prompts are batched. Prompts of different lengths are padded on the LEFT so that
every row's next token is the last column; each row's position ids count its own
tokens from 0 (`cumsum(mask) - 1`), and the attention mask hides the padding, so a
prompt gets the same logits alone or in a batch. The loop keeps the key-value cache and
stops as soon as every row has ended (newline or EOS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..diagnostics import Diagnostic, MergeError
from .models import LoadedModel, load_model
from .tasks import by_task, check_records, load_tasks

ANSWER_MARGIN = 4  # new tokens allowed past the longest answer, so a long wrong answer shows


def score(model: Any, tasks: Iterable[str | Path] | Iterable[Mapping], *, batch_size: int = 16,
          max_new_tokens: int | None = None, device: str | torch.device = "cpu",
          tokenizer: Any = None, like: str | Path | None = None,
          dtype: str | torch.dtype = "float32",
          progress: Callable[[int], None] | None = None) -> list[dict]:
    """Score `model` on `tasks`: one `{"task", "n", "exact_match", "loglik"}` per task.

    model: a model folder, a state dict (with `like=` naming the folder whose config.json
    and tokenizer it fits) or a `transformers` causal LM (with `tokenizer=` or `like=`).
    tasks: task-file paths, or records `{"task", "prompt", "answer"}`.
    exact_match: share of prompts whose greedy continuation, cut at the first newline or
    EOS and stripped, equals the stripped answer. Generation stops after
    `max_new_tokens` (default: the task's longest answer plus 4 tokens).
    loglik: mean over prompts of the answer's mean per-token log-likelihood.
    progress: called with the number of prompts just finished.
    """
    records = _records(tasks)
    loaded = load_model(model, tokenizer=tokenizer, like=like, device=device, dtype=dtype)
    return score_loaded(loaded, records, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, progress=progress)


def score_loaded(loaded: LoadedModel, records: list[dict], *, batch_size: int = 16,
                 max_new_tokens: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[dict]:
    """`score` for a model already loaded (the command loads each model once)."""
    if batch_size < 1:
        raise MergeError(Diagnostic(f"batch size must be at least 1, not {batch_size}"))
    with few_threads(loaded):
        return _score(loaded, records, batch_size, max_new_tokens, progress)


def _score(loaded: LoadedModel, records: list[dict], batch_size: int,
           max_new_tokens: int | None, progress: Callable[[int], None] | None) -> list[dict]:
    results = []
    for task, recs in by_task(records).items():
        items = [_encode(loaded.tokenizer, r) for r in recs]
        cap = max_new_tokens or max(len(a) for _, a, _ in items) + ANSWER_MARGIN
        order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # less padding
        right, logliks = 0, []
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start:start + batch_size]]
            texts = greedy(loaded, [p for p, _, _ in batch], cap)
            answers = [answer.strip() for _, _, answer in batch]
            right += sum(_cut(t) == a for t, a in zip(texts, answers, strict=True))
            logliks += answer_logliks(loaded, [(p, a) for p, a, _ in batch])
            if progress:
                progress(len(batch))
        results.append({"task": task, "n": len(items), "exact_match": right / len(items),
                        "loglik": sum(logliks) / len(logliks)})
    return results


SMALL_MODEL = 20_000_000  # parameters; below this a CPU forward is too small to share out


@contextmanager
def few_threads(loaded: LoadedModel) -> Iterator[None]:
    """Score a small model on CPU with one thread, and restore the setting afterwards.

    Why: splitting a forward pass of a few-million-parameter model over threads saves
    nothing, and when the cores are shared the threads wait on each other at every
    operation: on 2 busy cores, a batch of 40 greedy answers from the example models took
    1.5-1.9 s with 2 threads and 0.1 s with one (a one-off timing, not a benchmark).
    """
    small = sum(p.numel() for p in loaded.model.parameters()) < SMALL_MODEL
    if loaded.device.type != "cpu" or not small:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _records(tasks: Iterable[str | Path] | Iterable[Mapping]) -> list[dict]:
    tasks = list(tasks)
    if tasks and all(isinstance(t, Mapping) for t in tasks):
        return check_records(tasks)
    if all(isinstance(t, (str, Path)) for t in tasks):
        if not tasks:
            raise MergeError(Diagnostic("no task files given", hint="--tasks FILE.jsonl"))
        return load_tasks(tasks)
    raise MergeError(Diagnostic("tasks must be task-file paths or task records, not a mix"))


def _encode(tok: Any, rec: Mapping) -> tuple[list[int], list[int], str]:
    """(prompt ids, answer ids, answer text). The answer's ids are the tail of the
    tokenized prompt+answer, so a tokenizer that merges across the seam is honoured."""
    prompt = tok(rec["prompt"])["input_ids"]
    whole = tok(rec["prompt"] + rec["answer"])["input_ids"]
    if whole[:len(prompt)] == prompt and len(whole) > len(prompt):
        answer = whole[len(prompt):]
    else:
        answer = tok(rec["answer"], add_special_tokens=False)["input_ids"]
    if not prompt:
        raise MergeError(Diagnostic(f'task "{rec["task"]}": a prompt encodes to no tokens',
                                    hint="give every record a non-empty prompt"))
    return prompt, answer, rec["answer"]


def _cut(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _call(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
          cache: Any = None) -> Any:
    kwargs = {loaded.cache_arg: cache} if cache is not None else {}
    return loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        **kwargs)


@torch.no_grad()
def greedy(loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded, each cut after its first
    newline or EOS (the cut text keeps no EOS)."""
    dev, pad, eos = loaded.device, loaded.pad_id, loaded.eos_ids
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = _call(loaded, ids, mask, pos)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    last = pos[:, -1:]
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos:
                done[i] = True
                continue
            new[i].append(t)
            done[i] = "\n" in loaded.tokenizer.decode([t])
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        last = last + 1
        cache = getattr(out, loaded.cache_arg, None)
        out = _call(loaded, nxt[:, None], mask, last, cache)
    return [loaded.tokenizer.decode(t, skip_special_tokens=True) for t in new]


@torch.no_grad()
def answer_logliks(loaded: LoadedModel, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    """Mean per-token log-likelihood of each answer given its prompt (right padding: every
    row's positions start at 0 and padding only follows the tokens scored)."""
    seqs = [p + a for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), loaded.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    ids, mask = ids.to(loaded.device), mask.to(loaded.device)
    logits = loaded.model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    out = []
    for i, (p, a) in enumerate(pairs):
        if not a:
            out.append(0.0)
            continue
        out.append(logp[i, len(p) - 1:len(p) - 1 + len(a)].mean().item())
    return out


def perplexity(model: Any, path: str | Path, *, window: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu", tokenizer: Any = None,
               like: str | Path | None = None, dtype: str | torch.dtype = "float32",
               progress: Callable[[int], None] | None = None) -> dict:
    """Perplexity of `model` over a text file: `{"task": file name, "n": tokens scored,
    "loglik": mean per-token log-likelihood, "perplexity": exp(-loglik)}`.

    The file is read in blocks and cut into windows of `window` tokens (default: the
    model's context, at most 1024), each scored on its own after a BOS token where the
    tokenizer has one: memory stays bounded whatever the file's size.
    """
    loaded = load_model(model, tokenizer=tokenizer, like=like, device=device, dtype=dtype)
    return perplexity_loaded(loaded, path, window=window, batch_size=batch_size,
                             progress=progress)


def perplexity_loaded(loaded: LoadedModel, path: str | Path, *, window: int | None = None,
                      batch_size: int = 8,
                      progress: Callable[[int], None] | None = None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise MergeError(Diagnostic(f"text file not found: {path}"))
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 1024
    window = window or min(int(context), 1024)
    bos = loaded.tokenizer.bos_token_id
    body = window - (bos is not None)
    if body < 1:
        raise MergeError(Diagnostic(f"window of {window} tokens is too short"))
    total, count, batch = 0.0, 0, []
    with few_threads(loaded):
        for chunk in _windows(loaded.tokenizer, path, body):
            batch.append(([bos] if bos is not None else []) + chunk)
            if len(batch) == batch_size:
                total, count = _add(loaded, batch, total, count, progress)
                batch = []
        if batch:
            total, count = _add(loaded, batch, total, count, progress)
    if count == 0:
        raise MergeError(Diagnostic(f"text file {path} has too little text to score",
                                    hint="it needs at least two tokens"))
    mean = total / count
    return {"task": path.name, "n": count, "loglik": mean, "perplexity": math.exp(-mean)}


def _add(loaded: LoadedModel, batch: list[list[int]], total: float, count: int,
         progress: Callable[[int], None] | None) -> tuple[float, int]:
    """Sum of the log-likelihoods of every token after the first, in each window."""
    pairs = [(w[:1], w[1:]) for w in batch if len(w) > 1]
    if pairs:
        means = answer_logliks(loaded, pairs)
        total += sum(m * len(a) for m, (_, a) in zip(means, pairs, strict=True))
        count += sum(len(a) for _, a in pairs)
    if progress:
        progress(sum(len(w) for w in batch))
    return total, count


def _windows(tok: Any, path: Path, size: int, block: int = 1 << 16) -> Iterator[list[int]]:
    """Token windows of `size`, tokenizing the file a block of whole lines at a time."""
    buffer: list[int] = []
    with path.open(encoding="utf-8") as f:
        while True:
            lines = f.readlines(block)
            if lines:
                buffer += tok("".join(lines), add_special_tokens=False)["input_ids"]
            while len(buffer) >= size or (not lines and buffer):
                yield buffer[:size]
                buffer = buffer[size:]
            if not lines:
                return
