#!/usr/bin/env python3
"""The alignment tax, measured: train an SFT model further on a new skill with AdamW, with
OnDARE and OnTIES (mergelang.optim), and with AdamW followed by an offline TIES merge, and
see what each run gains on the new skill (the "reward") and keeps of the old one (the tax).

A self-contained stand-in for the repository's skill models, so that it runs anywhere in
a few minutes on a CPU: a tiny character-level Llama (transformers.LlamaForCausalLM,
hidden 64, 2 layers) learns, on 4-letter words,

* the base:   copy         "c:abcd=" -> "abcd"  (pretraining: the format, the letters);
* skill A:    a cipher     "a:abcd=" -> each letter through a fixed secret table (the SFT);
* skill B:    reversal     "b:abcd=" -> "dcba"  (the further training: the "alignment").

The SFT model (base, then skill A) is the reference: tau = SFT - base is what SFT learned.
Each run starts from the SFT model and trains on skill B only, with the same batches. The
scores are exact match, and the fraction of answer letters right, on 200 held-out words per
skill, by greedy decoding.

    python examples/online_alignment_tax.py [--steps-b 300] [--quick]

With `--skill-models`, the same comparison on the repository's skill models instead
(examples/models/, made by examples/train_skills.py): the `chat` fine-tune (a letter code,
"enc kavo=" -> "xqpl") is the SFT reference, and it is trained further on the `code` skill
(reversal, "rev kqwz=" -> "zwqk") with that script's batches (10% corpus replay), lr 2e-3.

Prints one table (Markdown). What it shows on this machine is in docs/online.md.
"""

from __future__ import annotations

import argparse
import copy
import random
import string
import time

import torch

import mergelang
from mergelang.optim import OnDAREAdamW, OnTIESAdamW

LETTERS = string.ascii_lowercase
SEED = 0


def words(rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        w = "".join(rng.choice(LETTERS) for _ in range(4))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def skills(rng: random.Random):
    table = dict(zip(LETTERS, rng.sample(LETTERS, len(LETTERS)), strict=True))
    return {"copy": ("c", lambda w: w), "A": ("a", lambda w: "".join(table[c] for c in w)),
            "B": ("b", lambda w: w[::-1])}


def model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    return LlamaForCausalLM(config)


def batch(task, ws: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of "t:word=answer\\n" (bytes), with the loss on the answer only."""
    tag, fn = task
    ids = torch.tensor([list(f"{tag}:{w}={fn(w)}\n".encode()) for w in ws])
    labels = ids.clone()
    labels[:, :7] = -100  # "t:abcd=" is the prompt
    return ids, labels


def train(net, task_mix, train_words, steps, make_opt, seed=1):
    """`steps` steps on batches of 32 from `task_mix` (tasks drawn in turn), same batches for
    every run with the same seed."""
    rng = random.Random(seed)
    opt = make_opt(net)
    net.train()
    for step in range(steps):
        task = task_mix[step % len(task_mix)]
        ids, labels = batch(task, rng.sample(train_words, 32))
        loss = net(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return net


@torch.no_grad()
def score(net, task, test_words) -> tuple[float, float]:
    """(exact match, the fraction of answer letters right) of the greedy 4-letter answer."""
    net.eval()
    tag, fn = task
    ids = torch.tensor([list(f"{tag}:{w}=".encode()) for w in test_words])
    for _ in range(4):
        nxt = net(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    got = ["".join(chr(c) for c in row[-4:].tolist()) for row in ids]
    want = [fn(w) for w in test_words]
    exact = sum(g == w for g, w in zip(got, want, strict=True)) / len(want)
    letters = sum(a == b for g, w in zip(got, want, strict=True)
                  for a, b in zip(g, w, strict=True)) / (4 * len(want))
    return exact, letters


def skill_models(args) -> None:
    """The comparison on examples/models/: chat (letter code) is the SFT, code (reversal)
    the new skill."""
    import sys
    from pathlib import Path

    from transformers import LlamaForCausalLM
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here))
    import train_skills as ts

    def load(name):
        return LlamaForCausalLM.from_pretrained(here / "models" / name, dtype=torch.float32)
    skills = ts.make_skills(random.Random(ts.SEED))
    base, sft = load("base"), load("chat")
    ref, pre = sft.state_dict(), base.state_dict()
    started = time.time()
    rows = [("base", base), ("SFT: chat (letter code), the reference", sft)]
    lr, steps = 2e-3, args.steps_b

    def run(label, make):
        net = copy.deepcopy(sft)
        batches = ts.batches_finetune(random.Random(7), skills["code"], ts.BATCH, ts.REPLAY)
        opt = make(net)
        net.train()
        for _ in range(steps):
            ids, labels = next(batches)
            loss = net(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
        net.eval()
        rows.append((label, net))
        return net

    trained = run("AdamW", lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0))
    for cls, name in ((OnDAREAdamW, "OnDARE"), (OnTIESAdamW, "OnTIES")):
        for keep, alpha in ((0.1, 1e-3), (0.1, 1e-2)):
            run(f"{name} keep={keep} alpha={alpha:g}", lambda m, c=cls, k=keep, a=alpha: c(
                m.named_parameters(), lr=lr, weight_decay=0.0, reference=ref, base=pre,
                keep=k, alpha=a))
    merged = mergelang.evaluate("base + ties(b - base, a - base, density=0.5)", base=pre,
                                a=ref, b=trained.state_dict())
    net = copy.deepcopy(sft)
    net.load_state_dict(merged)
    rows.append(("AdamW, then offline TIES with SFT (density 0.5)", net))
    n = 100
    a_sft = ts.exact_match(sft, skills["chat"].test[:n])
    print(f"\n{steps} steps of `code` (reversal) from the `chat` skill model at lr {lr:g}; "
          f"exact match on {n} held-out prompts each; {time.time() - started:.0f} s in all\n")
    print("| run | reversal (reward) | letter code | tax (letter code lost) |")
    print("|---|---|---|---|")
    for label, model_ in rows:
        a = ts.exact_match(model_, skills["chat"].test[:n])
        b = ts.exact_match(model_, skills["code"].test[:n])
        print(f"| {label} | {b:.2f} | {a:.2f} | {a_sft - a:+.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-base", type=int, default=600)
    parser.add_argument("--steps-a", type=int, default=800)
    parser.add_argument("--steps-b", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--quick", action="store_true", help="a few steps: does it run?")
    parser.add_argument("--skill-models", action="store_true",
                        help="on examples/models/ (chat -> code) instead of the stand-in")
    args = parser.parse_args()
    if args.skill_models:
        torch.set_num_threads(1)
        if args.quick:
            args.steps_b = 5
        return skill_models(args)
    if args.quick:
        args.steps_base, args.steps_a, args.steps_b = 20, 20, 10
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = random.Random(SEED)
    tasks = skills(rng)
    test = words(rng, 200)
    train_words = words(rng, 2000, exclude=set(test))
    started = time.time()
    adamw = lambda lr: (lambda m: torch.optim.AdamW(m.parameters(), lr=lr))  # noqa: E731
    base = train(model(), [tasks["copy"]], train_words, args.steps_base, adamw(args.lr))
    sft = train(copy.deepcopy(base), [tasks["A"], tasks["copy"]], train_words, args.steps_a,
                adamw(args.lr), seed=2)
    ref, pre = sft.state_dict(), base.state_dict()
    rows = [("base", base), ("SFT (skill A): the reference", sft)]

    def run(label, make_opt, steps):
        net = train(copy.deepcopy(sft), [tasks["B"]], train_words, steps, make_opt, seed=3)
        rows.append((label, net))
        return net

    def online(cls, keep, alpha, lr):
        return lambda m: cls(m.named_parameters(), lr=lr, weight_decay=0.0, reference=ref,
                             base=pre, keep=keep, alpha=alpha)

    # two regimes: skill B learned fully (lr 3e-3, 300 steps) and a gentle start of it
    # (lr 3e-4, 100 steps), each with AdamW, OnDARE and OnTIES, and AdamW + offline TIES
    regimes = [(args.lr, args.steps_b, ((0.1, 1e-3), (0.1, 3e-3))),
               (args.lr / 10, args.steps_b // 3, ((0.1, 1e-2), (0.5, 1e-2)))]
    for lr, steps, sweep in regimes:
        rows.append((f"**{steps} steps of skill B at lr {lr:g}**", None))
        trained = run("AdamW", adamw(lr), steps)
        for cls in (OnDAREAdamW, OnTIESAdamW):
            for keep, alpha in sweep:
                name = {"ondare": "OnDARE", "onties": "OnTIES"}[cls.rule]
                run(f"{name} keep={keep} alpha={alpha:g}", online(cls, keep, alpha, lr), steps)
        merged = mergelang.evaluate("base + ties(b - base, a - base, density=0.5)",
                                    base=pre, a=ref, b=trained.state_dict())
        net = copy.deepcopy(sft)
        net.load_state_dict(merged)
        rows.append(("AdamW, then offline TIES with SFT (density 0.5)", net))
    a_sft = score(sft, tasks["A"], test)[1]
    print(f"\nSkill B trained from the SFT model; 200 held-out words; exact match / letters "
          f"right; {time.time() - started:.0f} s in all\n")
    print("| run | skill B (reward) | skill A | tax (A letters lost) |")
    print("|---|---|---|---|")
    for label, net in rows:
        if net is None:
            print(f"| {label} | | | |")
            continue
        (a, a_letters), (b, b_letters) = score(net, tasks["A"], test), score(net, tasks["B"], test)
        print(f"| {label} | {b:.2f} / {b_letters:.2f} | {a:.2f} / {a_letters:.2f} | "
              f"{a_sft - a_letters:+.2f} |")


if __name__ == "__main__":
    main()
