"""`mergelang compress` on a synthetic Llama-shaped family: size, error, time, memory.

    python benchmarks/compress.py --workdir DIR [--densities 0.1,0.05] [--no-bits]
                                  [--hidden 1024 --layers 16 --inter 2816 --vocab 32000
                                   --dtype bfloat16 ...]

Makes (or reuses) the family under DIR (benchmarks/families.py; the defaults give about
271M parameters in bfloat16), then for each compression of ft0 against base (each
density, and --bits 1):

- compress: `mergelang compress ft0 --base base ... -o DIR/compress/X.delta --json`,
  wall time and the child's own peak RSS and CPU time (benchmarks/measure.py);
- the file: its size on disk, against the dense task vector's (ft0's dtype) and the
  fine-tune's own size, and the relative error ||τ - τ̂|| / ||τ|| compress reports;
- apply: `mergelang run` of `output model("base") + delta("X.delta")`, wall time and
  peak RSS; for scale, a plain copy `output model("ft0")` and the merge
  `base + trim(model("ft0") - base, D)` (the first density) run the same way;
- the applied model checked: ||applied - base - τ̂|| is 0 up to the output's rounding,
  and ||applied - ft0|| / ||τ|| is measured over every tensor (streamed), the error a
  user of the applied model actually has (τ̂ rounded to bfloat16 once more).

Prints a table and writes DIR/compress/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from families import add_family_args, ensure_family, n_params, spec_from_args

HERE = Path(__file__).resolve().parent
MEASURE = HERE / "measure.py"
MERGELANG = [sys.executable, "-m", "mergelang"]


def measured(cmd: list[str], work: Path, stdout: Path | None = None) -> dict:
    """Wall time of `cmd`, and its own peak RSS and CPU time."""
    usage = work / "usage.json"
    out = open(stdout, "w") if stdout is not None else subprocess.DEVNULL  # noqa: SIM115
    start = time.perf_counter()
    code = subprocess.call([sys.executable, str(MEASURE), str(usage), *cmd], stdout=out)
    wall = time.perf_counter() - start
    if stdout is not None:
        out.close()
    if code != 0:
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    figures = json.loads(usage.read_text())
    return {"wall_s": wall, "peak_rss_gb": figures["maxrss_bytes"] / 1e9,
            "cpu_s": figures["user_s"] + figures["sys_s"]}


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def applied_error(applied: Path, ft: Path, base: Path) -> float:
    """||applied - ft|| / ||ft - base||, tensor by tensor (float32, float64 sums)."""
    from mergelang.io.read import open_model

    err = norm = 0.0
    with open_model(applied) as a, open_model(ft) as f, open_model(base) as b:
        for name in f.tensors:
            ft_t = f.load(name, dtype=torch.float32)
            tau = ft_t - b.load(name, dtype=torch.float32)
            norm += float(torch.dot(tau.view(-1), tau.view(-1)))
            ft_t.sub_(a.load(name, dtype=torch.float32))
            err += float(torch.dot(ft_t.view(-1), ft_t.view(-1)))
    return math.sqrt(err / norm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--densities", default="0.1,0.05")
    p.add_argument("--no-bits", action="store_true", help="leave out --bits 1")
    p.add_argument("--no-check", action="store_true", help="skip the applied model's error")
    add_family_args(p)
    a = p.parse_args(argv)
    spec = spec_from_args(a)
    name = (f"family-h{spec.hidden}-l{spec.layers}-i{spec.inter}-v{spec.vocab}"
            f"-ft{spec.n_ft}-{spec.dtype}")
    models = ensure_family(spec, a.workdir / name)
    work = a.workdir / "compress"
    work.mkdir(parents=True, exist_ok=True)
    base, ft = models["base"], models["ft0"]
    configs = [(f"density {d}", ["--density", d]) for d in a.densities.split(",") if d]
    if not a.no_bits:
        configs.append(("1 bit", ["--bits", "1"]))
    copy = work / "copy.merge"
    copy.write_text(f'output model("{ft}")\n')
    results = {"family": {"path": str(a.workdir / name), "n_params": n_params(spec),
                          "dtype": spec.dtype}, "fine_tune_bytes": folder_bytes(ft),
               "runs": []}
    copied = work / "copied"
    subprocess.call(["rm", "-rf", str(copied)])
    results["copy"] = measured([*MERGELANG, "run", str(copy), "-o", str(copied), "--quiet"],
                               work)
    subprocess.call(["rm", "-rf", str(copied)])
    if configs and configs[0][1][0] == "--density":
        density = configs[0][1][1]
        trim = work / "trim.merge"
        trim.write_text(f'base = model("{base}")\n'
                        f'output base + trim(model("{ft}") - base, {density})\n')
        results["trim"] = {"density": density, **measured(
            [*MERGELANG, "run", str(trim), "-o", str(copied), "--quiet"], work)}
        subprocess.call(["rm", "-rf", str(copied)])
    for label, flags in configs:
        delta = work / f"{label.replace(' ', '-')}.delta"
        report = work / f"{label.replace(' ', '-')}.json"
        row: dict = {"compression": label}
        row["compress"] = measured([*MERGELANG, "compress", str(ft), "--base", str(base),
                                    *flags, "-o", str(delta), "--json", "--force"], work,
                                   stdout=report)
        figures = json.loads(report.read_text())["overall"]
        row["file_bytes"] = os.path.getsize(delta)
        row["dense_bytes"] = figures["dense_bytes"]
        row["relative_error"] = figures["relative_error"]
        script = work / "apply.merge"
        script.write_text(f'base = model("{base}")\noutput base + delta("{delta}")\n')
        out = work / "applied"
        subprocess.call(["rm", "-rf", str(out)])
        row["apply"] = measured([*MERGELANG, "run", str(script), "-o", str(out), "--quiet"],
                                work)
        if not a.no_check:
            row["applied_relative_error"] = applied_error(out, ft, base)
        subprocess.call(["rm", "-rf", str(out)])
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


def table(results: dict) -> str:
    gb = 1e9
    lines = [f"family {results['family']['path']} ({results['family']['n_params'] / 1e6:.0f}M "
             f"parameters, {results['family']['dtype']}; the fine-tune is "
             f"{results['fine_tune_bytes'] / gb:.3f} GB)", "",
             "| compression | file GB | / dense τ | rel. error | applied rel. error | "
             "compress wall s | compress CPU s | compress RSS GB | apply wall s | "
             "apply CPU s | apply RSS GB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        applied = r.get("applied_relative_error")
        lines.append(
            f"| {r['compression']} | {r['file_bytes'] / gb:.3f} | "
            f"{r['file_bytes'] / r['dense_bytes']:.3f} | {r['relative_error']:.4f} | "
            f"{'-' if applied is None else f'{applied:.4f}'} | "
            f"{r['compress']['wall_s']:.1f} | {r['compress']['cpu_s']:.1f} | "
            f"{r['compress']['peak_rss_gb']:.2f} | {r['apply']['wall_s']:.1f} | "
            f"{r['apply']['cpu_s']:.1f} | {r['apply']['peak_rss_gb']:.2f} |")
    c = results["copy"]
    lines.append(f"\nfor scale, `output model(ft0)` (a copy): {c['wall_s']:.1f} s wall, "
                 f"{c['cpu_s']:.1f} s CPU, {c['peak_rss_gb']:.2f} GB peak RSS")
    if "trim" in results:
        t = results["trim"]
        lines.append(f"the merge `base + trim(ft0 - base, {t['density']})`: {t['wall_s']:.1f} s "
                     f"wall, {t['cpu_s']:.1f} s CPU, {t['peak_rss_gb']:.2f} GB peak RSS")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
