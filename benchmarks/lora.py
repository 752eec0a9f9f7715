"""`base + lora(adapter)` against a plain two-model merge, on the synthetic family.

    python benchmarks/lora.py --workdir DIR [--rank 16] [--repeats 3]
                              [--hidden 1024 --layers 16 --inter 2816 --vocab 32000 ...]

Makes (or reuses) the family under DIR (benchmarks/families.py; the defaults give about
271M parameters in bfloat16, one fine-tune is enough here) and writes a LoRA adapter for
its base as PEFT lays one out: rank `--rank`, alpha twice the rank, on q, k, v, o, gate,
up and down of every layer, A and B in bfloat16 with random values. Then, alternating,
`--repeats` times each:

- lora: `output base + lora("adapter")`;
- two models: `output base + (model("ft0") - base)`, the same kind of merge from a full
  fine-tune (two models read per tensor);
- copy: `output model("base")`, for scale.

Each is `mergelang run` in a process of its own: wall time, and the process's own peak
RSS and CPU time (benchmarks/measure.py). One merged tensor is checked against
base + alpha / r * B @ A computed here. Prints medians and writes DIR/lora/results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from compress import MERGELANG, measured
from families import add_family_args, ensure_family, n_params, spec_from_args
from safetensors.torch import load_file, save_file

MODULES = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(base: Path, out: Path, rank: int) -> None:
    """A PEFT-layout LoRA adapter for the model at `base` (shapes from its headers)."""
    from mergelang.io.read import open_model

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    with open_model(base) as model:
        for name, info in model.tensors.items():
            parts = name.split(".")
            if len(parts) < 5 or parts[-2] not in MODULES.get(parts[-3], ()):
                continue
            rows, cols = info.shape
            prefix = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) / cols
                                                  ** 0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(rows, rank, generator=g)
                                                  * 0.01).to(torch.bfloat16)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "use_rslora": False,
              "fan_in_fan_out": False, "modules_to_save": None, "bias": "none",
              "target_modules": [m for ms in MODULES.values() for m in ms],
              "base_model_name_or_path": str(base)}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def check_one(out: Path, base: Path, adapter: Path, rank: int) -> float:
    """max |merged - (base + 2 * B @ A)| on layer 0's q_proj, in units of bf16 rounding."""
    from mergelang.io.read import open_model

    name = "model.layers.0.self_attn.q_proj.weight"
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = lora[f"{prefix}.lora_B.weight"].float() @ lora[f"{prefix}.lora_A.weight"].float()
    with open_model(base) as b, open_model(out) as o:
        want = (b.load(name, dtype=torch.float32) + 2.0 * delta).to(torch.bfloat16)
        got = o.load(name)
    return float((got.float() - want.float()).abs().max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    add_family_args(p)
    p.set_defaults(n_ft=1)
    a = p.parse_args(argv)
    spec = spec_from_args(a)
    name = (f"family-h{spec.hidden}-l{spec.layers}-i{spec.inter}-v{spec.vocab}"
            f"-ft{spec.n_ft}-{spec.dtype}")
    models = ensure_family(spec, a.workdir / name)
    base, ft = models["base"], models["ft0"]
    work = a.workdir / "lora"
    adapter = work / f"adapter-r{a.rank}"
    write_adapter(base, adapter, a.rank)
    scripts = {
        "lora": f'base = model("{base}")\noutput base + lora("{adapter}")\n',
        "two models": f'base = model("{base}")\noutput base + (model("{ft}") - base)\n',
        "copy": f'output model("{base}")\n',
    }
    runs: dict[str, list[dict]] = {k: [] for k in scripts}
    out = work / "out"
    for _ in range(a.repeats):
        for label, text in scripts.items():
            script = work / f"{label.replace(' ', '_')}.merge"
            script.write_text(text)
            subprocess.call(["rm", "-rf", str(out)])
            runs[label].append(measured([*MERGELANG, "run", str(script), "-o", str(out),
                                         "--quiet"], work))
            if label == "lora":
                error = check_one(out, base, adapter, a.rank)
                assert error <= 2 ** -9, error  # a bf16 rounding step of values below 0.25
            print(label, json.dumps(runs[label][-1]), flush=True)
    subprocess.call(["rm", "-rf", str(out)])
    medians = {k: {f: statistics.median(r[f] for r in v) for f in v[0]}
               for k, v in runs.items()}
    results = {"family": str(a.workdir / name), "n_params": n_params(spec),
               "dtype": spec.dtype, "rank": a.rank, "repeats": a.repeats,
               "runs": runs, "medians": medians}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{n_params(spec) / 1e6:.0f}M parameters ({spec.dtype}), adapter rank {a.rank} "
          f"on 7 modules x {spec.layers} layers; medians of {a.repeats}\n")
    print("| merge | wall s | CPU s | peak RSS GB |\n|---|---|---|---|")
    for label, m in medians.items():
        print(f"| {label} | {m['wall_s']:.1f} | {m['cpu_s']:.1f} | {m['peak_rss_gb']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
