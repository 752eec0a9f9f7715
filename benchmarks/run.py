"""mergelang vs mergekit on the same merges of a synthetic Llama-shaped family.

    python benchmarks/run.py --workdir DIR [--methods ties,dare_ties,linear] [--repeats 3]
                             [--mergekit PATH|auto|none] [--mergekit-dtype float32]
                             [--scaling] [--io-floor] [--device cpu]
                             [--hidden 1024 --layers 16 --inter 2816 --vocab 32000
                              --n-ft 3 --dtype bfloat16 --shard-mb 200]

Makes (or reuses) a family under DIR, writes for each method a .merge script and
the equivalent mergekit YAML, runs each tool as a child process, alternating
mergelang / mergekit, --repeats times each (the output is deleted between runs),
and measures each child's wall time and peak RSS (``os.wait4`` rusage of that
child). Prints a table of medians and ratios plus every run's numbers, and writes
the same to DIR/results.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from families import FamilySpec, add_family_args, ensure_family, n_params, spec_from_args
from io_floor import weight_map
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
METHODS = ("ties", "dare_ties", "linear")
MEASURE = Path(__file__).resolve().parent / "measure.py"
GB = 1e9

# The issue's targets (issue 3): mergelang / mergekit, medians of the same run.
TARGETS = {
    "ties": {"time": 0.25, "rss": 0.6},
    "dare_ties": {"time": 0.5, "rss": 0.6},
    "linear": {"time": 0.7, "rss": 0.6},
}
SCALING_TARGET = 1.15   # peak RSS, 2x layers / 1x
IO_FLOOR_TARGET = 1.5   # linear wall / I/O floor wall


# --------------------------------------------------------------------------- scripts

def method_inputs(method: str, models: dict[str, Path]) -> list[Path]:
    fts = [p for name, p in models.items() if name != "base"]
    if method == "linear":
        return fts                      # the fine-tunes, no base
    return [models["base"], *fts]       # ties, dare_ties: base first


def write_scripts(method: str, models: dict[str, Path], folder: Path,
                  mergekit_dtype: str | None, out_dtype: str) -> tuple[Path, Path]:
    """The method as a .merge script and as a mergekit YAML with the same parameters."""
    folder.mkdir(parents=True, exist_ok=True)
    base = models["base"].resolve()
    fts = {n: p.resolve() for n, p in models.items() if n != "base"}
    ones = "[" + ", ".join("1.0" for _ in fts) + "]"
    deltas = ", ".join(f"{n} - base" for n in fts)
    lines = ["# written by benchmarks/run.py; compare with the .yml next to it"]
    yml = [f"merge_method: {method}"]
    if method == "linear":
        lines += [f'{n} = model("{p}")' for n, p in fts.items()]
        lines.append(f"output linear({', '.join(fts)}, weights={ones}, normalize=true)")
        yml.append("models:")
        for p in fts.values():
            yml += [f"  - model: {p}", "    parameters: {weight: 1.0}"]
        yml.append("parameters: {normalize: true}")
    elif method == "ties":
        lines.append(f'base = model("{base}")')
        lines += [f'{n} = model("{p}")' for n, p in fts.items()]
        lines.append(f"output base + ties({deltas}, weights={ones}, density=0.2, "
                     "normalize=true)")
        yml += [f"base_model: {base}", "models:"]
        for p in fts.values():
            yml += [f"  - model: {p}", "    parameters: {weight: 1.0, density: 0.2}"]
        yml.append("parameters: {normalize: true}")
    elif method == "dare_ties":
        # mergekit 0.1.5 rescales the kept entries to keep the L1 norm: rescale="l1".
        lines.append("set seed = 0")
        lines.append(f'base = model("{base}")')
        lines += [f'{n} = model("{p}")' for n, p in fts.items()]
        lines.append(f"output base + dare_ties({deltas}, weights={ones}, density=0.3, "
                     'rescale="l1", normalize=false)')
        yml += [f"base_model: {base}", "models:"]
        for p in fts.values():
            yml += [f"  - model: {p}", "    parameters: {weight: 1.0, density: 0.3}"]
        yml.append("parameters: {normalize: false}")
    else:
        raise SystemExit(f"unknown method {method!r} (known: {', '.join(METHODS)})")
    if mergekit_dtype:
        yml.append(f"dtype: {mergekit_dtype}")
    yml.append(f"out_dtype: {out_dtype}")
    script = folder / f"{method}.merge"
    config = folder / f"{method}.yml"
    script.write_text("\n".join(lines) + "\n")
    config.write_text("\n".join(yml) + "\n")
    return script, config


# --------------------------------------------------------------------------- children

def run_child(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run `cmd` in the log's folder (so that `python -m` does not pick up a package from
    the caller's folder); its wall time and its own peak RSS and CPU time, measured by
    measure.py (a small process in between, so the peak is not the benchmark's own)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_suffix(".usage.json")
    with open(log, "wb") as f:
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(MEASURE), str(usage_file), *cmd], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=log.parent).returncode
        wall = time.perf_counter() - t0
    usage = json.loads(usage_file.read_text())
    return {"wall_s": round(wall, 3), "peak_rss_gb": round(usage["maxrss_bytes"] / GB, 4),
            "user_s": round(usage["user_s"], 2), "sys_s": round(usage["sys_s"], 2), "rc": rc,
            "log": str(log)}


def log_tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def warm_cache(paths: list[Path]) -> None:
    """Read every input file once so that no timed run pays for a cold page cache."""
    buf = bytearray(16 << 20)
    for model in paths:
        for f in sorted(model.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as h:
                while h.readinto(buf):
                    pass


def find_mergekit(choice: str) -> str | None:
    if choice == "none":
        return None
    if choice == "auto":
        found = shutil.which("mergekit-yaml")
        if found is None:
            near = Path(sys.executable).with_name("mergekit-yaml")
            found = str(near) if near.exists() else None
        return found
    if not Path(choice).exists() and shutil.which(choice) is None:
        raise SystemExit(f"--mergekit {choice}: not found")
    return shutil.which(choice) or choice


def mergekit_version(exe: str) -> str | None:
    py = Path(exe).with_name("python")
    if not py.exists():
        return None
    try:
        out = subprocess.run([str(py), "-c", "import importlib.metadata as m;"
                              "print(m.version('mergekit'))"],
                             capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def compare_outputs(a: Path, b: Path, base: Path | None = None) -> dict:
    """How far apart two merged folders are (same names and shapes; max |a-b|, rel. L2);
    with `base`, also the ratio of the norms of the two merged deltas |a-base| / |b-base|."""
    wa, wb = weight_map(a), weight_map(b)
    wbase = weight_map(base) if base is not None else None
    if set(wa) != set(wb):
        return {"same_names": False, "only_mergelang": sorted(set(wa) - set(wb))[:5],
                "only_mergekit": sorted(set(wb) - set(wa))[:5]}
    max_abs = 0.0
    diff2 = ref2 = da2 = db2 = 0.0
    equal = 0
    for name in sorted(wa):
        with safe_open(str(a / wa[name]), "pt") as fa, safe_open(str(b / wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.shape != y.shape:
            return {"same_names": True, "same_shapes": False, "tensor": name}
        equal += int(torch.equal(x, y))
        x, y = x.float(), y.float()
        d = x - y
        max_abs = max(max_abs, float(d.abs().max()))
        diff2 += float((d * d).sum())
        ref2 += float((y * y).sum())
        if wbase is not None and name in wbase:
            with safe_open(str(base / wbase[name]), "pt") as fz:
                z = fz.get_tensor(name).float()
            if z.shape == x.shape:
                da2 += float(((x - z) ** 2).sum())
                db2 += float(((y - z) ** 2).sum())
    out = {"same_names": True, "same_shapes": True, "tensors": len(wa),
           "identical_tensors": equal, "max_abs_diff": max_abs,
           "rel_l2_diff": (diff2 / ref2) ** 0.5 if ref2 else 0.0}
    if wbase is not None:
        out["delta_norm_ratio"] = (da2 / db2) ** 0.5 if db2 else None
    return out


# --------------------------------------------------------------------------- summary

def median(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r["rc"] == 0]
    return statistics.median(vals) if vals else None


def summarize(runs: list[dict]) -> dict:
    ok = [r["wall_s"] for r in runs if r["rc"] == 0]
    return {"runs": runs, "median_wall_s": median(runs, "wall_s"),
            "min_wall_s": min(ok) if ok else None,
            "median_peak_rss_gb": median(runs, "peak_rss_gb"),
            "failed": sum(r["rc"] != 0 for r in runs)}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def report(res: dict) -> str:
    lines = []
    fam = res["family"]
    lines.append(f"family: {fam['n_params'] / 1e6:.1f}M parameters per model, "
                 f"{fam['spec']['layers']} layers, hidden {fam['spec']['hidden']}, "
                 f"{fam['spec']['n_ft']} fine-tunes, {fam['spec']['dtype']} ({fam['path']})")
    env = res["env"]
    lines.append(f"machine: {env['cpu_count']} CPUs; load average before "
                 f"{' '.join(f'{x:.2f}' for x in env['loadavg_before'])}, after "
                 f"{' '.join(f'{x:.2f}' for x in env.get('loadavg_after') or [])}")
    lines.append(f"mergelang {env.get('mergelang') or '?'}: {env.get('mergelang_module')}")
    mk = res["mergekit"]
    if mk["path"]:
        lines.append(f"mergekit {mk.get('version') or '?'}: {mk['path']} "
                     f"(dtype {res['config']['mergekit_dtype'] or 'unset'})")
    else:
        lines.append(f"mergekit was not run ({mk['why']}): mergelang's numbers only")
    lines.append(f"medians of {res['config']['repeats']} runs each, alternating; "
                 "ratios are mergelang / mergekit; GB = 10^9 bytes")
    lines.append("")
    rows = [["method", "mergelang median s", "mergekit median s", "time ratio",
             "mergelang peak GB", "mergekit peak GB", "RSS ratio"]]
    for m, r in res["methods"].items():
        ml, mkr = r["mergelang"], r.get("mergekit")
        rows.append([m, fmt(ml["median_wall_s"]), fmt(mkr and mkr["median_wall_s"]),
                     fmt(r.get("time_ratio"), ".3f"), fmt(ml["median_peak_rss_gb"], ".3f"),
                     fmt(mkr and mkr["median_peak_rss_gb"], ".3f"),
                     fmt(r.get("rss_ratio"), ".3f")])
    lines.append(table(rows))
    lines.append("")
    lines.append("runs (wall s / peak GB / user+sys CPU s):")
    for m, r in res["methods"].items():
        for tool in ("mergelang", "mergekit", "io_floor"):
            s = r.get(tool)
            if not s:
                continue
            cells = []
            for run in s["runs"]:
                c = (f"{run['wall_s']:.2f}s/{run['peak_rss_gb']:.3f}GB/"
                     f"{run['user_s'] + run['sys_s']:.1f}")
                cells.append(c if run["rc"] == 0 else f"FAILED rc={run['rc']}")
            lines.append(f"  {m:<10} {tool:<10} " + ", ".join(cells))
    agree = [(m, r["agreement"]) for m, r in res["methods"].items() if r.get("agreement")]
    if agree:
        lines.append("")
        lines.append("outputs, mergelang vs mergekit (last runs):")
        for m, a in agree:
            if a.get("same_shapes"):
                dn = a.get("delta_norm_ratio")
                lines.append(f"  {m:<10} same tensors and shapes; {a['identical_tensors']}/"
                             f"{a['tensors']} identical, max |diff| {a['max_abs_diff']:.3g}, "
                             f"relative L2 diff {a['rel_l2_diff']:.3g}"
                             + ("" if dn is None else f", |merged delta| ratio {dn:.4f}"))
            else:
                lines.append(f"  {m:<10} DIFFERENT layout: {a}")
    floors = [(m, r) for m, r in res["methods"].items() if r.get("io_floor")]
    if floors:
        lines.append("")
        lines.append("I/O floor (child process: read every input tensor + write an output "
                     "of the same size):")
        for m, r in floors:
            f = r["io_floor"]
            lines.append(f"  {m:<10} floor median {fmt(f['median_wall_s'])} s "
                         f"(in-process I/O {fmt(f['median_io_s'])} s, read "
                         f"{f['read_gb']:.2f} GB, wrote {f['written_gb']:.2f} GB); "
                         f"mergelang / floor = {fmt(r.get('floor_ratio'), '.3f')} "
                         f"(vs in-process I/O only: {fmt(r.get('floor_ratio_io'), '.3f')}; "
                         f"fastest runs: {fmt(fastest_ratio(r['mergelang'], f), '.3f')})")
    if res.get("scaling"):
        sc = res["scaling"]
        lines.append("")
        lines.append(f"scaling: mergelang on a family with {sc['layers_2x']} layers "
                     f"({sc['n_params_2x'] / 1e6:.1f}M parameters) vs {sc['layers_1x']}:")
        for m, s in sc["methods"].items():
            lines.append(f"  {m:<10} peak {fmt(s['peak_1x_gb'], '.3f')} -> "
                         f"{fmt(s['peak_2x_gb'], '.3f')} GB, ratio "
                         f"{fmt(s['rss_ratio'], '.3f')}; time {fmt(s['wall_1x_s'])} -> "
                         f"{fmt(s['wall_2x_s'])} s")
    if res.get("targets"):
        lines.append("")
        lines.append("issue 3 targets:")
        for t in res["targets"]:
            ok = "-" if t["value"] is None else ("ok" if t["value"] <= t["limit"] else "MISSED")
            lines.append(f"  {t['what']:<42} {fmt(t['value'], '.3f'):>7} <= {t['limit']:<5} "
                         f"{ok}")
    return "\n".join(lines)


def fastest_ratio(a: dict, b: dict) -> float | None:
    """Ratio of the fastest successful runs: less sensitive to a busy machine."""
    def best(s: dict) -> float | None:
        ok = [r["wall_s"] for r in s["runs"] if r["rc"] == 0]
        return min(ok) if ok else None
    return ratio(best(a), best(b))


def targets(res: dict) -> list[dict]:
    out = []
    for m, r in res["methods"].items():
        if m in TARGETS and r.get("mergekit"):
            out.append({"what": f"{m} time vs mergekit", "value": r.get("time_ratio"),
                        "limit": TARGETS[m]["time"]})
            out.append({"what": f"{m} peak RSS vs mergekit", "value": r.get("rss_ratio"),
                        "limit": TARGETS[m]["rss"]})
    if res.get("scaling"):
        for m, s in res["scaling"]["methods"].items():
            out.append({"what": f"{m} peak RSS, 2x layers / 1x", "value": s["rss_ratio"],
                        "limit": SCALING_TARGET})
    lin = res["methods"].get("linear", {})
    if lin.get("io_floor"):
        out.append({"what": "linear wall / I/O floor", "value": lin.get("floor_ratio"),
                    "limit": IO_FLOOR_TARGET})
    return out


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mergekit", default="auto", help="PATH to mergekit-yaml, auto or none")
    p.add_argument("--mergekit-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="mergekit's compute `dtype` (unset by default)")
    p.add_argument("--scaling", action="store_true",
                   help="also run mergelang on a family with twice the layers")
    p.add_argument("--io-floor", action="store_true",
                   help="also time a plain read of the inputs + write of the output")
    p.add_argument("--device", default="cpu", help="mergelang's --device (mergekit stays on CPU)")
    p.add_argument("--mergelang-src", type=Path, default=None,
                   help="run mergelang from this source tree (put first on PYTHONPATH) "
                        "instead of the installed one")
    p.add_argument("--report-only", action="store_true",
                   help="print the report of DIR/results.json again; run nothing")
    p.add_argument("--no-compare", action="store_true",
                   help="skip comparing mergelang's output with mergekit's")
    add_family_args(p)
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r} (known: {', '.join(METHODS)})")
    if a.n_ft < 1 or a.repeats < 1:
        p.error("--n-ft and --repeats must be at least 1")

    work = a.workdir.resolve()
    if a.report_only:
        print(report(json.loads((work / "results.json").read_text())))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    spec = spec_from_args(a)
    mk = find_mergekit(a.mergekit)
    res: dict = {
        "config": {"argv": sys.argv[1:] if argv is None else argv, "methods": methods,
                   "repeats": a.repeats, "device": a.device,
                   "mergekit_dtype": a.mergekit_dtype, "out_dtype": spec.dtype},
        "env": {"cpu_count": os.cpu_count(), "loadavg_before": list(os.getloadavg()),
                "platform": platform.platform(), "python": platform.python_version(),
                "torch": torch.__version__, "mergelang": _version("mergelang")},
        "mergekit": {"path": mk, "version": mergekit_version(mk) if mk else None,
                     "why": None if mk else ("--mergekit none" if a.mergekit == "none"
                                             else "mergekit-yaml not found")},
        "methods": {},
    }
    models = ensure_family(spec, work / family_name(spec))
    res["family"] = {"path": str(work / family_name(spec)), "spec": spec.marker(),
                     "n_params": n_params(spec)}
    out_json = work / "results.json"
    mk_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    ml_env = None
    if a.mergelang_src:
        src = str(a.mergelang_src.resolve())
        ml_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            x for x in (src, os.environ.get("PYTHONPATH")) if x))
        res["env"]["mergelang_src"] = src
    try:
        res["env"]["mergelang_module"] = subprocess.run(
            [sys.executable, "-c", "import mergelang; print(mergelang.__file__)"],
            capture_output=True, text=True, env=ml_env, cwd=work, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        res["env"]["mergelang_module"] = None

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=2) + "\n")

    for method in methods:
        script, config = write_scripts(method, models, work / "scripts", a.mergekit_dtype,
                                       spec.dtype)
        inputs = method_inputs(method, models)
        warm_cache(inputs)
        ml_out, mk_out, floor_out = (work / "out" / f"{method}-{t}"
                                     for t in ("mergelang", "mergekit", "floor"))
        ml_cmd = [sys.executable, "-m", "mergelang", "run", str(script), "-o", str(ml_out),
                  "--quiet", "--device", a.device]
        mk_cmd = ([mk, str(config), str(mk_out), "--lazy-unpickle", "--no-cuda", "--quiet",
                   "--no-copy-tokenizer", "--random-seed", "0"] if mk else None)
        floor_cmd = [sys.executable, str(HERE / "io_floor.py"), "--out", str(floor_out),
                     "--out-dtype", spec.dtype, *map(str, inputs)]
        entry: dict = {"commands": {"mergelang": ml_cmd, "mergekit": mk_cmd,
                                    "io_floor": floor_cmd if a.io_floor else None},
                       "script": script.read_text(), "mergekit_yaml": config.read_text(),
                       "inputs": [str(x) for x in inputs]}
        res["methods"][method] = entry
        runs: dict[str, list[dict]] = {"mergelang": [], "mergekit": [], "io_floor": []}
        for r in range(a.repeats):
            plan = [("mergelang", ml_cmd, ml_out, ml_env)]
            if mk_cmd:
                plan.append(("mergekit", mk_cmd, mk_out, mk_env))
            if a.io_floor:
                plan.append(("io_floor", floor_cmd, floor_out, None))
            for tool, cmd, out, env in plan:
                shutil.rmtree(out, ignore_errors=True)
                run = run_child(cmd, work / "logs" / f"{method}-{tool}-{r}.log", env)
                if tool == "io_floor" and run["rc"] == 0:
                    try:
                        run.update(json.loads(Path(run["log"]).read_text().splitlines()[-1]))
                    except (ValueError, IndexError):
                        pass
                runs[tool].append(run)
                status = "ok" if run["rc"] == 0 else f"FAILED rc={run['rc']}"
                print(f"[{method} {r + 1}/{a.repeats}] {tool:<9} {run['wall_s']:8.2f} s "
                      f"{run['peak_rss_gb']:7.3f} GB  {status}", flush=True)
                if run["rc"] != 0:
                    print(log_tail(run["log"]), flush=True)
                last = r == a.repeats - 1
                if not (last and tool in ("mergelang", "mergekit")):
                    shutil.rmtree(out, ignore_errors=True)
        ml = entry["mergelang"] = summarize(runs["mergelang"])
        if mk_cmd:
            mkr = entry["mergekit"] = summarize(runs["mergekit"])
            entry["time_ratio"] = ratio(ml["median_wall_s"], mkr["median_wall_s"])
            entry["rss_ratio"] = ratio(ml["median_peak_rss_gb"], mkr["median_peak_rss_gb"])
            if not a.no_compare and not ml["failed"] and not mkr["failed"]:
                entry["agreement"] = compare_outputs(
                    ml_out, mk_out, models["base"] if method != "linear" else None)
        if a.io_floor:
            fl = entry["io_floor"] = summarize(runs["io_floor"])
            ok = [x for x in runs["io_floor"] if x["rc"] == 0 and "io_s" in x]
            fl["median_io_s"] = statistics.median(x["io_s"] for x in ok) if ok else None
            fl["read_gb"] = ok[0]["read_bytes"] / GB if ok else 0.0
            fl["written_gb"] = ok[0]["written_bytes"] / GB if ok else 0.0
            entry["floor_ratio"] = ratio(ml["median_wall_s"], fl["median_wall_s"])
            entry["floor_ratio_io"] = ratio(ml["median_wall_s"], fl["median_io_s"])
        shutil.rmtree(ml_out, ignore_errors=True)
        shutil.rmtree(mk_out, ignore_errors=True)
        save()

    if a.scaling:
        spec2 = spec_from_args(a, layers=2 * a.layers)
        models2 = ensure_family(spec2, work / family_name(spec2))
        sc = res["scaling"] = {"layers_1x": spec.layers, "layers_2x": spec2.layers,
                               "n_params_2x": n_params(spec2), "methods": {}}
        for method in methods:
            script, _ = write_scripts(method, models2, work / "scripts-2x", None, spec2.dtype)
            warm_cache(method_inputs(method, models2))
            out = work / "out" / f"{method}-mergelang-2x"
            cmd = [sys.executable, "-m", "mergelang", "run", str(script), "-o", str(out),
                   "--quiet", "--device", a.device]
            runs2 = []
            for r in range(a.repeats):
                shutil.rmtree(out, ignore_errors=True)
                run = run_child(cmd, work / "logs" / f"{method}-mergelang-2x-{r}.log", ml_env)
                runs2.append(run)
                print(f"[{method} 2x layers {r + 1}/{a.repeats}] mergelang "
                      f"{run['wall_s']:8.2f} s {run['peak_rss_gb']:7.3f} GB  "
                      f"{'ok' if run['rc'] == 0 else 'FAILED rc=' + str(run['rc'])}", flush=True)
                if run["rc"] != 0:
                    print(log_tail(run["log"]), flush=True)
                shutil.rmtree(out, ignore_errors=True)
            s2 = summarize(runs2)
            s1 = res["methods"][method]["mergelang"]
            sc["methods"][method] = {
                "runs_2x": runs2, "peak_1x_gb": s1["median_peak_rss_gb"],
                "peak_2x_gb": s2["median_peak_rss_gb"], "wall_1x_s": s1["median_wall_s"],
                "wall_2x_s": s2["median_wall_s"],
                "rss_ratio": ratio(s2["median_peak_rss_gb"], s1["median_peak_rss_gb"])}
            save()

    res["env"]["loadavg_after"] = list(os.getloadavg())
    res["targets"] = targets(res)
    save()
    text = report(res)
    (work / "results.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nwrote {out_json}")
    failed = any(r[t]["failed"] for r in res["methods"].values()
                 for t in ("mergelang", "mergekit", "io_floor") if r.get(t))
    failed |= any(r["runs_2x"] and any(x["rc"] for x in r["runs_2x"])
                  for r in res.get("scaling", {}).get("methods", {}).values())
    return 1 if failed else 0


def family_name(spec: FamilySpec) -> str:
    return (f"family-h{spec.hidden}-l{spec.layers}-i{spec.inter}-v{spec.vocab}"
            f"-ft{spec.n_ft}-{spec.dtype}")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
