"""The REPL, driven by scripted input."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mergelang.repl import Repl
from tests.helpers import small_tensors, write_hf_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def session(lines: list[str], script: Path | None = EXAMPLES / "quickstart.merge") -> str:
    console = Console(record=True, width=200, force_terminal=False)
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    assert Repl(script, console, read).loop() == 0
    return console.export_text()


def test_explore_a_merge_on_one_tensor():
    text = session([":tensor layers.1.mlp.up", "ties(math - base, code - base,",
                    "    density=0.2)", "depth", "d = math - base", "d * 0", "2 * 3"])
    assert "current tensor: model.layers.1.mlp.up_proj.weight" in text
    assert "shape [176, 64]" in text and "nonzero" in text
    assert "0.3333333333333333   (for model.layers.1.mlp.up_proj.weight)" in text
    assert "nonzero 0.0%" in text
    assert "\n6\n" in text


def test_errors_are_diagnostics_and_leave_the_session_unchanged():
    text = session(["x = bogus", "x", "tie(math)", ":tensor nomatch", ":what"])
    assert 'unknown name "bogus"' in text
    assert 'unknown name "x"' in text  # the bad binding was not kept
    assert 'did you mean "ties"?' in text
    assert 'no tensor matches "nomatch"' in text
    assert "unknown command :what" in text
    assert "Traceback" not in text


def test_a_session_without_a_script():
    base = EXAMPLES / "models" / "base"
    text = session([f'b = model("{base}")', ":tensors lm_head", "b"], script=None)
    assert "lm_head.weight" in text and "shape [256, 64]" in text


def test_set_statements_hold_in_the_session_as_in_a_script():
    shown = session([":tensor layers.1.mlp.up", 'set out_dtype = "float16"',
                     "dare_linear(math - base, density=0.5)"])
    assert "float16" in shown.splitlines()[-2]
    seeded = [session([":tensor layers.1.mlp.up", f"set seed = {seed}",
                       "dare_linear(math - base, density=0.5)"]).splitlines()[-1]
              for seed in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]  # the seed reaches the random draws
    rounded = [session([":tensor layers.1.mlp.up", f'set dtype = "{dtype}"',
                        "(math - base) * 3.3 / 7.1"]).splitlines()[-1]
               for dtype in ("float64", "float16")]
    assert rounded[0] != rounded[1]  # the compute dtype is the session's


def test_set_donor_decides_the_layer_count(tmp_path):
    small = write_hf_folder(tmp_path / "small", small_tensors(layers=2))
    base = EXAMPLES / "models" / "base"
    lines = [f'b = model("{base}")', f's = model("{small}")', "num_layers"]
    assert session(lines, script=None).splitlines()[-1].startswith("4   (for")
    donated = session(lines[:2] + ["set donor = s"] + lines[2:], script=None)
    assert donated.splitlines()[-1].startswith("2   (for")
