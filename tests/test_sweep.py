"""`mergelang sweep`: the grid, the results file and resuming from it, searches, the
objective, the kept best merge and the plot.

Most tests score with a stub through the documented hook (`Sweep(..., scorer=...)`),
on models made so that the score is known: `base` is all zeros and `a` all ones, so
`base + lam * (a - base)` is `lam` everywhere, and the stub scores task "up" as `lam` and
task "down" as `1 - lam`. Model quality does not matter there; the real scorer is used
where it does (see the test on the example skill models).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.cli import main
from mergelang.sweep import Sweep
from mergelang.sweep_output import keep_best, plot
from tests.helpers import SWEEP_SCRIPT as SCRIPT
from tests.helpers import SWEEP_TASKS as TASKS
from tests.helpers import SweepStub as Stub
from tests.helpers import assert_error, small_tensors, write_hf_folder
from tests.helpers import mergelang as cli

ROOT = Path(__file__).resolve().parent.parent
@pytest.fixture
def script(tmp_path: Path) -> Path:
    shape = small_tensors()
    write_hf_folder(tmp_path / "models" / "base", {k: v * 0 for k, v in shape.items()})
    write_hf_folder(tmp_path / "models" / "a", {k: v * 0 + 1 for k, v in shape.items()})
    path = tmp_path / "lerp.merge"
    path.write_text(SCRIPT)
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_grid_scores_every_point_and_writes_one_line_each(script, tmp_path):
    results = tmp_path / "r.jsonl"
    stub = Stub()
    sweep = Sweep(script, {"lam": [0.0, 0.25, 1.0], "scale": [1.0]}, TASKS, results,
                  scorer=stub)
    assert sweep.size == 3
    seen = []
    records = sweep.run(on_point=lambda r, new: seen.append((r.params["lam"], new)))
    assert seen == [(0.0, True), (0.25, True), (1.0, True)]
    assert lines(results) == [
        {"params": {"lam": lam, "scale": 1.0}, "scores": {"up": lam, "down": 1 - lam},
         "objective": 0.5} for lam in (0.0, 0.25, 1.0)]
    assert [r.objective for r in records] == [0.5, 0.5, 0.5]
    model, like = stub.calls[0]
    assert isinstance(model, dict) and Path(like) == tmp_path / "models" / "base"  # in memory


def test_running_again_skips_the_finished_points(script, tmp_path):
    results = tmp_path / "r.jsonl"
    Sweep(script, {"lam": [0.0, 0.5]}, TASKS, results, scorer=Stub()).run()
    stub = Stub()
    seen = []
    Sweep(script, {"lam": [0.0, 0.5, 1.0]}, TASKS, results, scorer=stub).run(
        on_point=lambda r, new: seen.append(new))
    assert seen == [False, False, True] and len(stub.calls) == 1
    assert [x["params"]["lam"] for x in lines(results)] == [0.0, 0.5, 1.0]
    # a point is finished only if it has every task asked for
    stub = Stub()
    more = [*TASKS, {"task": "other", "prompt": "x", "answer": "y"}]
    with pytest.raises(KeyError):  # the stub knows no "other": proof it was asked
        Sweep(script, {"lam": [0.0]}, more, results, scorer=stub).run()


def test_a_killed_sweep_resumes_where_it_stopped(script, tmp_path):
    """A real process, killed while it scores its third point; the rerun does the four
    points left and no other."""
    results = tmp_path / "r.jsonl"
    space = {"lam": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
    program = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from tests.helpers import SWEEP_TASKS as TASKS, SweepStub as Stub
from mergelang.sweep import Sweep

class Stalls(Stub):  # the third point never finishes
    def __call__(self, model, tasks, **kw):
        if len(self.calls) == 2:
            time.sleep(600)
        return super().__call__(model, tasks, **kw)

Sweep({str(script)!r}, {space!r}, TASKS, {str(results)!r}, scorer=Stalls()).run()
"""
    proc = subprocess.Popen([sys.executable, "-c", program], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while (not results.exists() or len(results.read_text().splitlines()) < 2) \
                and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # well into the third point
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [x["params"]["lam"] for x in lines(results)] == [0.0, 0.2]
    stub = Stub()
    Sweep(script, space, TASKS, results, scorer=stub).run()
    assert [x["params"]["lam"] for x in lines(results)] == space["lam"]
    assert len(stub.calls) == 4


def test_an_unfinished_last_line_is_dropped_and_a_bad_line_is_located(script, tmp_path):
    results = tmp_path / "r.jsonl"
    good = json.dumps({"params": {"lam": 0.0}, "scores": {"up": 0.0, "down": 1.0},
                       "objective": 0.5})
    results.write_text(good + "\n" + '{"params": {"lam": 0.5}, "sco')
    sweep = Sweep(script, {"lam": [0.0, 0.5]}, TASKS, results, scorer=Stub())
    assert sweep.results.dropped and results.read_text() == good + "\n"
    sweep.run()
    assert len(lines(results)) == 2
    results.write_text(good + "\nnot json\n" + good + "\n")
    with pytest.raises(mergelang.MergeError) as caught:
        Sweep(script, {"lam": [0.0]}, TASKS, results, scorer=Stub())
    (d,) = caught.value.diagnostics
    assert (d.span.file, d.span.line) == (str(results), 2)
    assert "is not a sweep result" in d.message


def test_a_search_is_seeded_and_resumes_from_the_results(script, tmp_path):
    pytest.importorskip("optuna")
    space = {"lam": [i / 10 for i in range(11)], "scale": [1.0, 0.5]}
    found = {}
    for kind in ("random", "tpe"):
        runs = []
        for attempt in range(2):
            results = tmp_path / f"{kind}{attempt}.jsonl"
            Sweep(script, space, TASKS, results, scorer=Stub()).run(kind, trials=5, seed=3)
            runs.append([x["params"] for x in lines(results)])
        assert runs[0] == runs[1] and len({json.dumps(p) for p in runs[0]}) == 5
        found[kind] = runs[0]
        stub = Stub()  # a rerun of a finished search does nothing
        Sweep(script, space, TASKS, tmp_path / f"{kind}0.jsonl", scorer=stub).run(
            kind, trials=5, seed=3)
        assert stub.calls == []
        stub = Stub()  # asking for more goes on from the history
        Sweep(script, space, TASKS, tmp_path / f"{kind}0.jsonl", scorer=stub).run(
            kind, trials=7, seed=3)
        assert len(stub.calls) == 2 and len(lines(tmp_path / f"{kind}0.jsonl")) == 7
    assert all(p["lam"] in space["lam"] for p in found["tpe"])  # always grid values


def test_cma_and_a_search_of_a_small_space_stop_when_it_is_exhausted(script, tmp_path):
    pytest.importorskip("optuna")
    pytest.importorskip("cmaes")
    results = tmp_path / "r.jsonl"
    stub = Stub()
    Sweep(script, {"lam": [0.0, 0.5, 1.0], "scale": [1.0, 0.5]}, TASKS, results,
          scorer=stub).run("cma", trials=50, seed=0)
    assert len(lines(results)) == 6 and len(stub.calls) == 6


def test_the_objective_chooses_the_best_point(script, tmp_path):
    results = tmp_path / "r.jsonl"
    space = {"lam": [0.0, 0.25, 0.5, 1.0]}
    Sweep(script, space, TASKS, results, scorer=Stub()).run()
    best = {o: Sweep(script, space, TASKS, results, objective=o, scorer=Stub()).best()
            for o in ("mean", "min", "up", "down")}
    assert best["min"].params["lam"] == 0.5 and best["min"].objective == 0.5
    assert best["up"].params["lam"] == 1.0 and best["down"].params["lam"] == 0.0
    assert best["mean"].params["lam"] == 0.0  # all tie at 0.5: the first point wins
    with pytest.raises(mergelang.MergeError, match='did you mean "down"'):
        Sweep(script, space, TASKS, results, objective="dwn", scorer=Stub())


def test_keep_best_writes_the_script_with_its_values_and_the_merged_model(script, tmp_path):
    results = tmp_path / "r.jsonl"
    sweep = Sweep(script, {"lam": [0.0, 0.5, 1.0], "scale": [1.0, 0.5]}, TASKS, results,
                  objective="min", scorer=Stub())
    sweep.run()
    out = tmp_path / "kept" / "best"
    kept = keep_best(sweep, out)
    assert kept.script == tmp_path / "kept" / "best.merge" and kept.warnings == []
    text = kept.script.read_text()
    assert "param lam = 0.5\n" in text and "param scale = 1.0\n" in text
    assert 'model("../models/base")' in text  # rewritten for the script's new folder
    assert "# interpolate from base towards a" in text  # comments kept
    program = mergelang.load(kept.script)
    assert program.params == {"lam": 0.5, "scale": 1.0}
    merged = load_file(str(out / "model.safetensors"))
    assert torch.all(merged["model.norm.weight"] == 0.5)
    assert text in (out / "README.md").read_text()
    with pytest.raises(mergelang.MergeError, match="already exists"):
        keep_best(sweep, out)
    keep_best(sweep, out, force=True)


def test_a_large_merge_is_scored_through_a_temporary_folder(script, tmp_path):
    stub = Stub()
    Sweep(script, {"lam": [0.25]}, TASKS, tmp_path / "r.jsonl", scorer=stub,
          in_memory_bytes=0).run()
    (model, like), = stub.calls
    assert isinstance(model, Path) and like is None
    assert not model.exists()  # removed after scoring
    assert lines(tmp_path / "r.jsonl")[0]["scores"]["up"] == 0.25


def test_a_bad_value_stops_the_sweep_before_any_merge(script, tmp_path):
    stub = Stub()
    bad = script.read_text().replace("scale * lam * (a - base)",
                                     "ties(a - base, density=lam)")
    script.write_text(bad)
    with pytest.raises(mergelang.MergeError, match=r"density must be in \[0, 1\]"):
        Sweep(script, {"lam": [0.5, 0.75, 1.5]}, TASKS, tmp_path / "r.jsonl", scorer=stub)
    with pytest.raises(mergelang.MergeError, match='unknown parameter "lamb"'):
        Sweep(script, {"lamb": [0.5]}, TASKS, tmp_path / "r.jsonl", scorer=stub)
    assert stub.calls == [] and not (tmp_path / "r.jsonl").exists()


def test_plot_draws_a_png(script, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the plot extra)")
    sweep = Sweep(script, {"lam": [0.0, 0.5, 1.0], "scale": [1.0, 0.5]}, TASKS,
                  tmp_path / "r.jsonl", scorer=Stub())
    sweep.run()
    path = plot(sweep, tmp_path / "scores.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "where", "points_at", "words"), [
    (["-D", "lam=0.9:0.1:0.1"], "<command line>:1:8", "0.9:0.1:0.1", "is empty"),
    (["-D", "lam=0:1"], "<command line>:1:8", "0:1", "a range is start:stop:step"),
    (["-D", "lamda=[0.1,0.2]"], "<command line>:1:4", "lamda", 'did you mean "lam"?'),
    (["-D", "lam=[0.1,high]"], "<command line>:1:13", "high", "not the string \"high\""),
])
def test_bad_sweep_values_are_located_errors(script, tmp_path, capsys, args, where, points_at,
                                             words):
    (tmp_path / "t.jsonl").write_text(json.dumps(TASKS[0]) + "\n")
    result = cli(capsys, "sweep", script, *args, "--tasks", tmp_path / "t.jsonl",
                 "--results", tmp_path / "r.jsonl")
    assert_error(result, where, points_at, words)
    assert not (tmp_path / "r.jsonl").exists()


def test_the_results_folder_must_exist(script, tmp_path):
    with pytest.raises(mergelang.MergeError, match="does not exist"):
        Sweep(script, {"lam": [0.5]}, TASKS, tmp_path / "nowhere" / "r.jsonl", scorer=Stub())


def test_the_command_resumes_a_finished_sweep_and_keeps_its_best(script, tmp_path, capsys):
    """Every point is in the results file already, so the command merges only the best."""
    tasks, results = tmp_path / "t.jsonl", tmp_path / "r.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    Sweep(script, {"lam": [0.0, 0.5, 1.0]}, [tasks], results, scorer=Stub()).run()
    before = results.read_text()
    args = ["sweep", str(script), "-D", "lam=[0,0.5,1]", "--tasks", str(tasks), "--results",
            str(results), "--objective", "min", "--keep-best", str(tmp_path / "best"),
            "--quiet"]
    if importlib.util.find_spec("matplotlib") is not None:
        args += ["--plot", str(tmp_path / "scores.png")]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "best: lam=0.5  objective 0.5" in shown and "objective (min)" in shown
    assert results.read_text() == before  # nothing merged again
    assert "param lam = 0.5\n" in (tmp_path / "best.merge").read_text()
    assert (tmp_path / "best" / "model.safetensors").exists()
    assert "--plot" not in args or (tmp_path / "scores.png").exists()


def test_a_sweep_of_the_example_models_with_the_real_scorer(tmp_path, capsys):
    """The command as a user runs it: merged in memory and scored by mergelang.eval; the
    kept model, scored from its folder, has the scores its line in the results file has."""
    from mergelang.eval import score

    models, task_dir = ROOT / "examples" / "models", ROOT / "examples" / "tasks"
    tasks = tmp_path / "tasks.jsonl"  # a few prompts of each skill, to stay fast
    picked = [line for name in ("math", "code")
              for line in (task_dir / f"{name}.jsonl").read_text().splitlines()[:4]]
    tasks.write_text("\n".join(picked) + "\n")
    script = tmp_path / "tune.merge"
    script.write_text(f'param density = 0.2\nbase = model("{models}/base")\n'
                      f'math = model("{models}/math")\ncode = model("{models}/code")\n'
                      "output base + ties(math - base, code - base, density=density)\n")
    results, best = tmp_path / "r.jsonl", tmp_path / "best"
    assert main(["sweep", str(script), "-D", "density=[0.3,1.0]", "--tasks", str(tasks),
                 "--results", str(results), "--keep-best", str(best), "--quiet"]) == 0
    found = lines(results)
    assert [x["params"] for x in found] == [{"density": 0.3}, {"density": 1.0}]
    assert all(set(x["scores"]) == {"math", "code"} for x in found)
    kept = max(found, key=lambda x: x["objective"])  # the first on a tie, as the sweep
    again = {r["task"]: r["exact_match"] for r in score(best, [tasks])}
    assert again == kept["scores"]
    assert mergelang.load(tmp_path / "best.merge").params == kept["params"]


def test_a_missing_task_file_or_a_lone_trials_is_an_error(script, tmp_path, capsys):
    result = cli(capsys, "sweep", script, "-D", "lam=[0,1]", "--tasks", tmp_path / "no.jsonl",
                 "--results", tmp_path / "r.jsonl")
    assert_error(result, None, None, "task file not found", str(tmp_path / "no.jsonl"))
    result = cli(capsys, "sweep", script, "--tasks", tmp_path / "no.jsonl", "--results",
                 tmp_path / "r.jsonl", "--trials", "3")
    assert_error(result, None, None, "--trials is for a search", hint="--search random")
    assert not (tmp_path / "r.jsonl").exists()
