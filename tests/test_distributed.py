"""A merge on a Dask cluster (mergelang.cluster): the same bytes as a local run whatever
the workers, the partition and the order tasks finish in; a worker killed mid-task; errors
on a worker as located diagnostics; nothing left behind by a failed or interrupted run.

One cluster of two worker processes serves the module (starting one costs seconds); the
worker counts 1 and 3 use clusters of threads, which start at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mergelang
from mergelang.cli import main
from mergelang.execute import Collector, execute
from mergelang.sweep import Sweep
from tests.helpers import SWEEP_SCRIPT as SWEPT
from tests.helpers import SWEEP_TASKS, compile_in, small_tensors, write_hf_folder, write_model
from tests.helpers import SweepStub as Stub

distributed = pytest.importorskip("distributed")

from mergelang.cluster import Cluster  # noqa: E402

LAYERS = 3


def tied_state(seed: int) -> dict[str, torch.Tensor]:
    """Llama-named tensors on a coarse grid: magnitudes tie within and across tensors (the
    hard case for a whole-model top-k), plus an integer buffer copied as it is."""
    g = torch.Generator().manual_seed(seed)

    def grid(*shape: int) -> torch.Tensor:
        return torch.randint(-6, 7, shape, generator=g).float() / 4

    state = {"model.embed_tokens.weight": grid(16, 8)}
    for i in range(LAYERS):
        state[f"model.layers.{i}.self_attn.q_proj.weight"] = grid(8, 8)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = grid(24, 8)
        state[f"model.layers.{i}.input_layernorm.weight"] = grid(8)
    state["model.norm.weight"] = grid(8)
    state["lm_head.weight"] = grid(16, 8)
    state["model.rotary.positions"] = torch.arange(8)
    return state


MERGES = {
    "ties_model": 'base + ties(a - base, b - base, c - base, density=0.3, scope="model")',
    "dare_ties": "base + dare_ties(a - base, b - base, c - base, density=0.4)",
    "norm_and_trim": 'base + trim(a - base, 0.25, "model") / norm(b - base, scope="model")',
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("base", "a", "b", "c")):
        write_model(root / name, tied_state(seed))
    return root


def program_in(folder: Path, models: Path, merge: str) -> mergelang.Program:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "merge.merge"
    script.write_text("set seed = 7\n" + "".join(
        f'{n} = model("{models / n}")\n' for n in ("base", "a", "b", "c")) + f"output {merge}\n")
    return mergelang.load(script)


def same_folders(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def no_leftovers(out: Path) -> None:
    """Neither the output nor its temporary folder (nor its lock)."""
    assert not out.exists()
    left = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert left == [], [str(p) for p in sorted(left[0].rglob("*"))] if left else None


@pytest.fixture(scope="module")
def processes():
    """A scheduler and two worker processes on loopback, one thread each."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", memory_limit=0,
                                  silence_logs=logging.ERROR) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def threads():
    """Clusters of worker threads in this process: 1 and 3 workers."""
    made = {n: distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=False,
                                        dashboard_address=":0", silence_logs=logging.ERROR)
            for n in (1, 3)}
    yield made
    for cluster in made.values():
        cluster.close()


@pytest.mark.parametrize("merge", MERGES)
def test_same_bytes_as_a_local_run_whatever_the_workers_and_partition(
        tmp_path, models, processes, threads, merge):
    program = program_in(tmp_path, models, MERGES[merge])
    local = tmp_path / "local"
    program.run(local, shard_size="1KB")
    clusters = [(processes, None, "192MB"), (threads[1], 1, "192MB"),
                (threads[3], 10**9, "2KB")]  # a shard a task; a tensor a task; one task
    for i, (cluster, task_size, memory) in enumerate(clusters[-1:] if merge == "norm_and_trim"
                                                     else clusters):
        out = tmp_path / f"out{i}"
        done: list[str] = []
        with Cluster(cluster.scheduler_address, task_size=task_size) as c:
            warnings = program.run(out, shard_size="1KB", max_memory=memory, cluster=c,
                                   progress=lambda t, done=done: done.append(t.name))
        assert warnings == []
        same_folders(local, out)
        assert sorted(done) == sorted(t.name for t in program.plan().tensors)
    assert len(list(local.glob("*.safetensors"))) > 3


def _warm() -> bool:
    return bool(__import__("mergelang.cluster.tasks"))


def _arm(marker: str) -> None:
    """In a worker: the first shard write on any worker kills that worker's process."""
    from mergelang.io import write

    original = write.ShardedWriter.write_rows

    def dying(self, name, row0, part):
        original(self, name, row0, part)
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    write.ShardedWriter.write_rows = dying


def test_a_worker_killed_mid_task_is_replaced_and_the_output_is_the_same(
        tmp_path, models, processes):
    program = program_in(tmp_path, models, MERGES["ties_model"])
    local = tmp_path / "local"
    program.run(local, shard_size="1KB")
    marker = tmp_path / "killed"
    with distributed.Client(processes, set_as_default=False) as client:
        before = set(client.run(os.getpid).values())
        client.run(_arm, str(marker))
        with Cluster(processes.scheduler_address) as c:
            program.run(tmp_path / "out", shard_size="1KB", cluster=c)
        assert marker.exists()
        client.wait_for_workers(2, timeout=120)
        assert set(client.run(os.getpid).values()) != before  # one was replaced
        client.run(_warm)  # the new one imports now, not in the next test's run
    same_folders(local, tmp_path / "out")


def test_a_task_whose_workers_keep_dying_is_a_diagnostic(tmp_path, models):
    import dask

    program = program_in(tmp_path, models, MERGES["dare_ties"])
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=":0", memory_limit=0,
                                     silence_logs=logging.ERROR) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        client.run(_arm, str(tmp_path / "killed"))
        with Cluster(cluster.scheduler_address) as c, \
                pytest.raises(mergelang.MergeError) as caught:
            program.run(tmp_path / "out", shard_size="1KB", cluster=c)
    [d] = caught.value.diagnostics
    assert "was lost with its Dask worker too many times" in d.message
    assert "--max-memory" in d.hint
    no_leftovers(tmp_path / "out")


def test_an_error_on_a_worker_is_a_located_diagnostic_and_nothing_is_left(
        tmp_path, models, processes, capsys):
    # an integer tensor that differs between the models is found only when it is read,
    # which happens on a worker
    for name, offset in (("x", 0), ("y", 1)):
        write_model(tmp_path / name, {"w": torch.ones(4, 2), "ids": torch.arange(3) + offset})
    script = tmp_path / "bad.merge"
    script.write_text('x = model("x")\ny = model("y")\noutput x + y\n')
    out = tmp_path / "out"
    assert main(["run", str(script), "-o", str(out), "--quiet",
                 "--scheduler", processes.scheduler_address]) == 2
    err = capsys.readouterr().err
    assert f"{script}:3:8" in err and '"ids"' in err and "not a float tensor" in err
    assert "Traceback" not in err
    no_leftovers(out)


def test_an_interrupted_run_leaves_nothing(tmp_path, models, processes):
    program = program_in(tmp_path, models, MERGES["dare_ties"])
    out = tmp_path / "out"

    def stop(tensor) -> None:
        raise KeyboardInterrupt

    with Cluster(processes.scheduler_address) as c, pytest.raises(KeyboardInterrupt):
        program.run(out, shard_size="1KB", cluster=c, progress=stop)
    no_leftovers(out)


def test_a_worker_that_sees_other_models_is_a_diagnostic(tmp_path, processes):
    own = tmp_path / "models"
    for seed, name in enumerate(("base", "a", "b", "c")):
        write_model(own / name, tied_state(seed))
    program = program_in(tmp_path, own, "a + b")

    def change(plan) -> None:  # once the client has planned: another shape for the workers
        for seed, name in enumerate(("base", "a", "b", "c")):
            state = tied_state(seed)
            state["lm_head.weight"] = torch.zeros(3, 3)
            (own / name / "model.safetensors").unlink()
            (own / name).rmdir()
            write_model(own / name, state)

    with Cluster(processes.scheduler_address) as c, \
            pytest.raises(mergelang.MergeError) as caught:
        program.run(tmp_path / "out", cluster=c, on_plan=change)
    [d] = caught.value.diagnostics
    assert 'plans tensor "lm_head.weight" differently' in d.message, d.message
    assert "[3, 3] float32, not [16, 8] float32" in d.message
    assert d.notes[0].startswith("on the Dask worker tcp://127.0.0.1:")
    no_leftovers(tmp_path / "out")


def test_the_device_is_checked_on_the_workers_not_here(tmp_path, models, processes,
                                                       monkeypatch):
    """The workers compute, so their devices count: a client without the device (here,
    one whose check refuses every device) still runs the merge there, and a device the
    workers lack is a diagnostic that names a worker, before anything is written."""
    program = program_in(tmp_path, models, "a")

    def nothing_here(device: str):
        raise mergelang.MergeError(mergelang.Diagnostic(f'device "{device}" is not here'))
    monkeypatch.setattr(mergelang.api, "parse_devices", nothing_here)
    with pytest.raises(mergelang.MergeError, match="is not here"):
        program.run(tmp_path / "local", "cpu")
    with Cluster(processes.scheduler_address) as c:
        program.run(tmp_path / "out", "cpu", cluster=c)
        assert (tmp_path / "out" / "model.safetensors").exists()
        with pytest.raises(mergelang.MergeError) as caught:
            program.run(tmp_path / "gpu", "cuda:99", cluster=c)
    d = caught.value.diagnostics[0]
    assert 'device "cuda:99"' in d.message and d.hint
    assert d.notes[0].startswith("on the Dask worker tcp://127.0.0.1:")
    no_leftovers(tmp_path / "gpu")


@pytest.mark.parametrize(("flags", "says"), [
    (["--workers", "0"], "--workers must be a whole number of at least 1"),
    (["--scheduler", "tcp://127.0.0.1:1"], "cannot reach the Dask scheduler"),
    (["--scheduler", "nonsense"], 'invalid scheduler address "nonsense"'),
])
def test_cluster_options_that_cannot_work_are_diagnostics(tmp_path, models, capsys, flags,
                                                          says):
    program_in(tmp_path, models, "a")
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "merge.merge"), "-o", str(out), "--quiet",
                 *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    no_leftovers(out)


def test_without_dask_the_cluster_options_say_what_to_install(tmp_path, models, capsys,
                                                              monkeypatch):
    program_in(tmp_path, models, "a")
    monkeypatch.setitem(sys.modules, "distributed", None)  # import fails
    assert main(["run", str(tmp_path / "merge.merge"), "-o", str(tmp_path / "out"),
                 "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "mergelang[cluster]"' in err and "Traceback" not in err


def test_the_command_starts_a_local_cluster_with_workers(tmp_path, models, capsys,
                                                         monkeypatch):
    # the cluster's workers are made threads here (the module's cluster tests processes)
    made: list[dict] = []
    real = distributed.LocalCluster

    def local(**kwargs):
        made.append(kwargs)
        return real(**{**kwargs, "processes": False})

    monkeypatch.setattr(distributed, "LocalCluster", local)
    program = program_in(tmp_path, models, MERGES["ties_model"])
    program.run(tmp_path / "local", shard_size="1KB")
    threads = torch.get_num_threads()
    try:
        assert main(["run", str(tmp_path / "merge.merge"), "-o", str(tmp_path / "out"),
                     "--workers", "2", "--shard-size", "1KB"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert made[0]["n_workers"] == 2 and made[0]["processes"] is True
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().err
    same_folders(tmp_path / "local", tmp_path / "out")


def test_the_command_on_a_scheduler_and_worker_started_as_commands(tmp_path, models, capsys):
    """`dask scheduler` and `dask worker` as a user starts them, on loopback; the client
    finds the scheduler through its scheduler file."""
    dask = Path(sys.executable).with_name("dask")
    if not dask.exists():
        pytest.skip("the dask command is not installed beside this Python")
    file = tmp_path / "scheduler.json"
    started = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0",
                                 "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                                 str(file)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        started.append(subprocess.Popen([str(dask), "worker", "--scheduler-file", str(file),
                                         "--nthreads", "1", "--no-dashboard"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with distributed.Client(scheduler_file=str(file), set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
        program = program_in(tmp_path, models, MERGES["ties_model"])
        program.run(tmp_path / "local", shard_size="1KB")
        assert main(["run", str(tmp_path / "merge.merge"), "-o", str(tmp_path / "out"),
                     "--shard-size", "1KB", "--scheduler", str(file)]) == 0
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)
    err = capsys.readouterr().err
    assert "Dask dashboard: http://127.0.0.1:" in err
    same_folders(tmp_path / "local", tmp_path / "out")


@pytest.fixture
def lerp(tmp_path: Path) -> Path:
    """test_sweep's script: base + scale * lam * (a - base), which is lam everywhere."""
    shape = small_tensors()
    write_hf_folder(tmp_path / "models" / "base", {k: v * 0 for k, v in shape.items()})
    write_hf_folder(tmp_path / "models" / "a", {k: v * 0 + 1 for k, v in shape.items()})
    path = tmp_path / "lerp.merge"
    path.write_text(SWEPT)
    return path


def results_of(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({json.dumps(r["params"], sort_keys=True) for r in lines}) == len(lines)
    return {json.dumps(r["params"], sort_keys=True): r for r in lines}


def test_a_grid_sweep_on_the_cluster_scores_what_a_local_one_does_and_resumes(
        tmp_path, lerp, processes):
    space = {"lam": [0.0, 0.25, 0.5, 0.75, 1.0], "scale": [1.0, 0.5]}
    Sweep(lerp, space, SWEEP_TASKS, tmp_path / "local.jsonl", scorer=Stub()).run()
    first = {"lam": space["lam"][:2], "scale": space["scale"]}  # a sweep stopped early
    Sweep(lerp, first, SWEEP_TASKS, tmp_path / "r.jsonl", scorer=Stub()).run()
    seen: list[bool] = []
    with Cluster(processes.scheduler_address) as c:
        Sweep(lerp, space, SWEEP_TASKS, tmp_path / "r.jsonl", scorer=Stub()).run(
            on_point=lambda record, new: seen.append(new), cluster=c)
    assert sorted(seen) == [False] * 4 + [True] * 6  # only the missing points were scored
    assert results_of(tmp_path / "r.jsonl") == results_of(tmp_path / "local.jsonl")


def test_a_sweep_checks_the_device_before_any_point(tmp_path, lerp, processes):
    """Locally here, on the workers with a cluster: a device nobody has stops the sweep
    before a point is merged, and nothing is written to the results."""
    space = {"lam": [0.0, 1.0], "scale": [1.0]}
    results = tmp_path / "r.jsonl"
    with pytest.raises(mergelang.MergeError, match='device "cuda:99"'):
        Sweep(lerp, space, SWEEP_TASKS, results, device="cuda:99", scorer=Stub()).run()
    with Cluster(processes.scheduler_address) as c, \
            pytest.raises(mergelang.MergeError, match='device "cuda:99"') as caught:
        Sweep(lerp, space, SWEEP_TASKS, results, device="cuda:99", scorer=Stub()).run(
            cluster=c)
    assert caught.value.diagnostics[0].notes[0].startswith("on the Dask worker")
    assert not results.exists() or results.read_text() == ""


def test_a_parallel_search_scores_distinct_points_and_resumes(tmp_path, lerp, threads):
    pytest.importorskip("optuna")
    space = {"lam": [i / 10 for i in range(11)], "scale": [1.0, 0.5, 0.25]}
    results = tmp_path / "r.jsonl"
    with Cluster(threads[3].scheduler_address) as c:
        for trials in (5, 5, 8):
            Sweep(lerp, space, SWEEP_TASKS, results, scorer=Stub()).run(
                "tpe", trials=trials, seed=1, cluster=c)
            assert len(results_of(results)) == trials  # each point once; a rerun adds none
    best = Sweep(lerp, space, SWEEP_TASKS, results, objective="up", scorer=Stub()).best()
    assert best.scores["up"] == pytest.approx(best.params["lam"] * best.params["scale"])


def test_the_sweep_command_refuses_a_bad_scheduler(tmp_path, lerp, capsys):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in SWEEP_TASKS))
    assert main(["sweep", str(lerp), "-D", "lam=[0,1]", "--tasks", str(tasks), "--results",
                 str(tmp_path / "r.jsonl"), "--quiet", "--scheduler", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert 'invalid scheduler address "nonsense"' in err and "Traceback" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_a_model_wide_sum_is_fed_once_when_a_selection_sweeps_twice(tmp_path):
    # the model-wide sweep runs as often as its longest reduction needs: a norm must not
    # be summed again in the second sweep of a whole-model trim
    state = tied_state(1)
    base = {n: torch.zeros_like(t) if t.is_floating_point() else t for n, t in state.items()}
    got = []
    for i, extra in enumerate(("", ' + 0 * trim(a - base, 0.5, "model")')):
        program = compile_in(tmp_path / str(i), 'base = model("base")\na = model("a")\n'
                             f'output base + norm(a - base, scope="model"){extra}\n',
                             base=base, a=state)
        with program.plan() as p:
            results = Collector(p.tensors)
            execute(p, results.sink)
        got.append(results.tensors["model.norm.weight"])
    floats = torch.cat([t.reshape(-1) for t in state.values() if t.is_floating_point()])
    assert torch.allclose(got[0], floats.norm().expand_as(got[0]))
    assert torch.equal(got[0], got[1])
