"""LoRA extraction: mergelang extract vs mergekit-extract-lora on the 270M family.

    python benchmarks/extract.py --workdir DIR [--ranks 32,128] [--repeats 1]
                                 [--mergekit PATH|auto|none] [--svd auto]
                                 [--hidden 1024 --layers 16 --inter 2816 --vocab 32000 ...]

Makes (or reuses) the synthetic Llama family of benchmarks/families.py under DIR and
extracts ft0 against base at each rank with both tools, in the same run, alternating,
each as a child process measured by measure.py (wall time, the child's own peak RSS).
Then, for each adapter, the reconstruction error at that rank, measured here from the
written factors (scale alpha/r included) against the delta ft0 - base in float32:
per tensor ||delta - s B A||_F / ||delta||_F, and over all factorised tensors together.
mergekit is not a dependency: without it (`--mergekit none`, or not found) only
mergelang is run. Writes DIR/extract_results.json. See docs/extract.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

import torch
from families import add_family_args, ensure_family, n_params, spec_from_args
from io_floor import weight_map
from run import family_name, run_child, table, warm_cache
from safetensors import safe_open

GB = 1e9


def find_extractor(choice: str) -> str | None:
    if choice == "none":
        return None
    if choice != "auto":
        return shutil.which(choice) or (choice if Path(choice).exists() else None)
    return shutil.which("mergekit-extract-lora") or next(
        (str(p) for p in (Path(sys.executable).with_name("mergekit-extract-lora"),
                          Path("/work/scratch/mk/bin/mergekit-extract-lora")) if p.exists()),
        None)


class Model:
    """Tensors of a sharded folder, read one at a time."""

    def __init__(self, folder: Path):
        self.folder, self.map = folder, weight_map(folder)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.folder / self.map[name]), framework="pt") as f:
            return f.get_tensor(name)


def reconstruction(adapter: Path, base: Model, ft: Model) -> dict:
    """Each factorised tensor's relative error, from the adapter's files alone."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    errors, lost, total = {}, 0.0, 0.0
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for key in sorted(k for k in keys if k.endswith(".lora_A.weight")):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            a = f.get_tensor(key).float()
            b = f.get_tensor(key.replace("lora_A", "lora_B")).float()
            rank = config.get("rank_pattern", {}).get(module, config["r"])
            alpha = config.get("alpha_pattern", {}).get(module, config["lora_alpha"])
            delta = ft.get(module + ".weight").float() - base.get(module + ".weight").float()
            err = float(torch.linalg.matrix_norm(delta - (alpha / rank) * (b @ a)))
            norm = float(torch.linalg.matrix_norm(delta))
            errors[module] = err / norm
            lost, total = lost + err ** 2, total + norm ** 2
    kept = sorted(config.get("modules_to_save") or [])
    return {"overall": (lost / total) ** 0.5, "tensors": len(errors),
            "mean": statistics.fmean(errors.values()), "worst": max(errors.values()),
            "kept": kept, "bytes": (adapter / "adapter_model.safetensors").stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--ranks", default="32", help="comma-separated ranks (default 32)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--mergekit", default="auto", help="mergekit-extract-lora: path, auto or none")
    p.add_argument("--svd", default="auto", choices=("auto", "exact", "randomised"))
    add_family_args(p)
    a = p.parse_args(argv)
    spec = spec_from_args(a)
    work = a.workdir.resolve()
    models = ensure_family(spec, work / family_name(spec))
    base, ft = models["base"], models["ft0"]
    mergekit = find_extractor(a.mergekit)
    if mergekit is None:
        print("mergekit-extract-lora not found: measuring mergelang only "
              "(install mergekit, or pass --mergekit PATH)")
    warm_cache([base, ft])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    runs: list[dict] = []
    quality: dict[str, dict] = {}
    for rank in [int(r) for r in a.ranks.split(",")]:
        tools = {"mergelang": lambda out, r=rank: [
            sys.executable, "-m", "mergelang", "extract", str(ft), "--base", str(base),
            "--rank", str(r), "--svd", a.svd, "-o", str(out), "--quiet"]}
        if mergekit:
            tools["mergekit"] = lambda out, r=rank: [
                mergekit, "--model", str(ft), "--base-model", str(base), "--out-path",
                str(out), "--max-rank", str(r), "--quiet"]
        for i in range(a.repeats):
            for tool, cmd in tools.items():
                out = work / f"extract-{tool}-r{rank}"
                shutil.rmtree(out, ignore_errors=True)
                run = run_child(cmd(out), work / "logs" / f"{tool}-r{rank}-{i}.log", env)
                run.update(tool=tool, rank=rank)
                runs.append(run)
                print(json.dumps(run))
                if run["rc"] == 0 and i == a.repeats - 1:
                    quality[f"{tool}-r{rank}"] = reconstruction(out, Model(base), Model(ft))
    rows = [["tool", "rank", "median s", "median CPU s", "median peak RSS GB", "overall error",
             "mean tensor error", "worst", "adapter MB", "kept whole"]]
    for key, q in quality.items():
        tool, rank = key.rsplit("-r", 1)
        mine = [r for r in runs if r["tool"] == tool and r["rank"] == int(rank)]
        rows.append([tool, rank, f"{statistics.median(r['wall_s'] for r in mine):.1f}",
                     f"{statistics.median(r['user_s'] + r['sys_s'] for r in mine):.1f}",
                     f"{statistics.median(r['peak_rss_gb'] for r in mine):.2f}",
                     f"{q['overall']:.4f}", f"{q['mean']:.4f}", f"{q['worst']:.4f}",
                     f"{q['bytes'] / 1e6:.1f}", str(len(q["kept"]))])
    print(f"family: {n_params(spec) / 1e6:.0f}M parameters, {spec.dtype}; ft0 against base; "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}")
    print(table(rows))
    (work / "extract_results.json").write_text(json.dumps(
        {"spec": spec.marker(), "runs": runs, "quality": quality}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
