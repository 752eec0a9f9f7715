"""Every bad input gets a diagnostic, exit status 2, and no traceback (LANGUAGE.md §5).

Each test writes a real script (and, where needed, real model folders) into tmp_path and runs
the command-line tool in-process. A diagnostic must name `file:line:col`, show the line with a
caret under the right text, say what is wrong, and suggest a fix where one is likely. `run`
must leave nothing at the output path, not even its hidden temporary folder.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import (
    Result,
    assert_error,
    assert_nothing_written,
    at,
    mergelang,
    run,
    small_tensors,
    underlined,
    write,
)

MODELS = 'base = model("examples/base")\nmath = model("examples/math")\n'
"""Two lines that open example models; a script's own line then starts at line 3."""


def check_or_run(capsys, command: str, script: Path, tmp_path: Path) -> Result:
    """`check SCRIPT`, or `run SCRIPT -o OUT` followed by the check that nothing was written."""
    if command == "check":
        return mergelang(capsys, "check", script)
    out = tmp_path / "out"
    result = run(capsys, script, out)
    assert_nothing_written(out)
    return result


both = pytest.mark.parametrize("command", ["check", "run"])


# --- syntax ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "where", "points_at", "message", "hint"), [
    pytest.param("output (base + math", (3, 8), "(", '"(" is never closed',
                 'add ")" to close it', id="unclosed-bracket"),
    pytest.param("output base math", (3, 13), "math", 'unexpected "math"', None,
                 id="stray-token"),
    pytest.param("output base * 1.2.3", (3, 15), "1.2.3", 'malformed number "1.2.3"',
                 "numbers look like", id="bad-number"),
    pytest.param('chat = model("examples/chat)', (3, 14), '"', "unterminated string",
                 'close the string with "', id="unterminated-string"),
])
@both
def test_syntax_error(tmp_path, examples, capsys, command, line, where, points_at, message,
                      hint):
    script = write(tmp_path, MODELS + line + "\n")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, *where), points_at, message, hint=hint)


# --- names and calls -------------------------------------------------------------------------


def test_unknown_name_suggests_the_closest(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output bsae + math\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 3, 8), "bsae", 'unknown name "bsae"',
                 hint='did you mean "base"?')


@both
def test_unknown_function_suggests_ties(tmp_path, examples, capsys, command):
    script = write(tmp_path, MODELS + "output base + tie(math - base)\n")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 3, 15), "tie", 'unknown function "tie"',
                 hint='did you mean "ties"?')


def test_unknown_keyword_suggests_density(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output base + ties(math - base, densty=0.5)\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 3, 33), "densty=0.5", 'ties() has no parameter "densty"',
                 hint='did you mean "density"?')


def test_too_many_positional_arguments(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "fn avg(a, b) = (a + b) / 2\noutput avg(base, math, base)\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 24), "base",
                 "avg() takes 2 positional arguments but 3 were given", hint="avg(a, b)")


def test_too_many_positional_arguments_to_a_builtin(tmp_path, examples, capsys):
    script = write(tmp_path, 'base = model("examples/base", "examples/math")\noutput base\n')
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 1, 31), '"examples/math"',
                 "model() takes 1 positional argument but 2 were given", hint="model(path)")


def test_missing_required_argument(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "fn avg(a, b) = (a + b) / 2\noutput avg(base)\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 8), "avg(base)", "avg() is missing 1 argument: b",
                 hint="avg(a, b)")


def test_rebinding_a_name(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + 'base = model("examples/code")\noutput base\n')
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 3, 1), 'base = model("examples/code")',
                 '"base" is already defined', f"first defined at {at(script, 1, 1)}",
                 hint="names are bound once")


# --- arguments with wrong values -------------------------------------------------------------


def test_weights_of_the_wrong_length(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + 'code = model("examples/code")\n'
                   "output base + ties(math - base, code - base, weights=[1.0, 0.5, 0.2])\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 54), "[1.0, 0.5, 0.2]",
                 "`weights` has 3 values but there are 2 `deltas`",
                 hint="give one value per element of `deltas`")


@pytest.mark.parametrize(("value", "message", "hint"), [
    pytest.param('"high"', 'density must be a number, not the string "high"', None, id="string"),
    pytest.param("1.5", "density must be in [0, 1], not the number 1.5",
                 "density=1 is the nearest value", id="above-1"),
    pytest.param("-0.1", "density must be in [0, 1], not the number -0.1",
                 "density=0 is the nearest value", id="below-0"),
])
@both
def test_density_of_the_wrong_type_or_range(tmp_path, examples, capsys, command, value,
                                            message, hint):
    # the caret is on the argument in the user's script, not inside stdlib/ties.merge
    script = write(tmp_path, MODELS + f"output base + ties(math - base, density={value})\n")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 3, 41), value, message, hint=hint)
    assert "stdlib" not in result.text


# --- output ----------------------------------------------------------------------------------


def test_run_without_output(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "# forgot the output\n\n")
    out = tmp_path / "out"
    result = run(capsys, script, out)
    # the caret sits just after the last line with text, where the output would go
    assert_error(result, at(script, 3, 20), "", "the script has no `output`",
                 hint="add a line such as `output")
    assert_nothing_written(out)


def test_output_given_twice(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output base\noutput math\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 1), "output math",
                 "a script has one `output`; this is the second",
                 f"the first is at {at(script, 3, 1)}", hint="combine them into one expression")


# --- imports ---------------------------------------------------------------------------------


def test_import_cycle(tmp_path, examples, capsys):
    a = write(tmp_path, 'import "b.merge"\n' + MODELS + "output base\n", "a.merge")
    write(tmp_path, 'import "a.merge"\nfn twice(x) = 2 * x\n', "b.merge")
    result = mergelang(capsys, "check", a)
    # reported at the import that closes the cycle, in b.merge
    assert_error(result, None, 'import "a.merge"', "import cycle: a.merge -> b.merge -> a.merge",
                 hint="move the shared definitions into a file that imports neither")
    assert re.search(r"--> \S*b\.merge:1:1\n", result.text), result.text


@both
def test_importing_a_missing_file(tmp_path, examples, capsys, command):
    script = write(tmp_path, MODELS + 'import "lib/helpers.merge"\noutput base\n')
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 3, 1), 'import "lib/helpers.merge"',
                 'cannot import "lib/helpers.merge": no such file',
                 str(tmp_path / "lib" / "helpers.merge"),
                 hint="relative to the importing script's folder")


# --- model files -----------------------------------------------------------------------------


def one_model(tmp_path: Path, folder: str) -> Path:
    """A script `a = model("FOLDER")` / `output a * 2`; the model call's argument is 1:11."""
    return write(tmp_path, f'a = model("{folder}")\noutput a * 2\n')


@both
def test_missing_model_path(tmp_path, capsys, command):
    script = one_model(tmp_path, "nowhere")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"nowhere"',
                 f"model path {tmp_path / 'nowhere'} does not exist", hint="check the path")


@both
def test_folder_without_safetensors(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    script = one_model(tmp_path, "empty")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"empty"', "holds no model weights",
                 "no .safetensors file", hint="download the model's weights")


@both
def test_pickled_checkpoint_is_refused(tmp_path, capsys, command):
    folder = tmp_path / "old"
    folder.mkdir()
    torch.save(small_tensors(), folder / "pytorch_model.bin")
    script = one_model(tmp_path, "old")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"old"', "pytorch_model.bin",
                 "pickled checkpoints are not loaded", hint="convert it to safetensors")


@both
def test_truncated_safetensors(tmp_path, make_model, capsys, command):
    weights = make_model("cut") / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    script = one_model(tmp_path, "cut")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"cut"', f"{weights} is truncated",
                 hint="download it again")


@both
def test_corrupt_header(tmp_path, make_model, capsys, command):
    weights = make_model("bad") / "model.safetensors"
    garbage = b'{"model.norm.weight": {"dtype": "F32", '
    weights.write_bytes(struct.pack("<Q", len(garbage)) + garbage + bytes(64))
    script = one_model(tmp_path, "bad")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"bad"', f"{weights} has a corrupt header",
                 "not valid JSON", hint="download it again")


@both
def test_index_naming_a_missing_shard(tmp_path, capsys, command):
    folder = tmp_path / "sharded"
    folder.mkdir()
    state = small_tensors()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    for shard, held in shards.items():
        save_file({n: state[n] for n in held}, str(folder / shard))
    index = {"weight_map": {n: shard for shard, held in shards.items() for n in held}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00002-of-00002.safetensors").unlink()
    script = one_model(tmp_path, "sharded")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 11), '"sharded"',
                 "shard model-00002-of-00002.safetensors", "is missing", repr(names[3]),
                 hint="download the missing shards again")


# --- models that do not fit together ---------------------------------------------------------


@both
def test_same_tensor_with_different_shapes(tmp_path, make_model, capsys, command):
    make_model("a")
    wide = small_tensors(seed=1)
    wide["model.layers.1.mlp.up_proj.weight"] = torch.randn(4, 6)
    make_model("b", wide)
    script = write(tmp_path, 'a = model("a")\nb = model("b")\noutput (a + b) / 2\n')
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 3, 9), "a + b",
                 'tensor "model.layers.1.mlp.up_proj.weight" has shape [4, 4] in a but [4, 6] '
                 "in b", hint="different architectures")


@both
def test_models_with_different_tensor_names(tmp_path, make_model, capsys, command):
    extra = {f"model.extra.{i}": torch.zeros(2) for i in range(5)}
    make_model("a", small_tensors() | extra)
    make_model("b", small_tensors(seed=1) | {"model.norm.bias": torch.zeros(4)})
    script = write(tmp_path, 'a = model("a")\nb = model("b")\noutput a + b\n')
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 3, 8), "a + b",
                 'the models here have different tensors: "model.extra.0", "model.extra.1", '
                 '"model.extra.2" and 2 more are in a but not in b',
                 '"model.norm.bias" is in b but not in a', hint="use `a | b`")


@both
def test_shapes_that_differ_inside_a_library_function(tmp_path, make_model, capsys, command):
    make_model("a")
    wide = small_tensors(seed=1)
    wide["model.norm.weight"] = torch.randn(6)
    make_model("b", wide)
    script = write(tmp_path, 'a = model("a")\nb = model("b")\noutput linear(a, b)\n')
    result = check_or_run(capsys, command, script, tmp_path)
    # shown at the user's output, once, with where in the library as a note
    assert_error(result, at(script, 3, 8), "linear(a, b)",
                 'tensor "model.norm.weight" has shape [4] in a but [6] in b',
                 "= note: found at stdlib/linear.merge:", hint="different architectures")
    assert result.text.count("error:") == 1
    assert "--> stdlib" not in result.text


def test_different_tensor_names_through_ties(tmp_path, make_model, capsys):
    make_model("base")
    make_model("a", small_tensors(seed=1))
    make_model("b", small_tensors(seed=2) | {"lm_head.weight": torch.zeros(8, 4)})
    script = write(tmp_path, 'base = model("base")\na = model("a")\nb = model("b")\n'
                   "output base + ties(a - base, b - base)\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 30), "b - base",
                 'the models here have different tensors: "lm_head.weight" is in b but not in '
                 "base", hint="use `a | b`")
    assert result.text.count("error:") == 1


# --- the output folder -----------------------------------------------------------------------


def test_existing_output_folder_is_refused_without_force(tmp_path, make_model, capsys):
    make_model("a")
    script = one_model(tmp_path, "a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run(capsys, script, out)
    assert_error(result, None, None, f"output folder {out} already exists",
                 hint="pass --force to replace it")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []

    result = run(capsys, script, out, "--force")  # keep.txt is not a merge's: kept
    assert_error(result, None, None, "holds files mergelang did not write: keep.txt",
                 hint="choose another output folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    (out / "keep.txt").unlink()
    assert run(capsys, script, out, "--force").code == 0
    result = run(capsys, script, out, "--force")  # a previous merge is replaced
    assert result.code == 0, result.text
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# --- NaN and infinity in the result ----------------------------------------------------------


def test_nan_in_the_result_is_a_warning(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output base / (math - math)\n")
    out = tmp_path / "out"
    result = run(capsys, script, out)
    assert result.code == 0, result.text
    assert 'warning: NaN or infinite values in the result: "lm_head.weight" (16384)' in result.text
    assert "and 36 more" in result.text  # one warning for all 39 tensors
    assert f"--> {at(script, 3, 8)}\n" in result.text
    assert underlined(result.text) == "base / (math - math)"
    assert "pass --strict" in result.text
    assert (out / "model.safetensors").is_file()


def test_nan_in_the_result_with_strict_is_an_error(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output base / (math - math)\n")
    out = tmp_path / "out"
    result = run(capsys, script, out, "--strict")
    assert_error(result, at(script, 3, 8), "base / (math - math)",
                 "NaN or infinite values in the result", hint="check the weights and divisors")
    assert "pass --strict" not in result.text
    assert_nothing_written(out)


@pytest.mark.parametrize("strict", [False, True], ids=["warn", "strict"])
def test_a_model_holding_inf(tmp_path, make_model, capsys, strict):
    state = small_tensors()
    state["model.layers.1.input_layernorm.weight"][2] = float("inf")
    make_model("a", state)
    script = one_model(tmp_path, "a")
    out = tmp_path / "out"
    result = run(capsys, script, out, *(["--strict"] if strict else []))
    message = 'NaN or infinite values in the result: "model.layers.1.input_layernorm.weight" (1)'
    if strict:
        assert_error(result, at(script, 2, 8), "a * 2", message)
        assert_nothing_written(out)
    else:
        assert result.code == 0, result.text
        assert "warning: " + message in result.text
        assert result.text.count("warning:") == 1  # only the tensor that has one
        assert (out / "model.safetensors").is_file()


# --- settings and flags ----------------------------------------------------------------------


def test_unknown_setting(tmp_path, examples, capsys):
    script = write(tmp_path, 'set dtyp = "float16"\n' + MODELS + "output base\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 1, 1), 'set dtyp = "float16"', 'unknown setting "dtyp"',
                 hint='did you mean "dtype"?')


@pytest.mark.parametrize(("value", "shown"), [('"float8"', 'the string "float8"'),
                                              ("16", "the number 16")])
@both
def test_bad_dtype_setting(tmp_path, examples, capsys, command, value, shown):
    script = write(tmp_path, f"set dtype = {value}\n" + MODELS + "output base\n")
    result = check_or_run(capsys, command, script, tmp_path)
    assert_error(result, at(script, 1, 13), value,
                 f"dtype must be one of float32, float64, float16, bfloat16, not {shown}",
                 hint='set dtype = "bfloat16"')


def test_unknown_device(tmp_path, make_model, capsys):
    make_model("a")
    script = one_model(tmp_path, "a")
    out = tmp_path / "out"
    result = run(capsys, script, out, "--device", "tpu")
    assert_error(result, None, None, 'unknown device "tpu"', hint="use cpu, cuda, cuda:N")
    assert_nothing_written(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(tmp_path, make_model, capsys):
    make_model("a")
    script = one_model(tmp_path, "a")
    out = tmp_path / "out"
    result = run(capsys, script, out, "--device", "cuda")
    assert_error(result, None, None, 'device "cuda" is not available', hint="--device cpu")
    assert_nothing_written(out)


def test_missing_script(tmp_path, capsys):
    result = mergelang(capsys, "check", tmp_path / "nothere.merge")
    assert_error(result, None, None, f"cannot read {tmp_path / 'nothere.merge'}",
                 hint="check the script's path")


def test_script_that_is_not_utf8(tmp_path, capsys):
    script = tmp_path / "latin1.merge"
    script.write_bytes('# café\noutput a\n'.encode("latin-1"))
    result = mergelang(capsys, "check", script)
    assert_error(result, None, None, f"cannot read {script}: it is not UTF-8 text",
                 hint="save the script as UTF-8")


def test_graph_with_a_bad_tensor_pattern(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + "output base + math\n")
    result = mergelang(capsys, "graph", script, "--tensor", "layers.(3")
    assert_error(result, None, None, 'bad --tensor pattern "layers.(3"',
                 hint="it is a regular expression")


def test_importing_a_file_that_is_not_utf8(tmp_path, examples, capsys):
    (tmp_path / "lib.merge").write_bytes('# café\n'.encode("latin-1"))
    script = write(tmp_path, 'import "lib.merge"\n' + MODELS + "output base\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 1, 1), 'import "lib.merge"', "not UTF-8")


def test_positional_argument_after_a_keyword(tmp_path, examples, capsys):
    script = write(tmp_path, MODELS + 'code = model("examples/code")\n'
                   "output base + ties(math - base, density=0.5, code - base)\n")
    result = mergelang(capsys, "check", script)
    assert_error(result, at(script, 4, 46), "code - base", "positional")
