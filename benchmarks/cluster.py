"""Wall time and memory of a merge on one process and on local Dask clusters.

    python benchmarks/cluster.py --family DIR [--methods ties,ties_model,dare_ties]
                                 [--workers 1,2] [--repeats 1] [--shard-size 100MB]
                                 [--workdir DIR]

DIR is a family made by `benchmarks/families.py` (base, ft0, ft1, ft2). For each method
the merge runs, in turns, as `mergelang run` in a child process (wall time from start to
exit and its peak RSS, as benchmarks/run.py measures), and for each worker count as a
child process that starts a local cluster of that many worker processes, times the
start, then `Program.run(..., cluster=...)`, and asks every worker its peak RSS
(`ru_maxrss`). Every cluster output is compared byte for byte with the single-process
one. The shard size is small (default 100MB: six shards of the 270M family's output)
because a shard is a task: with one 5GB shard a cluster has one task to run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = {
    "ties": "base + ties({deltas}, density=0.2)",
    "ties_model": 'base + ties({deltas}, density=0.2, scope="model")',
    "dare_ties": 'base + dare_ties({deltas}, density=0.3, rescale="l1")',
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", type=Path, required=True)
    parser.add_argument("--methods", default="ties,ties_model,dare_ties")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mergelang-cluster-bench"))
    parser.add_argument("--child", nargs=3, metavar=("SCRIPT", "OUT", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child, args.shard_size)
    args.workdir.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in args.workers.split(",")]
    rows = []
    for method in args.methods.split(","):
        script = _script(args.workdir, args.family, method)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            local = args.workdir / "out-local"
            runs.setdefault("local", []).append(_local(script, local, args.shard_size))
            for n in counts:
                out = args.workdir / f"out-{n}"
                result = _cluster(script, out, n, args.shard_size)
                result["same"] = _same(local, out)
                runs.setdefault(f"{n} workers", []).append(result)
                shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(local, ignore_errors=True)
        for name, results in runs.items():
            rows.append((method, name, results))
    print(f"load average at the end: {os.getloadavg()}")
    print("| method | run | median wall s | median merge s | cluster start s "
          "| peak RSS GB (client; each worker) | same bytes |")
    print("|---|---|---|---|---|---|---|")
    for method, name, results in rows:
        wall = statistics.median(r["wall"] for r in results)
        merge = statistics.median(r.get("merge", r["wall"]) for r in results)
        start = statistics.median(r.get("start", 0.0) for r in results)
        rss = "; ".join(f"{r['rss'] / 1e9:.2f}" + (
            " (" + ", ".join(f"{w / 1e9:.2f}" for w in r["workers"]) + ")"
            if r.get("workers") else "") for r in results)
        same = "" if name == "local" else str(all(r["same"] for r in results))
        print(f"| {method} | {name} | {wall:.1f} | {merge:.1f} | {start:.1f} | {rss} | {same} |")
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


def _script(workdir: Path, family: Path, method: str) -> Path:
    fts = sorted(p.name for p in family.iterdir() if p.name.startswith("ft"))
    lines = [f'base = model("{family / "base"}")']
    lines += [f'{ft} = model("{family / ft}")' for ft in fts]
    deltas = ", ".join(f"{ft} - base" for ft in fts)
    lines.append("set seed = 0")
    lines.append("output " + SCRIPTS[method].format(deltas=deltas))
    path = workdir / f"{method}.merge"
    path.write_text("\n".join(lines) + "\n")
    return path


def _local(script: Path, out: Path, shard_size: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "mergelang", "run", str(script), "-o",
                              str(out), "--quiet", "--shard-size", shard_size])
    _, status, usage = os.wait4(child.pid, 0)
    if status:
        raise SystemExit(f"mergelang run failed ({status})")
    return {"wall": time.perf_counter() - start, "rss": usage.ru_maxrss * 1024}


def _cluster(script: Path, out: Path, workers: int, shard_size: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--family", ".", "--shard-size",
                            shard_size, "--child", str(script), str(out), str(workers)],
                           capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the cluster run failed:\n{child.stderr[-3000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    return result


def _child(script: str, out: str, workers: str, shard_size: str) -> int:
    import resource

    import mergelang
    from mergelang.cluster import Cluster

    program = mergelang.load(script)
    started = time.perf_counter()
    with Cluster(workers=int(workers)) as cluster:
        cluster.client.run(lambda: bool(__import__("mergelang.api")))  # imports: start-up
        ready = time.perf_counter()
        program.run(out, shard_size=shard_size, cluster=cluster)
        done = time.perf_counter()
        peaks = cluster.client.run(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"start": ready - started, "merge": done - ready,
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "workers": sorted(peaks.values())}))
    return 0


def _same(one: Path, two: Path) -> bool:
    names = sorted(p.name for p in one.iterdir())
    if names != sorted(p.name for p in two.iterdir()):
        return False
    return all(_file_equal(one / n, two / n) for n in names)


def _file_equal(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as f, open(b, "rb") as g:
        while True:
            x, y = f.read(1 << 24), g.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


if __name__ == "__main__":
    sys.exit(main())
