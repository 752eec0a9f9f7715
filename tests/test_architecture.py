"""The architecture's promises: a closed set of IR operations that every stage's table
covers, interning that belongs to one program (two programs, two threads), one path
through the pipeline for scripts, the REPL and embedding programs, and plans that agree
with checks and close like files."""

from __future__ import annotations

import ast as pyast
import threading
from pathlib import Path

import pytest
import torch

import mergelang
from mergelang import cli, execute, ir, specialise
from mergelang.ir import Op, Phase, ops_in
from tests.helpers import compile_in, quantised_state, write_model

ROOT = Path(__file__).resolve().parent.parent


def test_every_operation_is_declared_once_and_labelled():
    assert set(ir.SPECS) == set(Op)
    b = ir.Builder()
    for op in Op:
        spec = ir.SPECS[op]
        attr = {str: "x", tuple: ("/m", "w"), type(None): None}.get(spec.attr, 1.0)
        node = b.make(op, (), attr, kind=ir.TENSOR if spec.kind == ir.TENSOR else ir.SCALAR)
        assert isinstance(node.label, str) and node.label


def test_every_stage_table_covers_exactly_the_operations_of_its_phase():
    assert set(specialise.SPECIALISE) == ops_in(Phase.SOURCE)
    computed_scalars = ops_in(Phase.SOURCE, ir.SCALAR) - {Op.CONST, Op.CTX, Op.PARAM, Op.COND}
    assert set(specialise.SCALAR_EVAL) == computed_scalars
    assert set(execute.STEPS) == ops_in(Phase.PLANNED, ir.TENSOR)
    assert set(ir.SHAPE_RULES) == ops_in(Phase.PLANNED, ir.TENSOR) - {Op.LOAD}
    assert set(cli.TEXT) == ops_in(Phase.PLANNED)


def test_an_attribute_of_the_wrong_type_is_refused_when_the_node_is_made():
    with pytest.raises(TypeError):
        ir.Builder().make(Op.LOAD, (), "not a (model, name) pair")


def test_two_programs_in_one_process_report_errors_in_their_own_file(tmp_path):
    wide = {"w": torch.ones(3, 5)}
    for name, state in (("a", {"w": torch.ones(3, 4)}), ("b", {"w": torch.ones(3, 4)}),
                        ("c", wide)):
        write_model(tmp_path / name, state)
    first = tmp_path / "first.merge"
    first.write_text('a = model("a")\nc = model("c")\noutput a + (a - c)\n')
    kept = mergelang.load(first)  # compiled, and kept alive
    second = tmp_path / "second.merge"
    second.write_text('a = model("a")\nb = model("b")\nc = model("c")\n' + "\n" * 5
                      + "output b + (a - c)\n")
    with pytest.raises(mergelang.MergeError) as caught:
        mergelang.load(second).check()
    (d,) = caught.value.diagnostics
    assert "shape [3, 4]" in d.message and "[3, 5]" in d.message
    assert (d.span.file, d.span.line) == (str(second), 9)
    assert kept.lowered.output is not None


def test_two_threads_compile_check_and_evaluate_at_once(tmp_path):
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        write_model(tmp_path / name, quantised_state(seed))
    scripts = []
    for i in range(2):
        path = tmp_path / f"s{i}.merge"
        path.write_text('base = model("base")\na = model("a")\nb = model("b")\n'
                        + "\n" * i + f"output base + ties(a - base, b - base, density={0.2 + i})"
                        f" + trim(a - base, {3 + i})\n")  # the trim's density is out of range
        scripts.append(path)
    failures: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(15):
                with pytest.raises(mergelang.MergeError) as caught:
                    mergelang.load(scripts[i]).check()
                (d,) = caught.value.diagnostics
                assert (d.span.file, d.span.line) == (str(scripts[i]), 4 + i), d
                x = quantised_state(i)["layers.0.w"]
                assert torch.equal(mergelang.evaluate(f"a * {i + 1}", a=x), x * (i + 1))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures


def test_plan_graph_check_and_run_agree_on_a_whole_model_trim_of_a_trim(tmp_path):
    program = compile_in(tmp_path, 'a = model("a")\nbase = model("base")\n'
                         'output base + trim(trim(a - base, 0.5), 0.2, "model")\n',
                         a=quantised_state(1), base=quantised_state(0))
    for stage in (program.plan, program.graph, program.check,
                  lambda: program.run(tmp_path / "out")):
        with pytest.raises(mergelang.MergeError, match="whole-model reduction"):
            stage()
    assert not (tmp_path / "out").exists()


def test_a_plan_is_a_context_manager_that_closes_its_models(tmp_path):
    program = compile_in(tmp_path, 'a = model("a")\noutput a * 2', a=quantised_state(1))
    closed = []
    with program.plan() as p:
        for model in p.bound.models.values():
            original = model.source.close
            model.source.close = lambda original=original: (closed.append(1), original())
        assert len(p.tensors) == 4
    assert closed == [1]


def test_an_expression_is_compiled_once_and_planned_once_per_kind_of_call():
    merge = mergelang.expression("base + ties(a - base, b - base, density=d)")
    states = [quantised_state(i) for i in range(3)]
    for d in (0.3, 0.3, 0.6):
        got = merge(base=states[0], a=states[1], b=states[2], d=d)
        want = mergelang.evaluate(f"base + ties(a - base, b - base, density={d})",
                                  base=states[0], a=states[1], b=states[2])
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert merge.cached_plans == 2  # d = 0.3 twice, then 0.6
    other = {k: v * 2 for k, v in states[1].items()}  # new tensors, same shapes: no new plan
    got = merge(base=states[0], a=other, b=states[2], d=0.6)
    assert merge.cached_plans == 2
    want = mergelang.evaluate("base + ties(a - base, b - base, density=0.6)",
                              base=states[0], a=other, b=states[2])
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_an_expression_checks_its_values_at_each_call_and_names_its_inputs():
    merge = mergelang.expression("trim(x, d)")
    x = torch.randn(4, 4)
    assert torch.equal(merge(x=x, d=1.0), x)
    with pytest.raises(mergelang.MergeError, match=r"density must be in \[0, 1\]"):
        merge(x=x, d=1.5)
    with pytest.raises(TypeError, match="missing d"):
        merge(x=x)


def test_no_test_imports_a_private_name_of_the_package():
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in pyast.walk(pyast.parse(path.read_text())):
            if isinstance(node, pyast.ImportFrom) and (node.module or "").startswith("mergelang"):
                offenders += [f"{path.name}: {a.name}" for a in node.names
                              if a.name.startswith("_")]
    assert offenders == []


def test_shared_test_helpers_come_from_tests_helpers_only():
    """A test module imports nothing from another test module or from conftest."""
    offenders = []
    for path in (ROOT / "tests").glob("*.py"):
        for node in pyast.walk(pyast.parse(path.read_text())):
            if isinstance(node, pyast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if "test_" in module or "conftest" in module:
                    offenders.append(f"{path.name}: from {module}")
    assert offenders == []


def test_no_module_of_the_package_is_longer_than_about_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "mergelang").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 520}
    assert long == {}


def test_an_expression_takes_parameters_that_require_grad():
    w = torch.nn.Parameter(torch.ones(3))
    merged = mergelang.expression("a * 2 + b")(a=w, b=torch.ones(3))
    assert torch.equal(merged, torch.full((3,), 3.0)) and not merged.requires_grad
