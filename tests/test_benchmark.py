"""Smoke test of benchmarks/run.py on a tiny family (mergelang only)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("run", "families", "io_floor"):
        sys.modules.pop(name, None)
    import run

    yield run
    for name in ("run", "families", "io_floor"):
        sys.modules.pop(name, None)


def test_benchmark_tiny_family(bench_run, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--hidden", "64", "--layers", "2", "--inter", "128",
            "--vocab", "256", "--repeats", "1", "--mergekit", "none",
            "--methods", "linear,ties", "--shard-mb", "0.1"]
    assert bench_run.main(argv) == 0
    printed = capsys.readouterr().out
    assert "mergekit was not run" in printed
    assert "| linear" in printed and "| ties" in printed

    res = json.loads((tmp_path / "results.json").read_text())
    assert res["mergekit"]["path"] is None
    assert set(res["methods"]) == {"linear", "ties"}
    for entry in res["methods"].values():
        ml = entry["mergelang"]
        assert ml["failed"] == 0 and len(ml["runs"]) == 1
        assert ml["median_wall_s"] > 0 and ml["median_peak_rss_gb"] > 0
        assert "mergekit" not in entry
    assert res["env"]["loadavg_before"] and res["env"]["loadavg_after"]

    # the family: HF folders with sharded safetensors, regenerated only when needed
    fam = Path(res["family"]["path"])
    index = json.loads((fam / "ft0" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    config = json.loads((fam / "base" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 2
    stamp = (fam / "base" / "config.json").stat().st_mtime_ns
    spec = bench_run.FamilySpec(hidden=64, layers=2, inter=128, vocab=256, n_ft=3, shard_mb=0.1)
    bench_run.ensure_family(spec, fam, log=lambda *_: None)
    assert (fam / "base" / "config.json").stat().st_mtime_ns == stamp


def test_family_is_deterministic(bench_run, tmp_path):
    from families import FamilySpec, make_tensor

    spec = FamilySpec(hidden=64, layers=1, inter=128, vocab=256, n_ft=2)
    a = make_tensor(spec, "ft1", "model.layers.0.mlp.up_proj.weight", (128, 64))
    b = make_tensor(spec, "ft1", "model.layers.0.mlp.up_proj.weight", (128, 64))
    base = make_tensor(spec, "base", "model.layers.0.mlp.up_proj.weight", (128, 64))
    assert a.equal(b)
    delta = a - base
    assert 0 < (delta.abs() > 0.01).float().mean() < 0.05  # sparse larger entries
