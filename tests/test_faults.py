"""Faults during a run (issue 11): signals, inputs changed underneath, two runs, a full disk.

Each test makes the fault happen for real: a child process is sent SIGTERM or SIGKILL
in the middle of a run, an input file is truncated or replaced while the merge reads it,
two runs write the same output, a small tmpfs fills up. Whatever happens, nothing that
looks like a finished model may appear, nothing may be left behind that a later run
does not clean up, and the user is told what happened (exit 2, 130 or 143).

"In the middle of a run" is made certain, not timed: the child is frozen (SIGSTOP) as
soon as its temporary output folder exists, the fault is applied, then it is resumed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelang import MergeError, api
from tests.helpers import assert_error, mergelang

PYTHON = sys.executable
TENSORS = 48
ROWS = 128


def _model(folder: Path, seed: int) -> Path:
    """A model of TENSORS float32 tensors (ROWS x 1024, 0.5 MB each) in one file."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file({f"model.layers.{i}.w": torch.randn(ROWS, 1024, generator=g)
               for i in range(TENSORS)}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.fixture
def work(tmp_path: Path, monkeypatch) -> Path:
    """tmp_path as the current folder, with models a and b and `merge.merge` over them."""
    _model(tmp_path / "a", 0)
    _model(tmp_path / "b", 1)
    (tmp_path / "merge.merge").write_text(
        'a = model("a")\nb = model("b")\noutput a * 0.25 + b * 0.75\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _hidden(folder: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


def _start(work: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "mergelang", "run", "merge.merge", "-o", "out",
                             "--quiet", "--max-memory", "1MB", *flags], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _frozen_mid_run(work: Path, child: subprocess.Popen) -> None:
    """Wait for the child's temporary output folder, then stop the child (SIGSTOP)."""
    deadline = time.monotonic() + 120
    while not any(".tmp-" in n for n in _hidden(work)):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            out, err = child.communicate()
            pytest.fail(f"the run ended before it was stopped: {child.returncode}\n{err}")
        time.sleep(0.001)
    child.send_signal(signal.SIGSTOP)
    assert not (work / "out").exists(), "the run finished before it was stopped"


def _resume(child: subprocess.Popen, *then: signal.Signals) -> tuple[int, str]:
    for sig in then:
        child.send_signal(sig)
    child.send_signal(signal.SIGCONT)
    out, err = child.communicate(timeout=300)
    return child.returncode, out + err


# --- signals -----------------------------------------------------------------------------


def test_sigterm_mid_run_cleans_up_and_exits_143(work):
    child = _start(work)
    _frozen_mid_run(work, child)
    code, text = _resume(child, signal.SIGTERM)
    assert code == 143, text
    assert "terminated; nothing was written" in text and "Traceback" not in text
    assert not (work / "out").exists()
    assert _hidden(work) == []


def test_sigint_mid_run_cleans_up_and_exits_130(work):
    child = _start(work)
    _frozen_mid_run(work, child)
    code, text = _resume(child, signal.SIGINT)
    assert code == 130, text
    assert "interrupted; nothing was written" in text
    assert _hidden(work) == [] and not (work / "out").exists()


def _interrupted_after(delay: float) -> tuple[subprocess.CompletedProcess, float]:
    """A run sent SIGINT `delay` s after it starts; one that Python itself was still
    starting (importing `site`, before any of mergelang's code: not mergelang's to
    handle) is tried again a little later."""
    for _ in range(10):
        child = subprocess.Popen([PYTHON, "-m", "mergelang", "run", "merge.merge", "-o",
                                  "out", "--quiet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=120)
        if "init_import_site" not in err:
            return subprocess.CompletedProcess(child.args, child.returncode, out, err), delay
        delay += 0.1
    pytest.fail("Python never got past its own start-up before the signal")


@pytest.mark.parametrize("delay", [0.15, 0.4, 0.8, 1.5])
def test_sigint_during_start_up_is_a_message_and_130(work, delay):
    """Ctrl-C while the command still imports torch, parses the script or opens the
    headers (start-up takes over a second): the message, exit 130, no traceback and
    nothing written; a run already finished (a fast machine) exits 0."""
    child, delay = _interrupted_after(delay)
    err = child.stderr
    assert "Traceback" not in err, err
    if child.returncode == 0:
        assert (work / "out" / "model.safetensors").exists()
        return
    assert child.returncode == 130, err
    assert err.strip().endswith("interrupted; nothing was written"), err
    assert sorted(p.name for p in work.iterdir()) == ["a", "b", "merge.merge"]


_CUT_IN_THE_WINDOW = """
import os, sys
from mergelang.io import ModelFileError, open_model
from mergelang.io.header import FileIdentity
path = sys.argv[1]
with open_model(path) as model:
    first, *_, last = sorted(model.tensors, key=lambda n: model.tensors[n].offset)
    model.load(first)  # the file is open (it was mapped, before reads were positioned)
    os.truncate(path, os.path.getsize(path) - 4096)
    # the file was cut short in the instant after the identity check: the check passes
    model.identities = {f: FileIdentity.of(os.stat(f)) for f in model.identities}
    try:
        model.load(last, view=True).sum()
    except ModelFileError as e:
        print(e.message)
        sys.exit(2)
"""


def test_a_file_cut_short_between_the_check_and_the_read_is_an_error_not_sigbus(work):
    """Reading a memory map of a file cut short killed the process with SIGBUS; reads
    now just come back short: exit 2 with the file named."""
    child = subprocess.run([PYTHON, "-c", _CUT_IN_THE_WINDOW, str(work / "a" /
                                                                   "model.safetensors")],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 2, (child.returncode, child.stderr)
    assert "model.safetensors ends at byte" in child.stdout
    assert "it was cut short while the merge read it" in child.stdout


def test_the_entry_point_guards_ctrl_c_before_importing_torch():
    """The guard is in place before the heavy imports: `import mergelang` and the
    start-up module import no third-party library."""
    code = ("import sys, mergelang.startup; "
            "print(sorted(m for m in ('torch', 'rich', 'lark', 'numpy') if m in sys.modules))")
    child = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.stdout.strip() == "[]", child.stderr


def test_what_sigkill_leaves_is_removed_by_the_next_run(work, capsys):
    child = _start(work)
    _frozen_mid_run(work, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    left = _hidden(work)
    assert [n for n in left if ".tmp-" in n] and not (work / "out").exists()
    result = mergelang(capsys, "run", "merge.merge", "-o", "out", "--quiet")
    assert result.code == 0, result.text
    stale = next(n for n in left if ".tmp-" in n)
    assert f"warning: removed {work / stale}" in result.text
    assert f"(process {child.pid}) that did not finish" in result.text
    assert _hidden(work) == []
    assert (work / "out" / "model.safetensors").is_file()


# --- two runs on one output ----------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(work, capsys):
    first = _start(work, "--force")
    _frozen_mid_run(work, first)
    try:
        second = mergelang(capsys, "run", "merge.merge", "-o", "out", "--quiet", "--force")
    finally:
        code, text = _resume(first)
    assert_error(second, None, None, f"another mergelang run (process {first.pid}) is "
                 "writing", hint="wait for it to finish")
    assert code == 0, text
    assert (work / "out" / "model.safetensors").is_file() and _hidden(work) == []
    again = mergelang(capsys, "run", "merge.merge", "-o", "out", "--quiet", "--force")
    assert again.code == 0, again.text  # once the first is done, --force replaces its output


# --- inputs changed while the merge reads them ---------------------------------------------


def _after_first_tensor(change) -> Iterator:
    """A progress callback that applies `change` once, after the first tensor is written
    (between tensors: no read of the inputs is in flight then)."""
    done = []

    def progress(tensor) -> None:
        if not done:
            done.append(tensor)
            change()
    return progress


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def _rewrite_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"  # the same header, other bytes in the last tensor
    with open(path, "r+b") as f:
        f.write(data)


def _replace(path: Path) -> None:
    other = path.with_name("other.safetensors")
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x7f\x7f\x7f\x7f"
    other.write_bytes(data)
    os.replace(other, path)


@pytest.mark.parametrize(("change", "words"), [
    pytest.param(lambda p: _truncate(p, p.stat().st_size // 2),
                 "its size went from", id="truncated-to-half"),
    pytest.param(lambda p: _truncate(p, 0), "its size went from", id="truncated-to-zero"),
    pytest.param(_rewrite_in_place, "changed while the merge was reading it",
                 id="rewritten-in-place"),
    pytest.param(_replace, "another file was put in its place", id="replaced"),
])
def test_an_input_changed_mid_run_stops_the_run_naming_the_file(work, change, words):
    weights = work / "b" / "model.safetensors"
    program = api.load(work / "merge.merge")
    with pytest.raises(MergeError) as caught:
        program.run(work / "out", max_memory="1MB",
                    progress=_after_first_tensor(lambda: change(weights)))
    text = caught.value.render()
    assert str(weights) in text and words in text, text
    assert "leave the input models unchanged" in text
    assert not (work / "out").exists() and _hidden(work) == []


def test_an_input_changed_after_its_last_read_still_discards_the_output(work):
    """The change comes after every tensor was read: the final check before the output
    is moved into place sees it."""
    weights = work / "a" / "model.safetensors"
    program = api.load(work / "merge.merge")
    tensors = []

    def progress(tensor) -> None:
        tensors.append(tensor)
        if len(tensors) == TENSORS:
            _rewrite_in_place(weights)

    with pytest.raises(MergeError, match="the output was discarded"):
        program.run(work / "out", progress=progress)
    assert not (work / "out").exists() and _hidden(work) == []


def test_an_input_truncated_while_the_command_runs_is_exit_2_naming_it(work):
    """The child is frozen mid-run and its input cut by one byte (a cut that cannot fault
    the pages it maps, so the outcome is certain); it must stop at its next read."""
    child = _start(work)
    _frozen_mid_run(work, child)
    weights = work / "b" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1)
    code, text = _resume(child)
    assert code == 2, text
    assert f"{weights} changed while the merge was reading it" in text
    assert "Traceback" not in text
    assert not (work / "out").exists() and _hidden(work) == []


# --- a full disk ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs, where this process may mount one; else the test is skipped."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip() or 'not permitted'})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_a_diagnostic_and_leaves_nothing(work, small_disk, capsys):
    out = small_disk / "out"  # the output (48 MB) cannot be reserved on a 2 MB disk
    result = mergelang(capsys, "run", "merge.merge", "-o", out, "--quiet")
    assert_error(result, None, None, "cannot reserve", "No space left on device",
                 hint="free some space")
    assert list(small_disk.iterdir()) == []


def test_a_disk_that_fills_while_writing_the_model_card_leaves_nothing(tmp_path, small_disk,
                                                                       capsys, monkeypatch):
    """The shard (2 MB less 40 KB, with the 24 KB script in its header) and config.json
    fit on the 2 MB disk; README.md, which holds the script again, does not."""
    folder = tmp_path / "m"
    folder.mkdir()
    weights = folder / "model.safetensors"
    save_file({"w": torch.zeros((2 * 2**20 - 40 * 1024) // 4)}, str(weights))
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    (tmp_path / "m.merge").write_text('a = model("m")\noutput a\n' + "# pad\n" * 4000)
    monkeypatch.chdir(tmp_path)
    out = small_disk / "out"
    result = mergelang(capsys, "run", "m.merge", "-o", out, "--quiet")
    assert_error(result, None, None, "cannot write", "README.md: No space left on device",
                 hint="free space")
    assert list(small_disk.iterdir()) == []
