"""The streaming engine: chunked execution gives the bytes of unchunked execution; the
schedule releases values after their last use and reads files front to back; results do
not depend on threads or tensor order; inputs held in memory are never written to."""

from __future__ import annotations

import pytest
import torch

import mergelang
from mergelang.reduce import Chunk
from mergelang.schedule import peak_alive, schedule
from mergelang.selection import KthMagnitude
from tests.helpers import (
    METHODS,
    compile_in,
    four_models,
    quantised_state,
    reversed_order,
    run_all,
    same_bytes_in_chunks,
    shuffled_order,
    write_model,
)


@pytest.mark.parametrize("expression", METHODS)
def test_chunked_execution_gives_the_same_bytes(tmp_path, expression):
    p = four_models(tmp_path, expression, seed=5)
    same_bytes_in_chunks(p)
    p.close()


@pytest.mark.parametrize("density", [0.0, 0.001, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("chunk_rows", [100, 15, 1])
def test_radix_selection_equals_kthvalue(density, chunk_rows):
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(5000, generator=g), torch.randint(-3, 4, (5000,),
                                                                 generator=g).float()])
    x = x.reshape(100, 100)
    n = x.numel()
    k = max(1, int(density * n)) if density > 0 else 0
    selection = KthMagnitude(k, n)
    for _ in range(selection.sweeps(n // chunk_rows)):
        for rows in torch.split(x, chunk_rows):
            selection.add(rows, Chunk.whole(rows))
        selection.finish_sweep()
    threshold, room, ties = selection.result()
    magnitude = x.abs()
    if 0 < k < n:
        assert threshold == torch.kthvalue(magnitude.reshape(-1), n - k + 1).values.item()
        assert ties == int((magnitude == threshold).sum())
    assert int((magnitude > threshold).sum()) + room == k
    assert 0 <= room <= max(ties, 0) or k in (0, n)


def test_values_are_released_after_their_last_use(tmp_path):
    program = compile_in(tmp_path, """
a = model("a")
b = model("b")
c = model("c")
output (a - b) * 2 + c
""", a=quantised_state(1), b=quantised_state(2), c=quantised_state(3))
    p = program.plan()
    (final,) = schedule(p)[0].passes
    # three inputs, then a - b (4 alive), a and b die, * 2, then + c
    assert peak_alive(final) == 4
    assert all(count == 1 for count in final.uses.values())
    p.close()


def test_tensors_are_ordered_by_their_place_in_the_files(tmp_path):
    state = quantised_state(0)
    program = compile_in(tmp_path, 'a = model("a")\noutput a * 2', a=state)
    p = program.plan()
    info = p.bound.models[next(iter(p.bound.models))].source.tensors
    order = [k.tensor.name for k in schedule(p)]
    assert order == sorted(order, key=lambda n: info[n].offset)
    p.close()


def test_results_do_not_depend_on_threads_or_tensor_order(tmp_path):
    program = compile_in(tmp_path, """
base = model("base")
a = model("a")
b = model("b")
output base + dare_ties(a - base, b - base, density=0.5)
""", base=quantised_state(0), a=quantised_state(1), b=quantised_state(2))
    p = program.plan()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all(p, budget=10**9)
        torch.set_num_threads(2)
        two = run_all(p, budget=10**9)
    finally:
        torch.set_num_threads(threads)
    orders = [reversed_order, shuffled_order(1), shuffled_order(2)]
    files = [k.tensor.name for k in schedule(p)]
    for order in orders:
        assert [k.tensor.name for k in schedule(p, order=order)] != files  # really reordered
        reordered = run_all(p, 10**9, order)
        for name in one:
            assert torch.equal(one[name], two[name]) and torch.equal(one[name], reordered[name])
    p.close()


def test_inputs_in_memory_are_never_written_to():
    a, b = quantised_state(1), quantised_state(2)
    copies = {k: v.clone() for k, v in a.items()}
    out = mergelang.evaluate("(a - b) * 2 + a", a=a, b=b)
    assert all(torch.equal(a[k], copies[k]) for k in a)
    assert all(out[k].data_ptr() != a[k].data_ptr() for k in a)
    torch.testing.assert_close(out["layers.0.w"], (a["layers.0.w"] - b["layers.0.w"]) * 2
                               + a["layers.0.w"])


def test_in_place_reuse_does_not_touch_values_still_in_a_list(tmp_path):
    # kept_i is in the list given to elect_sign and is also multiplied later: the
    # multiply may reuse kept_i only once the list is gone
    a, b = quantised_state(1), quantised_state(2)
    got = mergelang.evaluate("ties(a, b, density=1)", a=a, b=b)
    stack = torch.stack([a["layers.0.w"], b["layers.0.w"]])
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = stack.sign() == sign
    expected = (stack * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(got["layers.0.w"], expected)


def test_whole_model_trim_keeps_the_top_k_of_all_tensors_together(tmp_path):
    state = quantised_state(1)  # many ties in magnitude, across tensors too
    density = 0.3
    program = compile_in(tmp_path, f'a = model("a")\noutput trim(a, {density}, "model")',
                         a=state)
    p = program.plan()
    info = p.bound.models[next(iter(p.bound.models))].source.tensors
    names = sorted(state, key=lambda n: info[n].offset)  # ties go to earlier tensors
    flat = torch.cat([state[n].reshape(-1) for n in names])
    k = max(1, int(density * flat.numel()))
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    keep = torch.zeros_like(flat)
    keep[order[:k]] = 1
    expected = dict(zip(names, torch.split(flat * keep, [state[n].numel() for n in names]),
                        strict=True))
    for budget in (10**9, 1):
        got = run_all(p, budget)
        for name, tensor in state.items():
            assert torch.equal(got[name], expected[name].reshape(tensor.shape)), (budget, name)
    per_tensor = mergelang.evaluate(f"trim(a, {density})", a=state)
    assert not all(torch.equal(per_tensor[n], got[n]) for n in state)
    p.close()


def test_l1_rescale_does_not_depend_on_chunks_or_threads_for_long_rows(tmp_path):
    g = torch.Generator().manual_seed(9)
    state = {"w": torch.randn(48, 4096, generator=g)}
    base = {"w": torch.randn(48, 4096, generator=g)}
    program = compile_in(tmp_path, 'base = model("base")\na = model("a")\n'
                         'output dare_linear(a - base, density=0.3, rescale="l1")',
                         base=base, a=state)
    p = program.plan()
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads, budget in ((2, 10**9), (1, 10**9), (2, 1), (2, 300_000)):
            torch.set_num_threads(n_threads)
            results.append(run_all(p, budget)["w"])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    p.close()


def test_a_whole_model_trim_of_a_trim_is_a_diagnostic(tmp_path, capsys):
    from mergelang.cli import main

    for name, seed in (("a", 1), ("base", 0)):
        write_model(tmp_path / name, quantised_state(seed))
    script = tmp_path / "w.merge"
    script.write_text('a = model("a")\nbase = model("base")\n'
                      'output base + trim(trim(a - base, 0.5), 0.2, "model")\n')
    out = tmp_path / "out"
    assert main(["run", str(script), "-o", str(out), "--quiet"]) == 2
    text = capsys.readouterr().err
    assert f"{script}:3:15" in text and "whole-model reduction" in text
    assert "Traceback" not in text and not out.exists()
