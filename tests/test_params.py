"""Script parameters: `param NAME = literal` and `-D NAME=VALUE` (LANGUAGE.md §6).

A parameter is a binding whose literal the command line (or `params=` in Python) may
replace; the merge it gives must be the one the script gives with that literal written
in. Every mistake (an unknown name, a value of the wrong kind or out of range, a
malformed `-D`) is a located diagnostic with exit status 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelang
from mergelang.cli import main
from mergelang.params import parse_axis, parse_define
from mergelang.syntax import parse
from mergelang.unparse import unparse
from tests.helpers import assert_error, small_tensors, underlined, write_hf_folder
from tests.helpers import mergelang as cli

SCRIPT = """\
# TIES with its knobs as parameters
param density = 0.2   # share of each delta kept
param weights = [0.6, 0.4]
base = model("base")
a = model("a")
b = model("b")
output base + ties(a - base, b - base, weights=weights, density=density)
"""


@pytest.fixture
def script(tmp_path: Path) -> Path:
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_hf_folder(tmp_path / name, small_tensors(seed))
    path = tmp_path / "ties.merge"
    path.write_text(SCRIPT)
    return path


def merged(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def written_in(script: Path, **values: str) -> Path:
    """The script with each parameter's literal replaced by hand: the reference merge."""
    text = script.read_text()
    for name, value in values.items():
        line = next(x for x in text.splitlines() if x.startswith(f"param {name} ="))
        text = text.replace(line, f"param {name} = {value}")
    path = script.with_name("by_hand.merge")
    path.write_text(text)
    return path


def test_the_default_is_used_and_reported(script):
    program = mergelang.load(script)
    assert program.params == {"density": 0.2, "weights": (0.6, 0.4)}


def test_an_override_merges_as_if_written_in_the_script(script, capsys):
    out, reference = script.parent / "out", script.parent / "reference"
    args = ["-D", "density=0.5", "-D", "weights=[1.0,0.25]", "--quiet"]
    assert main(["run", str(script), "-o", str(out), *args]) == 0
    hand = written_in(script, density="0.5", weights="[1.0, 0.25]")
    assert main(["run", str(hand), "-o", str(reference), "--quiet"]) == 0
    got, want = merged(out), merged(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    default = script.parent / "default"
    assert main(["run", str(script), "-o", str(default), "--quiet"]) == 0
    assert not torch.equal(merged(default)["model.norm.weight"], got["model.norm.weight"])


def test_python_params_are_the_same_as_d_options(script):
    program = mergelang.load(script, params={"density": 0.5, "weights": [1.0, 0.25]})
    assert program.params == {"density": 0.5, "weights": (1.0, 0.25)}
    hand = mergelang.load(written_in(script, density="0.5", weights="[1.0, 0.25]"))
    with program.plan() as p, hand.plan() as q:
        assert [t.name for t in p.tensors] == [t.name for t in q.tensors]
        assert all(t.root is not None for t in p.tensors)
        assert [str(t.root.label) for t in p.tensors] == [str(t.root.label) for t in q.tensors]
    assert mergelang.compile(SCRIPT, script, params={"density": 0.7}).params["density"] == 0.7


def test_a_number_stands_for_a_list_and_a_list_for_a_number(script):
    assert mergelang.load(script, params={"weights": 1.0}).params["weights"] == 1.0
    source = SCRIPT.replace("param density = 0.2", "param density = [0.2, 0.4]")
    program = mergelang.compile(source, script, params={"density": 0.3})
    assert program.params["density"] == 0.3


def test_an_unknown_parameter_is_located_on_the_command_line_with_a_suggestion(script, capsys):
    result = cli(capsys, "check", script, "-D", "dnsity=0.3")
    assert_error(result, "<command line>:1:4", "dnsity", 'unknown parameter "dnsity"',
                 "density, weights", hint='did you mean "density"?')
    result = cli(capsys, "run", script, "-o", script.parent / "out", "-D", "base=1")
    assert_error(result, "<command line>:1:4", "base", 'unknown parameter "base"',
                 hint='declare it with `param base = ...`')
    assert not (script.parent / "out").exists()


def test_a_value_of_the_wrong_kind_is_located_at_the_value(script, capsys):
    result = cli(capsys, "check", script, "-D", "density=high")  # a bare word is a string
    assert_error(result, "<command line>:1:12", "high",
                 'parameter "density" is a number (its default is 0.2), not the string "high"',
                 f"declared at {script}:2:1")


def test_a_value_the_script_refuses_is_shown_where_it_is_used(script, capsys):
    result = cli(capsys, "check", script, "-D", "density=1.5")
    assert_error(result, f"{script}:7:65", "density", "density must be in [0, 1]",
                 "with parameters set from outside the script: density=1.5")
    result = cli(capsys, "check", script, "-D", "weights=[1,2,3]")
    assert result.code == 2 and "Traceback" not in result.text


@pytest.mark.parametrize(("option", "points_at", "words"), [
    ("density", "density", "-D needs NAME=VALUE"),
    ("density=", "density=", "has no value"),
    ("2x=1", "2x", '"2x" is not a parameter name'),
    ("density=0.1:0.9:0.2", "0.1:0.9:0.2", "a range start:stop:step is for `mergelang sweep`"),
    ("density=0.2+0.1", "0.2+0.1", "must be a literal"),
    ("weights=[0.6,0.4", "[", '"[" is never closed'),
    ("density='x'", "'", "strings use double quotes"),
])
def test_a_malformed_d_option_is_located_on_the_command_line(script, capsys, option, points_at,
                                                             words):
    result = cli(capsys, "check", script, "-D", option)
    assert_error(result, None, points_at, words)
    assert "--> <command line>:1:" in result.text


def test_a_parameter_given_twice_is_an_error(script, capsys):
    result = cli(capsys, "check", script, "-D", "density=0.3", "-D", "density=0.4")
    assert_error(result, "<command line>:1:4", "density", 'parameter "density" is given twice')


def test_check_and_graph_show_the_parameters(script, capsys):
    assert main(["check", str(script), "-D", "density=0.3"]) == 0
    shown = capsys.readouterr().out
    assert "params:        density = 0.3 (default 0.2), weights = [0.6, 0.4]" in shown
    assert main(["graph", str(script), "--tensor", "norm", "-D", "weights=[1,1]"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("params: density = 0.2, weights = [1, 1] (default [0.6, 0.4])\n")
    assert "trim(%3 0.2 'tensor')" in shown
    assert main(["graph", str(script), "--format", "dot", "-D", "density=0.5"]) == 0
    assert capsys.readouterr().out.startswith("// params: density = 0.5 (default 0.2)")


@pytest.mark.parametrize(("line", "at", "points_at", "words"), [
    ("param density = 0.1 + 0.1", (2, 17), "0.1 + 0.1", "must be a literal"),
    ("param density = base", (2, 17), "base", "must be a literal"),
    ("param base = 0.3", (4, 1), 'base = model("base")', '"base" is already defined'),
    ("param model = 0.3", (2, 1), "param model = 0.3", "is a built-in name"),
])
def test_a_bad_declaration_is_located_in_the_script(script, capsys, line, at, points_at, words):
    script.write_text(SCRIPT.replace("param density = 0.2   # share of each delta kept", line))
    result = cli(capsys, "check", script)
    assert_error(result, f"{script}:{at[0]}:{at[1]}", points_at, words)


def test_a_parameter_of_an_imported_file_can_be_set(script, capsys):
    (script.parent / "knobs.merge").write_text("param density = 0.2\n")
    script.write_text('import "knobs.merge"\n' + SCRIPT.replace(
        "param density = 0.2   # share of each delta kept\n", ""))
    assert mergelang.load(script, params={"density": 0.4}).params["density"] == 0.4
    assert main(["check", str(script), "-D", "density=0.4"]) == 0
    assert "density = 0.4 (default 0.2)" in capsys.readouterr().out


def test_param_is_a_statement_that_unparses_and_is_a_keyword(capsys, tmp_path):
    text = 'param d = -0.5\nparam s = "a\\"b"\nparam l = [1, [true, none]]\n'
    assert unparse(parse(text)) == text
    result = cli(capsys, "check", _write(tmp_path, "param = 1\n"))
    assert_error(result, None, "=", 'unexpected "="')


def test_d_values_use_the_language_s_literals():
    assert parse_define("w=[0.6, 0.4]").value == (0.6, 0.4)
    assert parse_define('m="count"').value == "count"
    assert parse_define("m=count").value == "count"
    assert parse_define("n=-3").value == -3
    assert parse_define("x=1e-3").value == 0.001
    assert parse_define("f=true").value is True
    assert parse_define("f=none").value is None
    d = parse_define("density=0.3")
    assert (d.name_span.col, d.value_span.col) == (4, 12)
    assert underlined(mergelang_error(lambda: parse_define("density=[1,,2]"))) == ","


def test_sweep_values_are_one_value_a_list_or_a_range():
    assert parse_axis("d=0.1:0.9:0.2").values == (0.1, 0.3, 0.5, 0.7, 0.9)
    assert parse_axis("d=0:1:0.3").values == (0, 0.3, 0.6, 0.9)  # stop is not reached
    assert parse_axis("n=1:10:3").values == (1, 4, 7, 10)
    assert parse_axis("d=-1:1:1").values == (-1, 0, 1)
    assert parse_axis("d=0.5").values == (0.5,)
    assert parse_axis("m=[sum, count]").values == ("sum", "count")
    assert parse_axis("w=[[1, 0], [0.5, 0.5]]").values == ((1, 0), (0.5, 0.5))
    axis = parse_axis("d=[0.1, 0.3]")
    assert [s.col for s in axis.spans] == [7, 12]


@pytest.mark.parametrize(("option", "points_at", "words"), [
    ("d=0.9:0.1:0.1", "0.9:0.1:0.1", "is empty: stop is below start"),
    ("d=0:1:0", "0", "step must be positive"),
    ("d=0:1:-0.1", "-0.1", "step must be positive"),
    ("d=0:1", "0:1", "a range is start:stop:step"),
    ("d=0:1:0.1:2", "0:1:0.1:2", "a range is start:stop:step"),
    ("d=a:1:0.1", "a", 'bounds and step are numbers, not the string "a"'),
    ("d=0::0.1", "0::0.1", "a range needs start, stop and step"),
    ("d=[]", "[]", "gives no values to try"),
    ("d=0:1e9:1", "0:1e9:1", "at most 10000"),
])
def test_a_malformed_sweep_range_is_located(option, points_at, words):
    text = mergelang_error(lambda: parse_axis(option))
    assert "--> <command line>:1:" in text
    assert underlined(text) == points_at, text
    assert words in text


def mergelang_error(call) -> str:
    with pytest.raises(mergelang.MergeError) as caught:
        call()
    return caught.value.render()


def _write(folder: Path, text: str) -> Path:
    path = folder / "bad.merge"
    path.write_text(text)
    return path
