"""Reliability (issue 11): no flag loses data, no input crashes mergelang, no file runs code.

Every test builds the hostile input for real (a FIFO, a symlink loop, a header nested
100,000 deep, a planted pickle) and runs the command-line tool or the API on it. A bad
input must end in a located diagnostic or a clean refusal with exit status 2, nothing
written at the output, and no traceback.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import stat
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import lark
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelang import MergeError, api
from mergelang.io import ModelFileError, open_model
from mergelang.resources import GRAMMAR_FILE
from tests.helpers import (
    assert_error,
    assert_nothing_written,
    mergelang,
    run,
    small_tensors,
    write,
    write_hf_folder,
)

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent


# --- the parser's tables: no pickle, no shared folder ----------------------------------------


def _parse_in_child(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    code = "from mergelang.syntax import parse; print(len(parse('output a\\n').statements))"
    return subprocess.run([PYTHON, "-c", code], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_parser_tables_are_private_json_and_nothing_goes_to_the_shared_temp(tmp_path):
    shared, home = tmp_path / "tmp", tmp_path / "cache"
    shared.mkdir()
    env = {"TMPDIR": str(shared), "XDG_CACHE_HOME": str(home)}
    for _ in range(2):  # builds the tables, then loads them
        child = _parse_in_child(env, tmp_path)
        assert child.returncode == 0 and child.stdout == "1\n", child.stderr
    assert list(shared.iterdir()) == []
    folder = home / "mergelang"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    [tables] = folder.iterdir()
    assert tables.name.startswith("parser-") and tables.suffix == ".json"
    assert stat.S_IMODE(tables.stat().st_mode) == 0o600
    assert json.loads(tables.read_text())["tables"][0] == "T"


class _Planted:
    """Unpickling this creates a file: proof that a planted cache ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_lark_cache_pickle_is_never_loaded(tmp_path, monkeypatch):
    """The file lark's cache=True would load for mergelang's grammar (as mergelang built
    its parser before issue 11) is replaced by a pickle that runs a command."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    monkeypatch.setenv("TMPDIR", str(shared))
    monkeypatch.setattr(tempfile, "tempdir", None)
    lark.Lark(GRAMMAR_FILE.read_text(), parser="lalr", lexer="basic", postlex=None,
              start=["start", "expr"], cache=True, propagate_positions=True,
              maybe_placeholders=True)  # lark's cache name leaves the postlexer out
    [cached] = shared.iterdir()
    marker = tmp_path / "code-ran"
    first_line = cached.read_bytes().split(b"\n", 1)[0]
    cached.write_bytes(first_line + b"\n" + pickle.dumps(_Planted(marker)))
    child = _parse_in_child({"TMPDIR": str(shared), "XDG_CACHE_HOME": str(tmp_path / "c")},
                            tmp_path)
    assert child.returncode == 0, child.stderr
    assert not marker.exists()


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                    reason="needs root to make a cache folder owned by another user")
def test_a_cache_folder_owned_by_another_user_is_not_used(tmp_path):
    folder = tmp_path / "cache" / "mergelang"
    folder.mkdir(parents=True)
    os.chown(folder, 12345, 12345)
    child = _parse_in_child({"XDG_CACHE_HOME": str(tmp_path / "cache")}, tmp_path)
    assert child.returncode == 0, child.stderr
    assert list(folder.iterdir()) == []


def test_damaged_or_shared_tables_are_rebuilt_not_trusted(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert _parse_in_child(env, tmp_path).returncode == 0
    [tables] = (tmp_path / "cache" / "mergelang").iterdir()
    tables.write_text('{"key": "x", "tables": [')  # damaged
    child = _parse_in_child(env, tmp_path)
    assert child.returncode == 0 and child.stdout == "1\n", child.stderr
    assert json.loads(tables.read_text())["tables"][0] == "T"  # written again
    os.chmod(tables, 0o666)  # writable by others: not trusted
    tables.write_text(json.dumps({"key": "", "tables": None}))
    assert _parse_in_child(env, tmp_path).returncode == 0


# --- the output folder: --force never loses what it should not --------------------------------


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def workspace(tmp_path, make_model, monkeypatch) -> Path:
    """tmp_path as the current folder, holding models/a, models/b and merge.merge."""
    make_model("models/a")
    make_model("models/b")
    write(tmp_path, 'a = model("models/a")\nb = model("models/b")\noutput (a + b) / 2\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("out", "words"), [
    pytest.param(".", "output folder . is the current folder", id="dot"),
    pytest.param("", "is the current folder", id="empty"),
    pytest.param("..", "contains the current folder", id="parent"),
    pytest.param("models", "contains", id="folder-of-inputs"),
    pytest.param("models/a", "models/a, which this merge reads", id="an-input"),
    pytest.param("models/a/model.safetensors", "is not a folder", id="an-input-file"),
])
@pytest.mark.parametrize("force", [True, False])
def test_force_never_replaces_inputs_the_script_or_the_current_folder(workspace, capsys, out,
                                                                      words, force):
    before = _tree(workspace)
    result = mergelang(capsys, "run", "merge.merge", "-o", out, "--quiet",
                       *(["--force"] if force else []))
    assert_error(result, None, None, words)
    assert _tree(workspace) == before


def test_an_output_holding_the_script_is_refused(workspace, capsys):
    (workspace / "scripts").mkdir()
    (workspace / "merge.merge").rename(workspace / "scripts" / "merge.merge")
    (workspace / "scripts" / "merge.merge").write_text(
        'a = model("../models/a")\noutput a\n')
    result = run(capsys, Path("scripts/merge.merge"), Path("scripts"), "--force")
    assert_error(result, None, None, "contains", "scripts/merge.merge, which this merge reads",
                 hint="outside the input models and the script")


def test_an_input_that_is_a_previous_merge_is_not_replaced_by_its_own_merge(workspace, capsys):
    assert run(capsys, Path("merge.merge"), Path("merged")).code == 0
    write(workspace, 'm = model("merged")\noutput m * 2\n', "again.merge")
    before = (workspace / "merged" / "model.safetensors").read_bytes()
    result = run(capsys, Path("again.merge"), Path("merged"), "--force")
    assert_error(result, None, None, "merged, which this merge reads")
    assert (workspace / "merged" / "model.safetensors").read_bytes() == before


def test_force_replaces_a_previous_merge_and_reports_stale_temporary_folders(workspace,
                                                                             capsys):
    assert run(capsys, Path("merge.merge"), Path("merged")).code == 0
    dead = subprocess.run([PYTHON, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = workspace / f".merged.tmp-{int(dead.stdout)}-00ff00ff"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(bytes(4096))
    result = run(capsys, Path("merge.merge"), Path("merged"), "--force")
    assert result.code == 0, result.text
    assert "warning: removed" in result.text and stale.name in result.text
    assert "left by an earlier run" in result.text and "Traceback" not in result.text
    assert not stale.exists()
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".merged")] == []


def test_a_failed_run_removes_the_parent_folders_it_made(workspace, capsys):
    write(workspace, 'a = model("models/a")\noutput a / (a - a)\n', "nan.merge")
    result = run(capsys, Path("nan.merge"), Path("new/deeper/merged"), "--strict")
    assert_error(result, None, None, "NaN")
    assert not (workspace / "new").exists()


# --- model files that crashed mergelang (each built for real) ----------------------------------


def _raw_safetensors(path: Path, header: str, data: bytes = b"") -> None:
    """A file laid out as safetensors with exactly `header` as its JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = header.encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def _empty_name(folder: Path) -> None:
    write_hf_folder(folder, {"": torch.ones(4), "model.norm.weight": torch.ones(4)})


def _deep_header(folder: Path) -> None:
    _raw_safetensors(folder / "model.safetensors", "[" * 100_000 + "]" * 100_000)


def _huge_int_header(folder: Path) -> None:
    _raw_safetensors(folder / "model.safetensors",
                     '{"w": {"dtype": "F32", "shape": [' + "9" * 5000
                     + '], "data_offsets": [0, 4]}}', bytes(4))


def _deep_config(folder: Path) -> None:
    write_hf_folder(folder, small_tensors())
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)


def _huge_int_config(folder: Path) -> None:
    write_hf_folder(folder, small_tensors())
    (folder / "config.json").write_text('{"num_hidden_layers": ' + "7" * 5000 + "}")


def _sharded(folder: Path, weight_map: object) -> None:
    folder.mkdir(parents=True)
    save_file(small_tensors(), str(folder / "model-00001-of-00001.safetensors"))
    text = weight_map if isinstance(weight_map, str) else json.dumps({"weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)


def _deep_index(folder: Path) -> None:
    _sharded(folder, '{"weight_map": ' + '{"a": ' * 100_000 + "1" + "}" * 100_001)


def _huge_int_index(folder: Path) -> None:
    _sharded(folder, '{"metadata": {"total_size": ' + "1" * 5000 + '}, "weight_map": {}}')


def _index_outside(folder: Path) -> None:
    save_file(small_tensors(), str(folder.parent / "elsewhere.safetensors"))
    _sharded(folder, {name: "../elsewhere.safetensors" for name in small_tensors()})


def _index_absolute(folder: Path) -> None:
    save_file(small_tensors(), str(folder.parent / "elsewhere.safetensors"))
    _sharded(folder, {name: str(folder.parent / "elsewhere.safetensors")
                      for name in small_tensors()})


def _million_layers(folder: Path) -> None:
    write_hf_folder(folder, small_tensors(layers=2), {"num_hidden_layers": 10**6})


def _layer_number_too_large(folder: Path) -> None:
    write_hf_folder(folder, {"model.layers.999999999.w": torch.ones(4),
                             "model.norm.weight": torch.ones(4)}, {"num_hidden_layers": 1})


def _fifo(folder: Path) -> str:
    folder.mkdir(parents=True)
    os.mkfifo(folder / "model.safetensors")
    return "bad/model.safetensors"


def _fifo_index(folder: Path) -> None:
    folder.mkdir(parents=True)
    save_file(small_tensors(), str(folder / "model-00001-of-00001.safetensors"))
    os.mkfifo(folder / "model.safetensors.index.json")


def _fifo_config(folder: Path) -> None:
    write_hf_folder(folder, small_tensors())
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")


BAD_MODELS = [
    pytest.param(_empty_name, "a tensor with an empty name", "rename it", id="empty-name"),
    pytest.param(_deep_header, "corrupt header: it is JSON nested too deeply", "download",
                 id="header-nested-100k"),
    pytest.param(_huge_int_header, "corrupt header: it is not valid JSON (Exceeds the limit",
                 "download", id="header-5000-digit-int"),
    pytest.param(_deep_config, "config.json is JSON nested too deeply", "download",
                 id="config-nested-100k"),
    pytest.param(_huge_int_config, "config.json is not valid JSON (Exceeds", "download",
                 id="config-5000-digit-int"),
    pytest.param(_deep_index, "index.json is JSON nested too deeply", "download",
                 id="index-nested-100k"),
    pytest.param(_huge_int_index, "index.json is not valid JSON (Exceeds", "download",
                 id="index-5000-digit-int"),
    pytest.param(_index_outside, "in '../elsewhere.safetensors', outside the model's folder",
                 "an index names shard files beside it", id="index-points-outside"),
    pytest.param(_index_absolute, "elsewhere.safetensors', outside the model's folder",
                 "an index names shard files beside it", id="index-absolute-path"),
    pytest.param(_million_layers, "says num_hidden_layers = 1000000, but its tensors have "
                 "layers 0 to 1", "correct num_hidden_layers in config.json (to 2)",
                 id="config-claims-a-million-layers"),
    pytest.param(_layer_number_too_large, "names layer 999999999, but the model has only 2",
                 "damaged", id="layer-number-too-large"),
    pytest.param(_fifo, "is not a regular file", "name the model's .safetensors file",
                 id="fifo-named-directly"),
    pytest.param(_fifo_index, "index.json is not a regular file", "download",
                 id="fifo-index"),
]


@pytest.mark.parametrize(("build", "words", "hint"), BAD_MODELS)
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_model_file_is_a_located_diagnostic(tmp_path, capsys, command, build, words,
                                                hint):
    path = build(tmp_path / "bad") or "bad"
    script = write(tmp_path, f'a = model("{path}")\noutput a\n')
    out = tmp_path / "out"
    args = ("check", script) if command == "check" else ("run", script, "-o", out, "--quiet")
    result = mergelang(capsys, *args)
    assert_error(result, f"{script}:1:11", f'"{path}"', words, hint=hint)
    assert_nothing_written(out)


def _fp8_and_empty(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.layers.0.w": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
            "model.layers.0.v": (torch.randn(4, 4, generator=g) * 300).to(torch.float8_e5m2),
            "model.layers.0.no_rows": torch.zeros(0, 4, dtype=torch.bfloat16),
            "model.layers.0.empty_rows": torch.zeros(3, 0),
            "model.layers.0.ids": torch.zeros(0, dtype=torch.int64),
            "model.norm.weight": torch.randn(4, generator=g)}


@pytest.mark.parametrize(("output", "expected"), [
    pytest.param("a", lambda a, b: a, id="output-a"),
    pytest.param("(a + b) / 2", lambda a, b: (a + b) / 2, id="average"),
    pytest.param("a + ties(a - b, b - a, density=0.5)", None, id="ties"),
])
def test_float8_and_empty_tensors_merge(tmp_path, capsys, output, expected):
    """float8 tensors are widened to the compute dtype and written back as float8 (the
    donor's dtype); tensors with no rows, or empty rows, come out as they went in."""
    write_hf_folder(tmp_path / "a", _fp8_and_empty(0))
    write_hf_folder(tmp_path / "b", _fp8_and_empty(1))
    script = write(tmp_path, f'a = model("a")\nb = model("b")\noutput {output}\n')
    assert mergelang(capsys, "check", script).code == 0
    result = run(capsys, script, tmp_path / "out")
    assert result.code == 0, result.text
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    a, b = (load_file(str(tmp_path / m / "model.safetensors")) for m in "ab")
    assert {n: (t.dtype, t.shape) for n, t in got.items()} == \
        {n: (t.dtype, t.shape) for n, t in a.items()}
    if expected is None:
        return
    for name, t in a.items():
        want = expected(t.float(), b[name].float()).to(t.dtype) if t.is_floating_point() \
            else t
        assert torch.equal(got[name].view(torch.uint8), want.view(torch.uint8)), name


def test_float8_and_empty_tensors_merge_on_a_cluster_as_they_do_alone(tmp_path):
    """The cluster's writer counts non-finite values of float8 outputs widened, as the
    local one does (torch sums no float8): the same bytes as a local run."""
    write_hf_folder(tmp_path / "a", _fp8_and_empty(0))
    write_hf_folder(tmp_path / "b", _fp8_and_empty(1))
    write(tmp_path, 'a = model("a")\nb = model("b")\noutput (a + b) / 2\n')
    for out, flags in (("alone", []), ("cluster", ["--workers", "1"])):
        child = subprocess.run([PYTHON, "-m", "mergelang", "run", "merge.merge", "-o", out,
                                "--quiet", *flags], cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-2000:]
    assert (tmp_path / "alone" / "model.safetensors").read_bytes() == \
        (tmp_path / "cluster" / "model.safetensors").read_bytes()


def test_a_fifo_config_is_not_waited_on(tmp_path):
    _fifo_config(tmp_path / "m")
    with open_model(tmp_path / "m") as model:
        assert model.config is None  # as without a config: a FIFO is not a file to read


def test_a_model_path_that_is_a_symlink_loop_is_refused_when_opened(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    with pytest.raises(ModelFileError, match="is a loop of symbolic links") as err:
        open_model(tmp_path / "loop1")
    assert err.value.hint == "point the link at the model's folder"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="a link to .*nowhere, which does not exist"):
        open_model(tmp_path / "dangling")
    with pytest.raises(ModelFileError, match="invalid model path"):
        open_model("a\0b")


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_model_path_that_is_a_symlink_loop_is_a_located_diagnostic(tmp_path, capsys,
                                                                     command):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    script = write(tmp_path, 'a = model("loop1")\noutput a\n')
    out = tmp_path / "out"
    args = ("check", script) if command == "check" else ("run", script, "-o", out, "--quiet")
    result = mergelang(capsys, *args)
    assert_error(result, f"{script}:1:11", '"loop1"', "loop of symbolic links")
    assert_nothing_written(out)


# --- scripts: strings, numbers, line endings, nesting ------------------------------------------


@pytest.mark.parametrize(("line", "col", "points_at", "words", "hint"), [
    pytest.param(r'a = model("C:\users\me\base")', 14, r"\u",
                 r'invalid escape "\u" in a string: \u takes 4 hex digits',
                 '"C:/users/me/base"', id="windows-path"),
    pytest.param(r'a = model("models\x4g")', 18, r"\x4", r"\x takes 2 hex digits",
                 "double it", id="short-hex-escape"),
    pytest.param(r'a = model("\N{NO SUCH NAME}")', 12, r"\N{NO SUCH NAME}",
                 "takes a character name", "double it", id="unknown-character-name"),
    pytest.param(r'a = model("\U00110000")', 12, r"\U00110000", "no character U+110000",
                 "double it", id="beyond-unicode"),
    pytest.param(r'a = model("models/\0base")', 11, r'"models/\0base"',
                 "a path cannot hold a NUL character", "remove it", id="nul-escape"),
    pytest.param('a = model("models/\x00base")', 11, '"models/\ufffdbase"',
                 "a path cannot hold a NUL character", "remove it", id="raw-nul"),
    pytest.param(r'import "lib\x00.merge"', 8, r'"lib\x00.merge"',
                 "a path cannot hold a NUL character", "remove it", id="nul-in-import"),
    pytest.param(r'a = model("\ud800")', 12, r"\ud800", "lone surrogate (U+D800)",
                 "both halves", id="surrogate"),
    pytest.param("a = " + "7" * 5000, 5, None, "the integer 777777777777...7777 (5000 "
                 "characters) is too large", "a float is written", id="5000-digit-integer"),
    pytest.param("a = 9223372036854775808", 5, "9223372036854775808",
                 "is too large (at most 9223372036854775807", None, id="integer-over-64-bits"),
    pytest.param("a = 1e400", 5, "1e400", "the number 1e400 is too large", "exponent",
                 id="float-overflow"),
    pytest.param("a = " + "(" * 101 + "1" + ")" * 101, 105, "(",
                 "brackets nested more than 100 deep", "name the inner parts",
                 id="101-nested-brackets"),
    pytest.param('import "' + "i" * 300 + '.merge"', 1, None, "cannot import",
                 "check the path", id="over-long-import-name"),
    pytest.param('import "' + "d/" * 3000 + 'x.merge"', 1, None, "cannot import",
                 "paths are relative", id="over-long-import-path"),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_bad_literal_is_a_located_diagnostic(tmp_path, capsys, command, line, col, points_at,
                                             words, hint):
    script = tmp_path / "merge.merge"
    script.write_text(f"# line 1\n{line}\noutput a\n", encoding="utf-8", errors="surrogatepass")
    out = tmp_path / "out"
    args = ("check", script) if command == "check" else ("run", script, "-o", out, "--quiet")
    result = mergelang(capsys, *args)
    assert_error(result, f"{script}:2:{col}", points_at, words, hint=hint)
    assert_nothing_written(out)


def test_the_api_refuses_the_same_literals(tmp_path):
    for text in [r'x = "C:\users"', 'import "\x00"', 'x = "\ud800"', "# \udcff",
                 "x = " + "1" * 4400]:
        with pytest.raises(MergeError):
            api.compile(text + "\n")


def test_a_lone_surrogate_from_python_is_located():
    with pytest.raises(MergeError) as caught:
        api.compile("x = 1\ny = 2  # \udcff\n", "s.merge")
    assert "s.merge:2:10" in caught.value.render()
    assert "lone surrogate (U+DCFF)" in caught.value.render()


def test_a_nul_is_allowed_where_no_path_is_made():
    [assign] = api.compile('x = "a\\x00b"\n').module.statements
    assert assign.value.value == "a\x00b"


def test_regex_escapes_and_known_escapes_keep_their_meaning():
    program = api.compile(r'x = "\d+\.w\t\"\\\x41\u00e9\N{BULLET}\101"' + "\n")
    [assign] = program.module.statements
    assert assign.value.value == '\\d+\\.w\t"\\A\u00e9\u2022A'


SCRIPT = 'a = model("models/a")\nb = model("models/b")\noutput (a + b) / 2\n'
BROKEN = 'a = model("models/a")\n\noutput a +\n'


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"], ids=["LF", "CRLF", "CR"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "BOM"])
def test_line_endings_and_a_byte_order_mark_mean_the_same_to_the_api_and_the_cli(
        workspace, capsys, ending, bom):
    def encoded(text: str) -> bytes:
        return ("\ufeff" if bom else "").encode() + text.replace("\n", ending).encode()

    (workspace / "good.merge").write_bytes(encoded(SCRIPT))
    result = mergelang(capsys, "check", "good.merge")
    assert result.code == 0, result.text
    summary = api.compile(encoded(SCRIPT).decode(), workspace / "good.merge").check()
    assert summary.models == ["models/a", "models/b"]

    (workspace / "bad.merge").write_bytes(encoded(BROKEN))
    cli = mergelang(capsys, "check", "bad.merge")
    assert_error(cli, "bad.merge:3:11", None, "unexpected end of file")
    with pytest.raises(MergeError) as caught:
        api.compile(encoded(BROKEN).decode(), "bad.merge")
    assert caught.value.render() in cli.text


def test_a_form_feed_does_not_move_the_caret_to_another_line(tmp_path, capsys):
    script = write(tmp_path, "x = 1\f\ny = 2\noutput nothing\n")
    assert_error(mergelang(capsys, "check", script), f"{script}:3:8", "nothing",
                 'unknown name "nothing"')


def test_a_sum_of_300_models_and_90_nested_brackets_are_fine(workspace):
    terms = " + ".join(["a"] * 300)
    api.compile(f'a = model("models/a")\noutput ({terms}) / 300\n', "m.merge").check()
    nested = "(" * 90 + "a" + ")" * 90
    api.compile(f'a = model("models/a")\noutput {nested}\n', "m.merge").check()


# --- scripts that once crashed lower, specialise, plan or run ---------------------------------


def _crash_free(workspace: Path, text: str, timeout: float = 60) -> str:
    """Check `text` in a child process; what it printed, or a failure if it crashed or
    hung (a RecursionError or a blow-up must be a diagnostic)."""
    (workspace / "deep.merge").write_text(text)
    try:
        child = subprocess.run([PYTHON, "-m", "mergelang", "check", "deep.merge"],
                               cwd=workspace, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"check took more than {timeout} s")
    assert "Traceback" not in child.stderr, child.stderr[-2000:]
    assert child.returncode in (0, 2), child.stderr
    return child.stdout + child.stderr


def _runs_to_the_closed_form(workspace: Path, text: str, expected) -> None:
    """`text` runs, and every output tensor is expected(a's tensor)."""
    api.compile(text, workspace / "m.merge").run(workspace / "out")
    got = load_file(str(workspace / "out" / "model.safetensors"))
    a = load_file(str(workspace / "models" / "a" / "model.safetensors"))
    assert got.keys() == a.keys()
    for name, tensor in a.items():
        torch.testing.assert_close(got[name], expected(tensor), rtol=1e-5, atol=1e-6)


def test_a_sum_of_400_models_checks_and_runs(workspace):
    text = 'a = model("models/a")\noutput ' + " + ".join(["a"] * 400) + "\n"
    assert _crash_free(workspace, text).startswith("ok:")
    _runs_to_the_closed_form(workspace, text, lambda a: sum([a] * 400, torch.zeros_like(a)))


def test_400_chained_bindings_check_and_run(workspace):
    chain = "\n".join(f"x{i} = x{i - 1} + x0" for i in range(1, 400))
    text = f'x0 = model("models/a")\n{chain}\noutput x399\n'
    assert _crash_free(workspace, text).startswith("ok:")
    _runs_to_the_closed_form(workspace, text, lambda a: a * 400)


def test_500_nested_operators_run(workspace):
    text = 'a = model("models/a")\noutput ' + "-" * 501 + "a\n"
    assert _crash_free(workspace, text).startswith("ok:")
    _runs_to_the_closed_form(workspace, text, lambda a: -a)


def test_a_stack_of_a_sum_of_1500_slices_runs(workspace):
    text = ('a = model("models/a")\noutput stack(('
            + " + ".join(["a.layers[0:2]"] * 1500) + ") / 1500)\n")
    assert _crash_free(workspace, text).startswith("ok:")
    _runs_to_the_closed_form(workspace, text,
                             lambda a: sum([a] * 1500, torch.zeros_like(a)) / 1500)


def test_fmt_of_500_nested_operators_is_a_located_diagnostic(workspace, capsys):
    """The layout recurses over the tree: too deep for it is a diagnostic (the script
    itself checks and runs), and the file is left as it is."""
    text = 'a = model("models/a")\noutput ' + "-" * 501 + "a\n"
    write(workspace, text, "deep.merge")
    assert_error(mergelang(capsys, "fmt", "deep.merge"), "deep.merge:2:1", None,
                 "this statement nests too deeply to lay out", hint="name the inner parts")
    assert (workspace / "deep.merge").read_text() == text


def test_nesting_beyond_the_limit_is_a_located_diagnostic(workspace):
    out = _crash_free(workspace, 'a = model("models/a")\noutput ' + "-" * 25_000 + "a\n")
    assert "deep.merge:2:" in out
    assert "expression nested too deeply (25001 levels; the limit is 20000)" in out


def test_inlining_is_not_exponential(workspace):
    fns = "fn e0(x) = x\n" + "".join(f"fn e{i}(x) = e{i - 1}(x) + e{i - 1}(x)\n"
                                     for i in range(1, 60))
    text = fns + f'a = model("models/a")\noutput e59(a) / {2 ** 58}\n'
    assert _crash_free(workspace, text, timeout=30).startswith("ok:")
    _runs_to_the_closed_form(workspace, text, lambda a: a * 2.0)


def test_a_function_that_draws_random_numbers_draws_per_call_site(workspace):
    """Reusing an inlined call must not reuse a random draw: two calls of one function
    holding drop(...) (DARE's random mask), with equal arguments at two call sites, draw
    two masks, so their difference is not zero; a function without one is reused."""
    text = ('set seed = 7\na = model("models/a")\n'
            "fn d(x) = drop(x, density=0.5)\nfn twice(x) = d(x) - d(x)\n"
            "fn plain(x) = x * 3\nfn pure(x) = plain(x) - plain(x)\n")
    program = api.compile(text + "output twice(a)\n", workspace / "m.merge")
    program.run(workspace / "random")
    diff = load_file(str(workspace / "random" / "model.safetensors"))
    assert all(bool(t.ne(0).any()) for t in diff.values() if t.numel() >= 8)
    _runs_to_the_closed_form(workspace, text + "output pure(a) + a\n", lambda a: a)


def test_a_catastrophic_regex_is_a_located_diagnostic(workspace):
    out = _crash_free(workspace, 'a = model("models/a")\noutput if "' + "a" * 40
                      + '!" ~ "(a|aa)+$" then a else a * 2\n', timeout=30)
    assert "deep.merge:2:" in out and "took more than 2 s" in out
    assert "backtracks without bound" in out


def test_a_sensible_regex_still_matches(workspace):
    text = ('a = model("models/a")\noutput if "model.layers.1.w" ~ "layers\\.[0-9]+\\.w$" '
            "then a * 3 else a\n")
    _runs_to_the_closed_form(workspace, text, lambda a: a * 3)


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "value", "words"), [
    pytest.param("--shard-size", "0", "a size must be at least 1 byte", id="shard-size-0"),
    pytest.param("--max-memory", "0", "a size must be at least 1 byte", id="max-memory-0"),
    pytest.param("--max-memory", "0.0001", "a size must be at least 1 byte",
                 id="max-memory-below-a-byte"),
])
def test_a_zero_size_is_refused(workspace, capsys, flag, value, words):
    result = mergelang(capsys, "run", "merge.merge", "-o", "out", "--quiet", flag, value)
    assert_error(result, None, None, words)
    assert_nothing_written(workspace / "out")


@pytest.mark.parametrize("seed", ["-1", "1.5", "x", str(2**63)])
def test_a_seed_that_set_seed_refuses_is_refused_by_the_command_too(workspace, capsys, seed):
    with pytest.raises(SystemExit) as stopped:
        mergelang(capsys, "run", "merge.merge", "-o", "out", "--seed", seed)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seed: the seed must be a whole number from 0 to" in err
    assert "Traceback" not in err
    assert_nothing_written(workspace / "out")


def test_a_seed_the_command_accepts_runs(workspace, capsys):
    assert run(capsys, Path("merge.merge"), Path("out"), "--seed", str(2**63 - 1)).code == 0


def test_an_over_long_output_name_is_a_diagnostic(workspace, capsys):
    result = run(capsys, Path("merge.merge"), Path("m" * 300))
    assert_error(result, None, None, "the output folder's name is too long (300 bytes",
                 hint="choose a shorter name")
    assert sorted(p.name for p in workspace.iterdir()) == ["merge.merge", "models"]


def test_graph_into_a_pipe_closed_early_exits_quietly(tmp_path):
    """`mergelang graph x | head -1`: the reader leaves after one line (and after the
    pipe's 64 KB buffer is full, the next write fails)."""
    write_hf_folder(tmp_path / "m", {f"model.layers.{i}.w": torch.ones(2, 2)
                                     for i in range(3000)}, {"num_hidden_layers": 3000})
    write(tmp_path, 'a = model("m")\noutput a * 2 + a\n')
    child = subprocess.Popen([PYTHON, "-m", "mergelang", "graph", "merge.merge"],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = child.stdout.readline()
    child.stdout.close()
    err = child.stderr.read().decode()
    child.wait(timeout=120)
    assert first.startswith(b"model.layers.")
    assert child.returncode == 141, err
    assert err == ""


@pytest.mark.parametrize("output", [
    pytest.param("a * gradient([" + ", ".join(["0.5"] * 400) + "])", id="gradient-400"),
    pytest.param("a * 9223372036854775807", id="largest-integer-weight"),
])
def test_what_check_accepts_run_does_not_crash_on(workspace, output):
    program = api.compile(f'a = model("models/a")\noutput {output}\n', workspace / "m.merge")
    program.check()
    try:
        program.run(workspace / "out")
    except MergeError:
        pass


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("output", ["clamp_min(a, 1e39)", "clamp_min(a, -1e39)",
                                    "clamp_min(a, 70000.0)"])
def test_a_number_beyond_the_compute_dtype_is_the_infinity_it_rounds_to(workspace, dtype,
                                                                        output):
    """torch refuses clamp(min=1e39) on a float32 tensor; IEEE rounds 1e39 to inf in
    float32 (and in bfloat16), 70000 to inf in float16 only."""
    text = (f'set dtype = "{dtype}"\nset out_dtype = "float32"\na = model("models/a")\n'
            f"output {output}\n")
    compute = getattr(torch, dtype)
    floor = float(output.split(", ")[1].rstrip(")"))
    rounded = torch.tensor(floor, dtype=torch.float64).to(compute).item()  # IEEE's rounding
    assert math.isinf(rounded) == (floor != 70000.0 or dtype == "float16")
    _runs_to_the_closed_form(workspace, text,
                             lambda a: a.to(compute).float().clamp(min=rounded))


@pytest.mark.parametrize(("output", "col", "shown"), [
    ("a * (4294967296 * 4294967296 * 4294967296)", 13, "18446744073709551616"),
    ("a + -(0 - 9223372036854775807 - 1)", 12, "9223372036854775808"),
    ("a * sum([9223372036854775807, 1])", 12, "9223372036854775808"),
])
def test_an_integer_beyond_64_bits_made_by_arithmetic_is_a_located_diagnostic(
        workspace, capsys, output, col, shown):
    write(workspace, f'a = model("models/a")\noutput {output}\n', "big.merge")
    for command in ("check", "run"):
        args = ("big.merge",) if command == "check" else ("big.merge", "-o", "out")
        result = mergelang(capsys, command, *args)
        assert_error(result, f"big.merge:2:{col}", None, f"the integer {shown}",
                     "is too large (at most 9223372036854775807", hint="as a float")
    assert_nothing_written(workspace / "out")


def test_the_repl_survives_a_bad_escape(tmp_path):
    done = subprocess.run([PYTHON, "-m", "mergelang", "repl"], cwd=tmp_path, text=True,
                          input='x = "C:\\users\\me"\n2 * 21\n', capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert 'invalid escape "\\u" in a string' in out and "42" in out
    assert "Traceback" not in out
