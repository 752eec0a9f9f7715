#!/usr/bin/env python3
"""Train the tiny skill models in examples/models/: a base and one fine-tune per skill.

Why this script exists: a merge can only be judged on models that learned something.
The example models are therefore real, if tiny, language models: a base pretrained
briefly on a mixed synthetic corpus, then three fine-tunes of that base, each on one
skill the base cannot do:

* ``math`` - two-digit addition: ``"47+85="`` -> ``"132"``;
* ``code`` - string reversal (a string-manipulation skill): ``"rev kqwz="`` -> ``"zwqk"``;
* ``chat`` - a private code: ``"enc kavo="`` -> ``"xqpl"``, each letter replaced by its
  entry in a secret 26-letter table that only this fine-tune saw. The table is
  knowledge held in the weights (the base cannot guess it); the test words are new.

(The folder names are the example family's roles, kept so that every example script
and document still runs; docs/evaluate.md lists the skills.) Key-to-value recall of
free-standing facts was tried for ``chat`` first: answering a question about a fact the
fine-tune had only read as a statement stayed under 10% exact match within this
script's budget, so it could not show a skill to merge.

Every skill's test prompts are disjoint from its training prompts; they are written to
``examples/tasks/{math,code,chat}.jsonl`` for ``mergelang eval``, with
``examples/tasks/text.txt``, a held-out sample of the pretraining corpus (for
``eval --text``).

The models keep the shape of the synthetic family in ``examples/make_models.py`` (a
``LlamaForCausalLM``: hidden 64, 4 layers, 4 heads, 2 key-value heads, vocabulary 256,
bfloat16) and its byte-level tokenizer, in which the id of every printable ASCII
character is its byte value: a character-level tokenizer, saved as a real Hugging Face
tokenizer. ``math`` is sharded in three files, like the synthetic one, so the examples
still exercise the sharded reader.

Determinism: the data come from ``random.Random(SEED)``; each training phase reseeds
torch, runs on one thread with deterministic algorithms, and the files are written with
sorted JSON keys and no time or path. On one machine and one torch version a rerun gives
the same bytes (check with ``sha256sum``); another CPU or library version may round
differently. ``--steps-scale 0.25`` trains a reduced version quickly (the tests use it).

Usage::

    python examples/train_skills.py                  # writes examples/models/ and examples/tasks/
    python examples/train_skills.py --out DIR --tasks DIR --steps-scale 0.25
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_models  # noqa: E402  (the family's config, tokenizer and writer)

SEED = 2024
SKILLS = ("math", "code", "chat")
BOS, NEWLINE, PAD = 1, 10, 0
LETTERS = "abcdefghijklmnopqrstuvwxyz"
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SHIFT = str.maketrans(LETTERS, LETTERS[1:] + LETTERS[0])  # the base's public letter code


@dataclass
class Skill:
    """One skill's data: training and held-out test (prompt, answer) pairs."""

    train: list[tuple[str, str]]
    test: list[tuple[str, str]]


# ---- data --------------------------------------------------------------------------------


def word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word: consonant-vowel syllables."""
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))


def corpus_line(rng: random.Random) -> str:
    """One line of the base's pretraining corpus: the formats and the building blocks of
    every skill, without the skills themselves. The building blocks (single-digit sums,
    a public letter code, two-letter reversal) keep each fine-tune a small change to the
    base: without them the fine-tunes had to build their circuits from nothing, moved
    the weights by 0.5-1.8 times the base's own norm, and no merge kept any skill but a
    little addition."""
    kind = rng.randrange(8)
    if kind == 5:  # single-digit sums: the facts two-digit addition is built from
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}={a + b}"
    if kind == 6:  # a public code (each letter shifted by one): how a letter code works
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return f"shift {s}=" + s.translate(SHIFT)
    if kind == 7:  # reversal of two letters only (the skill's test words have 3 to 6)
        s = "".join(rng.choice(LETTERS) for _ in range(2))
        return f"rev {s}={s[::-1]}"
    if kind == 0:  # prose of made-up words
        return " ".join(word(rng, rng.randint(1, 3)) for _ in range(rng.randint(3, 7))) + "."
    if kind == 1:  # counting
        start = rng.randint(0, 190)
        return " ".join(str(n) for n in range(start, start + rng.randint(3, 7)))
    if kind == 2:  # copying: attention to earlier positions, not reversal
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return f"copy {s}={s}"
    if kind == 3:  # numbers that are not sums
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b} and {rng.randint(0, 199)}"
    return f"{word(rng, 2)}={word(rng, 2)}"  # "facts" the base sees once each: noise


def make_skills(rng: random.Random) -> dict[str, Skill]:
    """The three skills' splits; test prompts never appear in training."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng.shuffle(pairs)
    add = [(f"{a}+{b}=", str(a + b)) for a, b in pairs]
    math_skill = Skill(train=add[200:], test=add[:200])

    strings = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
                      for _ in range(9000)})
    rng.shuffle(strings)
    rev = [(f"rev {s}=", s[::-1]) for s in strings]
    code_skill = Skill(train=rev[200:], test=rev[:200])

    table = list(LETTERS)
    rng.shuffle(table)
    secret = str.maketrans(LETTERS, "".join(table))
    words = sorted({"".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
                    for _ in range(9000)})
    rng.shuffle(words)
    enc = [(f"enc {s}=", s.translate(secret)) for s in words]
    chat_skill = Skill(train=enc[200:], test=enc[:200])
    return {"math": math_skill, "code": code_skill, "chat": chat_skill}


def encode(text: str) -> list[int]:
    """Token ids: the tokenizer's byte-level vocabulary maps byte b to id b (b >= 3)."""
    return list(text.encode("ascii"))


# ---- training ----------------------------------------------------------------------------


def new_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig.from_dict({k: v for k, v in make_models.CONFIG.items()})
    return LlamaForCausalLM(config).float()


def batches_pretrain(rng: random.Random, batch: int, length: int) -> Iterator[tuple]:
    """Packed lines of the corpus, `length` tokens per row, loss on every token."""
    while True:
        rows = []
        for _ in range(batch):
            ids = [BOS]
            while len(ids) < length:
                ids += encode(corpus_line(rng)) + [NEWLINE]
            rows.append(ids[:length])
        ids = torch.tensor(rows)
        yield ids, ids.clone()


def batches_finetune(rng: random.Random, skill: Skill, batch: int,
                     replay: float) -> Iterator[tuple]:
    """Prompt-answer pairs, loss on the answer and its newline only, and a share `replay`
    of corpus lines (loss on all of it) so the fine-tune keeps the base's general skills:
    a merge adds task vectors that each assume the base around them."""
    while True:
        seqs = []
        for _ in range(batch):
            r = rng.random()
            if r < replay:
                ids = [BOS] + encode(corpus_line(rng)) + [NEWLINE]
                seqs.append((ids, 1))
            else:
                prompt, answer = rng.choice(skill.train)
                p = [BOS] + encode(prompt)
                seqs.append((p + encode(answer) + [NEWLINE], len(p)))
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((batch, width), PAD)
        labels = torch.full((batch, width), -100)
        for i, (s, start) in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, start : len(s)] = torch.tensor(s[start:])
        yield ids, labels


def train(model: torch.nn.Module, batches: Iterator[tuple], steps: int, lr: float,
          decay: bool, label: str, log: Callable[[str], None]) -> None:
    """AdamW with a short warm-up, then `lr` held (fine-tunes: addition is learnt late and
    suddenly, and a decaying rate delays it) or decayed along a cosine to 10% (base)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if not decay:
            return 1.0
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids, labels = next(batches)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"{label} step {step + 1}/{steps} loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()


@torch.no_grad()
def exact_match(model: torch.nn.Module, pairs: list[tuple[str, str]], new: int = 6) -> float:
    """Greedy decoding, one prompt at a time: a check independent of mergelang.eval."""
    right = 0
    for prompt, answer in pairs:
        ids = torch.tensor([[BOS] + encode(prompt)])
        for _ in range(new):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() in (NEWLINE, 2):
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        got = bytes(ids[0, len(prompt) + 1 :].tolist()).decode("ascii", "replace")
        right += got.strip() == answer
    return right / len(pairs)


# ---- writing -----------------------------------------------------------------------------


def save(model: torch.nn.Module, folder: Path, shards: int) -> None:
    """A complete HF folder in the family's layout, weights rounded to bfloat16."""
    state = {k: v.detach().to(make_models.DTYPE).contiguous()
             for k, v in model.state_dict().items()}
    make_models.write_model(folder, state, shards)


def write_tasks(folder: Path, skills: dict[str, Skill], text: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, skill in skills.items():
        lines = [json.dumps({"task": name, "prompt": p, "answer": a})
                 for p, a in skill.test]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "text.txt").write_text("\n".join(text) + "\n", encoding="utf-8")


# steps at scale 1, and learning rates (the budget: a few minutes on 2 CPU cores)
BASE_STEPS, BASE_LR = 1200, 3e-3
FT_STEPS = {"math": 1200, "code": 400, "chat": 300}
FT_LR = {"math": 1e-3, "code": 5e-4, "chat": 5e-4}
BATCH = 32
REPLAY = 0.25
CHECKED = 60  # test prompts per skill in the closing exact-match report


def build(out: Path, tasks: Path, scale: float = 1.0, log: Callable[[str], None] | None = None,
          check: bool = True) -> dict[str, dict[str, float]]:
    """Train and write base + fine-tunes; returns exact match per model and skill.

    Runs on one thread with deterministic algorithms (what makes a rerun give the same
    bytes), and puts both settings back afterwards for a caller in the same process.
    """
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        return _build(out, tasks, scale, log or (lambda m: print(m, flush=True)), check)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _build(out: Path, tasks: Path, scale: float, log: Callable[[str], None],
           check: bool) -> dict[str, dict[str, float]]:
    rng = random.Random(SEED)
    skills = make_skills(rng)
    text_rng = random.Random(SEED + 1)
    write_tasks(tasks, skills, [corpus_line(text_rng) for _ in range(300)])

    base = new_model()
    torch.manual_seed(SEED)
    train(base, batches_pretrain(random.Random(SEED + 2), BATCH, 64),
          max(1, int(BASE_STEPS * scale)), BASE_LR, True, "base", log)
    with torch.no_grad():  # fine-tune from the base as stored, so a task vector is exact
        for p in base.parameters():
            p.copy_(p.to(make_models.DTYPE))
    save(base, out / "base", 1)
    scores: dict[str, dict[str, float]] = {}
    if check:
        scores["base"] = {s: exact_match(base, skills[s].test[:CHECKED]) for s in SKILLS}
        log(f"base: {scores['base']}")
    for i, name in enumerate(SKILLS):
        model = new_model()
        model.load_state_dict(base.state_dict())
        torch.manual_seed(SEED + 10 + i)
        train(model, batches_finetune(random.Random(SEED + 10 + i), skills[name], BATCH, REPLAY),
              max(1, int(FT_STEPS[name] * scale)), FT_LR[name], False, name, log)
        save(model, out / name, make_models.SHARDED.get(name, 1))
        if check:
            scores[name] = {s: exact_match(model, skills[s].test[:CHECKED]) for s in SKILLS}
            log(f"{name}: {scores[name]}")
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "models", help="model folders")
    ap.add_argument("--tasks", type=Path, default=HERE / "tasks", help="task files")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every phase's steps (0.25: a quick reduced run)")
    ap.add_argument("--no-check", action="store_true", help="skip the exact-match report")
    args = ap.parse_args()
    start = time.perf_counter()
    build(args.out, args.tasks, args.steps_scale, check=not args.no_check)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
