"""What aligning vocabularies costs: `set vocab` on a Qwen-sized vocabulary.

Two models with 152,064-row embeddings and heads (hidden 256, bfloat16, two small
layers) and real WordLevel tokenizers of 151,643 tokens: `same` has base's tokenizer,
`other` numbers the same tokens in another order and adds 64 tokens. Timed, each the
median of --repeats runs in a fresh process (`mergelang check` and `run`):

- check, same vocabularies, no setting (the check every run now makes);
- check, `set vocab = "union"` with the reordered model (tokenizers read, row maps built);
- run, same vocabularies, no setting (the baseline);
- run, `set vocab = "base"` with the reordered model (rows gathered by the maps; the
  base's tokenizer copied);
- run, `set vocab = "union"` with the reordered model (rows gathered by the maps, the
  union tokenizer written through transformers).

    python benchmarks/vocab.py --workdir /tmp/vocab-bench
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENS, ROWS, HIDDEN, ADDED = 151_643, 152_064, 256, 64


def make_model(folder: Path, words: list[str], added: list[str], seed: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>")
    tokenizer.add_tokens(added)
    tokenizer.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    rows = max(ROWS, len(tokenizer))
    state = {"model.embed_tokens.weight": torch.randn(rows, HIDDEN, generator=g),
             "lm_head.weight": torch.randn(rows, HIDDEN, generator=g),
             "model.norm.weight": torch.ones(HIDDEN)}
    for layer in range(2):
        state[f"model.layers.{layer}.mlp.up_proj.weight"] = torch.randn(HIDDEN, HIDDEN,
                                                                        generator=g)
    save_file({k: v.bfloat16() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": rows, "hidden_size": HIDDEN, "num_hidden_layers": 2,
              "torch_dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config))


_CHILD = ("import resource, sys\nfrom mergelang.cli import main\ncode = main(sys.argv[1:])\n"
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
          "sys.exit(code)")


def timed(args: list[str]) -> tuple[float, float]:
    """Wall seconds and the process's own peak RSS in MiB (a fresh process each time)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    return wall, int(done.stderr.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = args.workdir
    words = ["<unk>"] + [f"w{i}" for i in range(TOKENS - 1)]
    if not (work / "other" / "model.safetensors").is_file():
        make_model(work / "base", words, [], 0)
        make_model(work / "same", words, [], 1)
        make_model(work / "other", words[:1] + words[1:][::-1], [f"<new{i}>" for i in
                                                                range(ADDED)], 2)
    scripts = {
        "same": "base = model(\"base\")\nb = model(\"same\")\noutput linear(base, b)\n",
        "union": "set vocab = \"union\"\nbase = model(\"base\")\nb = model(\"other\")\n"
                 "output linear(base, b)\n",
        "reordered": "set vocab = \"base\"\nbase = model(\"base\")\nb = model(\"other\")\n"
                     "output linear(base, b)\n",
    }
    for name, text in scripts.items():
        (work / f"{name}.merge").write_text(text)
    rows = []
    for what, script, command in [
        ("check, same vocabularies", "same", "check"),
        ("check, set vocab = \"union\"", "union", "check"),
        ("run, same vocabularies", "same", "run"),
        ("run, set vocab = \"base\"", "reordered", "run"),
        ("run, set vocab = \"union\"", "union", "run"),
    ]:
        cmd = [command, str(work / f"{script}.merge")]
        if command == "run":
            cmd += ["-o", str(work / f"out_{script}"), "--force", "--quiet"]
        times = [timed(cmd) for _ in range(args.repeats)]
        rows.append((what, statistics.median(t for t, _ in times), max(p for _, p in times)))
    print(f"| {'what':32} | median s | peak RSS MiB |")
    print(f"|{'-' * 34}|----------|--------------|")
    for what, wall, peak in rows:
        print(f"| {what:32} | {wall:8.2f} | {peak:12.0f} |")


if __name__ == "__main__":
    main()
