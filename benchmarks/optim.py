"""Online merging optimizers: per-step time and memory against torch.optim.AdamW and the
reference implementation (QwenLM online_merging_optimizers' ODAdamW and OTAdamW), side by
side in one run, on a Llama-shaped set of parameters (about 106M at the defaults).

    python benchmarks/optim.py [--reference DIR] [--steps 2] [--rounds 2] [--threads 1]
                               [--layers 8] [--hidden 768] [--only adamw,ondare,...] [--check]

--reference DIR: a folder holding the reference package (`DIR/online_merging/optimizers.py`;
it is not a dependency: copy it into a scratch folder); without it those rows are skipped.

Each optimizer runs in a child process of its own: the parameters (the "SFT" model, float32)
and random gradients are made, the optimizer is built (with tau = SFT - base from state dicts
that are then freed), one warm-up step allocates its state, and `--steps` steps are timed.
The optimizers take turns, `--rounds` times (a, b, c, a, b, c), so that a change in the
machine's load falls on all of them; the table shows the medians over every timed step, of
the wall time and of the process's CPU time (on a shared machine the CPU time is the steadier
figure; the ratios use it). One thread by default, for the same reason. Only
optimizer.step() is timed; the gradients stay the same.
Memory: the resident size sampled every 2 ms from before the optimizer exists to the end
("peak extra", minus the parameters and gradients), and the optimizer's own state counted
tensor by tensor ("state"). Ratios are to torch.optim.AdamW and to the reference class of
the same rule. `--check` instead compares the numbers on a small model: OnTIES
(variant="reference") against OTAdamW, and OnDARE at keep=1 against ODAdamW, step by step.

Settings: lr 1e-5, keep (reserve_p) 0.01, alpha 1e-7, no weight decay. `--keep-freed` sets
glibc's mallopt in every child so that freed memory is reused rather than returned and
faulted in again at the next step (what `mergelang run` does; it matters for the rows that
allocate large temporaries at each step).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

CONFIGS = ["adamw", "ref-ondare", "ondare", "wrap-ondare", "ref-onties", "onties",
           "wrap-onties"]
# also: "wrap-update", OnlineMerging(AdamW, "update"): what wrapping costs with a rule that
# does nothing (the parameters kept before the step, the update recovered, added back); and
# NAME-fused for adamw and the wrap-* rows: torch.optim.AdamW(fused=True) (its one fused CPU
# kernel, other roundings than the loop's) instead of the default
KEEP, ALPHA, LR = 0.01, 1e-7, 1e-5


def shapes(layers: int, hidden: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        at = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            out[at + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        for n in ("gate", "up"):
            out[at + f"mlp.{n}_proj.weight"] = (inter, hidden)
        out[at + "mlp.down_proj.weight"] = (hidden, inter)
        out[at + "input_layernorm.weight"] = (hidden,)
        out[at + "post_attention_layernorm.weight"] = (hidden,)
    out["model.norm.weight"] = (hidden,)
    out["lm_head.weight"] = (vocab, hidden)
    return out


class Named:
    """Stands in for a module: named_parameters() over a dict (what the reference reads)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


def models(spec: dict[str, tuple[int, ...]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in spec.items()}
    sft = {n: b + torch.randn(b.shape, generator=g) * 1e-3 for n, b in base.items()}
    params = {n: torch.nn.Parameter(t.clone()) for n, t in sft.items()}
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return base, sft, params


def build(name: str, params: dict, base: dict, sft: dict, reference_dir: str | None):
    from mergelang.optim import OnDAREAdamW, OnlineMerging, OnTIESAdamW
    named = list(params.items())
    fused = name.endswith("-fused")
    if name.startswith("adamw"):
        return torch.optim.AdamW([p for _, p in named], lr=LR, weight_decay=0.0, fused=fused)
    if name.startswith("ref-"):
        sys.path.insert(0, reference_dir)
        from online_merging.optimizers import ODAdamW, OTAdamW
        cls = ODAdamW if name == "ref-ondare" else OTAdamW
        opt = cls([p for _, p in named], lr=LR, eps=1e-8, reserve_p=KEEP, alpha=ALPHA,
                  use_merge=True, param_name_map={(0, i): n for i, (n, _) in enumerate(named)})
        opt.init_ref_param_diff(Named(sft), Named(base))
        return opt
    if name in ("ondare", "onties"):
        cls = OnDAREAdamW if name == "ondare" else OnTIESAdamW
        return cls(named, lr=LR, weight_decay=0.0, reference=sft, base=base, keep=KEEP,
                   alpha=ALPHA)
    rule = name.split("-")[1]
    inner = torch.optim.AdamW(named, lr=LR, weight_decay=0.0, fused=fused)
    if rule == "update":
        return OnlineMerging(inner, "update")
    return OnlineMerging(inner,
                         f"{rule}(update, ref, keep={KEEP}, alpha={ALPHA})", reference=sft,
                         base=base)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = rss(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss())
            time.sleep(0.002)


def state_bytes(opt) -> int:
    seen = opt.optimizer.state if hasattr(opt, "optimizer") else {}
    total = 0
    for states in (opt.state, seen):
        for state in states.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor))
    return total


def keep_freed() -> None:
    """glibc: keep freed memory for reuse instead of returning it (and faulting it in again
    at the next step), as `mergelang run` does; a setting of the process, for every row."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 30)    # M_TRIM_THRESHOLD


def child(args) -> None:
    if args.keep_freed:
        keep_freed()
    torch.set_num_threads(args.threads)
    spec = shapes(args.layers, args.hidden, args.inter, args.vocab)
    base, sft, params = models(spec)
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    before = rss() - 2 * model_bytes  # what the process held besides the base and SFT dicts
    opt = build(args.child, params, base, sft, args.reference)
    del base, sft
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    watch = PeakRSS()
    floor = rss()
    watch.start()
    opt.step()  # allocates the moments
    times, cpu = [], []
    for _ in range(args.steps):
        start, used = time.perf_counter(), time.process_time()
        opt.step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    watch.running = False
    watch.join()
    print(json.dumps({"name": args.child, "times": times, "cpu": cpu, "params": sum(
        p.numel() for p in params.values()), "model_bytes": model_bytes,
        "peak_extra": watch.peak - floor, "state": state_bytes(opt),
        "setup_rss": floor - before}))


def check(args) -> None:
    """Numbers, not speed: each reference-variant step against the reference class."""
    sys.path.insert(0, args.reference)
    from online_merging.optimizers import ODAdamW, OTAdamW

    from mergelang.optim import OnDAREAdamW, OnTIESAdamW
    spec = shapes(2, 64, 176, 500)
    pairs = [("OnTIES reference vs OTAdamW", OTAdamW, OnTIESAdamW, KEEP * 10, {}),
             ("OnDARE reference vs ODAdamW, keep=1", ODAdamW, OnDAREAdamW, 1.0,
              {"clip_val": 1.0})]
    for label, ref_cls, cls, keep, extra in pairs:
        base, sft, mine = models(spec)
        theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in mine.items()}
        names = list(mine)
        ref = ref_cls(list(theirs.values()), lr=1e-3, reserve_p=keep, alpha=0.01,
                      use_merge=True, weight_decay=0.01,
                      param_name_map={(0, i): n for i, n in enumerate(names)}, **extra)
        ref.init_ref_param_diff(Named(sft), Named(base))
        opt = cls(list(mine.items()), lr=1e-3, reference=sft, base=base, keep=keep,
                  alpha=0.01, weight_decay=0.01, variant="reference")
        g = torch.Generator().manual_seed(5)
        worst = 0.0
        for _ in range(4):
            for n in names:  # small gradients: |update| spreads below lr, few exact ties
                grad = torch.randn(mine[n].shape, generator=g) * 1e-5
                mine[n].grad, theirs[n].grad = grad, grad.clone()
            ref.step()
            opt.step()
            worst = max(worst, max(float((mine[n] - theirs[n]).detach().abs().max())
                                   for n in names))
        print(f"{label}: 4 steps, largest difference {worst:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(CONFIGS))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--keep-freed", action="store_true",
                        help="glibc mallopt in each child: freed memory is reused")
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.check:
        return check(args)
    rows: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in args.only.split(","):
            if name.startswith("ref-") and not args.reference:
                continue
            cmd = [sys.executable, __file__, "--child", name] + [
                f"--{k}={v}" for k, v in vars(args).items()
                if k in ("reference", "steps", "layers", "hidden", "inter", "vocab", "threads")
                and v is not None] + (["--keep-freed"] if args.keep_freed else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: failed\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if name in rows:
                for key in ("times", "cpu"):
                    rows[name][key] += row[key]
                rows[name]["peak_extra"] = max(rows[name]["peak_extra"], row["peak_extra"])
            else:
                rows[name] = row
            print(f"{name}: {statistics.median(row['times']):.2f} s/step wall, "
                  f"{statistics.median(row['cpu']):.2f} s CPU", flush=True)
    report(rows, args)


def report(rows: dict, args) -> None:
    if not rows:
        return
    any_row = next(iter(rows.values()))
    size = any_row["model_bytes"]
    print(f"\n{any_row['params'] / 1e6:.0f}M parameters (float32, {size / 2**20:.0f} MiB), "
          f"{args.threads} thread(s); median over {args.rounds} rounds x {args.steps} steps; "
          "ratios of CPU time; memory in % of the model's size")
    adamw = rows.get("adamw")
    print("| optimizer | wall s/step | CPU s/step | x AdamW | x reference | x built-in | "
          "state | extra state over AdamW | peak extra RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        cpu = statistics.median(row["cpu"])
        rule = name.split("-")[1] if name.startswith(("wrap", "ref")) else name

        def ratio(other: str, name: str = name, cpu: float = cpu) -> str:
            if other not in rows or other == name:
                return ""
            return f"{cpu / statistics.median(rows[other]['cpu']):.2f}"
        extra = row["state"] - adamw["state"] if adamw else 0
        print(f"| {name} | {statistics.median(row['times']):.2f} | {cpu:.2f} | "
              f"{ratio('adamw')} | {ratio('ref-' + rule)} | "
              f"{ratio(rule) if name.startswith('wrap') else ''} | "
              f"{100 * row['state'] / size:.0f}% | {100 * extra / size:.1f}% | "
              f"{100 * row['peak_extra'] / size:.0f}% |")


if __name__ == "__main__":
    main()
