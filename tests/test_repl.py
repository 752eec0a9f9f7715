"""The REPL: driven by scripted input, and in a pseudo-terminal (pexpect) as a person uses it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

import mergelang
from mergelang import cli
from mergelang.execute import run_tensor
from mergelang.repl import Repl
from mergelang.syntax import parse_expression
from tests.helpers import small_tensors, write_hf_folder

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def session(lines: list[str], script: Path | None = EXAMPLES / "quickstart.merge") -> str:
    return repl_with(lines, script)[0]


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


# --- the session: summaries, selections, numbers, the cache, commands ------------------


def repl_with(lines: list[str], script: Path | None = EXAMPLES / "quickstart.merge"
              ) -> tuple[str, Repl]:
    console = Console(record=True, width=200, force_terminal=False)
    feed = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    repl = Repl(script, console, read)
    assert repl.loop() == 0
    return console.export_text(), repl


def state(model: str) -> dict[str, torch.Tensor]:
    """Every tensor of an example model (of all its shards)."""
    out: dict[str, torch.Tensor] = {}
    for shard in (EXAMPLES / "models" / model).glob("*.safetensors"):
        out.update(load_file(str(shard)))
    return out


def loaded(text: str) -> list[int]:
    """The tensors each `:time` line says were loaded."""
    return [int(n) for n in re.findall(r"loaded (\d+) tensors", text)]


def test_a_model_expression_shows_a_summary_and_a_selection_shows_tensors():
    text = session(["math", 'd = math - base', 'd["layers.1.mlp.(up|down)_proj"]',
                    'd["model.norm.weight"]', 'base["nothing"]'])
    assert "model: 39 tensors, 218K parameters, bfloat16 ×39, 4 layers" in text
    assert "layers 0-3, each: 46.2K parameters" in text
    assert text.count("tensor model.layers.1.mlp.") == 2
    assert "tensor model.norm.weight  shape [64]" in text
    assert 'no tensor matches "nothing"' in text


def test_numbers_per_tensor_and_for_the_whole_model():
    base, math = state("base"), state("math")
    text = session(['d = math - base', 'norm(d)["layers.1.mlp.up"]',
                    'norm(d, scope="model")["layers.1.mlp.up"]', "1 + 1", "[2, 3]"])
    name = "model.layers.1.mlp.up_proj.weight"
    mine = re.search(r"norm\(d\) = (\S+)   \(for " + re.escape(name), text)
    assert mine and float(mine.group(1)) == pytest.approx(
        float((math[name].double() - base[name].double()).norm()), rel=1e-5)
    everything = math.keys() & base.keys()
    whole = sum(float((math[n].double() - base[n].double()).square().sum()) for n in everything)
    mine = re.search(r'norm\(d, scope="model"\) = (\S+)   \(the whole model\)', text)
    assert mine and float(mine.group(1)) == pytest.approx(whole ** 0.5, rel=1e-5)
    assert "\n2\n" in text and "\n[2, 3]\n" in text


def test_values_are_the_executors_bits_and_are_cached(tmp_path):
    expr = "ties(math - base, code - base, density=0.3)"
    _, repl = repl_with([f'x = {expr}'])
    name = "model.layers.2.self_attn.q_proj.weight"
    lowered = repl.session.lower(parse_expression("x").statements[0].value)
    p = repl.session.plan(lowered, names=[name])
    (t,) = p.tensors
    mine = repl.session.compute(p, t).to(t.out_dtype)
    script = tmp_path / "s.merge"
    script.write_text((EXAMPLES / "quickstart.merge").read_text().replace(
        "models/", str(EXAMPLES / "models") + "/").splitlines()[0] + "\n"
        + f'base = model("{EXAMPLES}/models/base")\nmath = model("{EXAMPLES}/models/math")\n'
        f'code = model("{EXAMPLES}/models/code")\noutput {expr}\n')
    with mergelang.load(script).plan() as whole:
        (want,) = [u for u in whole.tensors if u.name == name]
        assert torch.equal(mine, run_tensor(whole, want))
    loads = repl.session.loads.tensors
    assert torch.equal(repl.session.compute(p, t).to(t.out_dtype), mine)
    assert repl.session.loads.tensors == loads  # the second time, nothing is loaded


def test_asking_again_or_a_neighbour_loads_only_what_is_new():
    text = session([
        ':time ties(math - base, code - base, density=0.2)["layers.0.mlp.up"]',
        ':time ties(math - base, code - base, density=0.2)["layers.0.mlp.up"]',
        ':time trim(math - base, 0.2)["layers.0.mlp.up"]',  # shares trim(math - base)
        ':time (chat - base)["layers.0.mlp.up"]'.replace("chat", "code"),
        ':set cache 1B', ':time (math - base)["layers.0.mlp.up"]'])
    assert loaded(text) == [3, 0, 0, 0, 2]
    assert "values from the cache" in text


def test_stats_streams_every_matching_tensor():
    text = session(["d = math - base", ":stats trim(d, 0.25) up_proj", ":stats norm(d) up_proj",
                    ':stats d "layers\\.0\\..*norm"', ":stats 2"])
    rows = [line for line in text.splitlines() if re.match(r" +\d+  [a-z]", line)]
    assert len(rows) == 4 + 4 + 2
    assert all(line.rstrip().endswith("25.0%") for line in rows[:4])
    assert "value" in text
    assert ":stats takes a model expression, not the number 2" in text


def test_commands():
    text = session([":help", ":keys base lm_head", ":type 2", ":type math - base",
                    ":type depth", ":graph trim(math - base, 0.5) layers.0.mlp.up_proj",
                    ":set seed 5", ":set", ":set bogus 1", ":set dtype float8", ":nope",
                    ":tensor", ":load " + str(EXAMPLES / "slerp.merge"), "t"])
    assert ":stats EXPR [REGEX]" in text
    assert "no models yet" not in text
    assert "lm_head.weight  [256, 64]  bfloat16" in text
    assert "the number 2" in text and "a model expression: 39 tensors" in text
    assert "a per-tensor value" in text
    assert "trim(%3 0.5 'tensor')" in text
    assert "seed = 5" in text and "seed        5" in text
    assert 'unknown option "bogus"' in text and 'unknown dtype "float8"' in text
    assert "unknown command :nope" in text
    assert "script output: slerp(a, b, t)" in text and "loaded " in text
    assert "\n0.5   (for lm_head.weight)" in text  # t is per tensor: the first one


def test_multi_line_input_and_blocks():
    text = session(["fn twice(x) {", "    y = x * 2", "    return y", "}", "twice(21)",
                    "t = if true then 1", "    else 2", "t", "[1,", " 2]"], script=None)
    assert text == "42\n1\n[1, 2]\n"


def test_save_writes_the_merge_as_run_would(tmp_path):
    out = tmp_path / "merged"
    text = session(["d = math - base", f":save base + 0.5 * d {out}"])
    assert f"wrote {out}" in text
    written = load_file(str(out / "model.safetensors"))
    base, math = state("base"), state("math")
    name = "model.layers.0.mlp.up_proj.weight"
    want = (base[name].float() + 0.5 * (math[name].float() - base[name].float()))
    assert torch.equal(written[name], want.to(written[name].dtype))
    assert "output base + 0.5 * d" in (out / "README.md").read_text()


def test_the_command_line_reads_plain_lines_when_stdin_is_not_a_terminal(tmp_path, capsys):
    lines = "d = math - base\nnorm(d)[\"lm_head\"]\n2 * 21\nbogus\n"
    done = subprocess.run([sys.executable, "-m", "mergelang", "repl",
                           str(EXAMPLES / "quickstart.merge")], input=lines, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "norm(d) = " in done.stdout and "\n42\n" in done.stdout
    assert 'unknown name "bogus"' in done.stdout and "merge>" not in done.stdout
    assert cli.main(["repl", str(tmp_path / "missing.merge")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- in a pseudo-terminal, as a person uses it ------------------------------------------

PROMPT = "merge>"


class Terminal:
    """`mergelang repl` in a pseudo-terminal: type, wait for what it prints."""

    def __init__(self, cwd: Path, history: Path, *args: str):
        self.pexpect = pytest.importorskip("pexpect")
        env = {**os.environ, "MERGELANG_HISTORY": str(history), "PROMPT_TOOLKIT_NO_CPR": "1",
               "TERM": "xterm", "NO_COLOR": "1"}
        self.child = self.pexpect.spawn(sys.executable, ["-m", "mergelang", "repl", *args],
                                   cwd=str(cwd), env=env, encoding="utf-8", timeout=60,
                                   dimensions=(50, 200))
        self.wait(PROMPT)

    def wait(self, text: str) -> str:
        """Wait until `text` is printed; what came before it (escape codes removed)."""
        self.child.expect_exact(text)
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.child.before)

    def run(self, line: str, until: str = PROMPT) -> str:
        """Type a line (keys as given, so a tab completes) and Enter; wait for `until`,
        then for the next prompt."""
        *completed, rest = line.split("\t")
        for part in completed:  # a tab, then time for the completion to be made
            self.child.send(part + "\t")
            time.sleep(0.5)
        self.child.send(rest + "\r")
        out = self.wait(until)
        if until != PROMPT:
            self.wait(PROMPT)
        time.sleep(0.2)  # the line editor takes the terminal back
        return out

    def leave(self) -> int:
        self.child.sendcontrol("d")
        self.child.expect(self.pexpect.EOF)
        self.child.close()
        return self.child.exitstatus


def test_a_session_in_a_terminal_and_its_history(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name in ("big_a", "big_b"):
        write_hf_folder(tmp_path / name, {"w": torch.randn(2000, 1000, generator=g)})
    script = tmp_path / "s.merge"
    script.write_text(f'base = model("{EXAMPLES}/models/base")\n'
                      f'math = model("{EXAMPLES}/models/math")\n'
                      'a = model("big_a")\nb = model("big_b")\n'
                      # 256 trims of two million entries: several seconds on an idle
                      # machine (64 of a million took 0.5 s, done before the Ctrl-C)
                      "fn t4(d, x) = trim(d, x) + trim(d, x + 0.01) + trim(d, x + 0.02) + "
                      "trim(d, x + 0.03)\n"
                      "fn t16(d, x) = t4(d, x) + t4(d, x + 0.04) + t4(d, x + 0.08) + "
                      "t4(d, x + 0.12)\n"
                      "fn t64(d, x) = t16(d, x) + t16(d, x + 0.16) + t16(d, x + 0.32) + "
                      "t16(d, x + 0.48)\n"
                      "fn t256(d, x) = t64(d, x) + t64(d, x + 0.004) + t64(d, x + 0.008) + "
                      "t64(d, x + 0.012)\n")
    history = tmp_path / "history"
    term = Terminal(tmp_path, history, str(script))
    # completion: a name, a command, a keyword argument
    term.run("d = math - ba\t")
    out = term.run('d["layers.1.mlp.up"]', until="nonzero")  # a tensor view
    assert "tensor model.layers.1.mlp.up_proj.weight  shape [176, 64]  bfloat16" in out
    out = term.run(":sta\t d up_proj", until="     3  mlp.up_proj.weight")
    assert "     0  mlp.up_proj.weight" in out and "nonzero" in out  # a row per layer
    term.run('ties(d, dens\t0.5)["layers.0.mlp.up"]', until="nonzero")
    out = term.run('d["model.layers.2.mlp.gate_p\t"]', until="nonzero")  # a tensor name
    assert "tensor model.layers.2.mlp.gate_proj.weight" in out
    # an error is a diagnostic, and the session goes on
    out = term.run("tie(d)", until='did you mean "ties"?')
    assert 'unknown function "tie"' in out
    # multi-line input
    term.run("twice = [d,\r d]")
    # asking again loads nothing
    term.run(':time trim(d, 0.2)["layers.2.mlp.up"]', until="values from the cache")
    out = term.run(':time trim(d, 0.2)["layers.2.mlp.up"]', until="values from the cache")
    assert "loaded 0 tensors (0 B); 1 " in out
    # Ctrl-C stops a long evaluation, not the session
    term.child.send(':time t256(a - b, 0.1)["w"]\r')
    term.child.expect_exact("\x1b[?2004l")  # the line editor let go: the evaluation began
    time.sleep(1.5)
    term.child.sendintr()
    term.wait("interrupted")
    term.wait(PROMPT)
    time.sleep(0.2)
    term.run("2 * 21", until="42\r")
    assert term.leave() == 0
    assert "2 * 21" in history.read_text()
    # the next session has the history: Up, Enter
    term = Terminal(tmp_path, history)
    term.child.send("\x1b[A")
    time.sleep(0.3)
    term.run("", until="42\r")
    assert term.leave() == 0
