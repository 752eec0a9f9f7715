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
