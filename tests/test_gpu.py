"""The GPU path gives the CPU's results (skipped where torch finds no CUDA GPU)."""

from __future__ import annotations

import pytest
import torch

from mergelang.execute import Collector, execute
from tests.helpers import METHODS, four_models

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def merge(tmp_path, expression: str, device: str, budget: int) -> dict[str, torch.Tensor]:
    p = four_models(tmp_path / device.replace(":", "_").replace(",", "_"), expression, seed=3)
    results = Collector(p.tensors)
    execute(p, results.sink, device, budget=budget)
    p.close()
    return results.tensors


@cuda
@pytest.mark.parametrize("expression", METHODS)
@pytest.mark.parametrize("budget", [10**9, 1])
def test_gpu_matches_cpu(tmp_path, expression, budget):
    on_cpu = merge(tmp_path, expression, "cpu", budget)
    on_gpu = merge(tmp_path, expression, "cuda", budget)
    for name, tensor in on_cpu.items():
        assert on_gpu[name].device.type == "cpu"
        torch.testing.assert_close(on_gpu[name], tensor, rtol=1e-6, atol=1e-6)
        assert torch.equal(on_gpu[name] == 0, tensor == 0), name  # same drops, same trims


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than two GPUs")
def test_several_gpus_split_the_tensors(tmp_path):
    expression = METHODS[2]
    one = merge(tmp_path, expression, "cuda:0", 10**9)
    every = merge(tmp_path, expression, "cuda:all", 10**9)
    for name in one:
        assert torch.equal(one[name], every[name]), name


@cuda
@pytest.mark.parametrize("rule", ["ondare(update, ref, keep=0.1, alpha=0.3)",
                                  "onties(update, ref, keep=0.1, alpha=0.3)"])
def test_online_rules_on_sparse_values_on_the_gpu(rule):
    """Sparse values on the GPU (unions by torch.unique there): the CPU's results."""
    import mergelang
    from mergelang.sparse import Difference, Sparse
    g = torch.Generator().manual_seed(0)
    after = {"w": torch.randn(300, 200, generator=g), "b": torch.randn(200, generator=g)}
    before = {k: torch.randn(v.shape, generator=g) for k, v in after.items()}
    tau = {k: torch.randn(v.shape, generator=g) for k, v in after.items()}
    prepare = rule.split("(")[0] + "_ref(tau, keep=0.1)"
    ref = mergelang.evaluate(prepare, tau=tau, seed=1)
    sparse_ref = {}
    for k, v in ref.items():
        at = v.reshape(-1).nonzero().squeeze(1)
        sparse_ref[k] = Sparse(at, v.reshape(-1)[at], v.shape)
    expr = mergelang.expression(rule)
    on_cpu = expr(update={k: after[k] - before[k] for k in after}, ref=ref, seed=2)
    update = {k: Difference(after[k].cuda(), before[k].cuda(), in_place=True) for k in after}
    on_gpu = expr.sparse(update=update, ref={k: v.to(device="cuda") for k, v in
                                             sparse_ref.items()}, seed=2, device="cuda")
    for name, tensor in on_cpu.items():
        got = on_gpu[name].dense() if isinstance(on_gpu[name], Sparse) else on_gpu[name]
        torch.testing.assert_close(got.cpu(), tensor, rtol=1e-6, atol=1e-6)
