"""extract_lora of a model whose linear layers are transformers' Conv1D (GPT-2: weights
stored [in, out]): PEFT builds the adapter's A as [r, in] and B as [out, r] and adds
(B A)^T, so the adapter must factorise the stored matrix's transpose and say
fan_in_fan_out. Checked with PEFT's own loading and merge_and_unload."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.helpers import mergelang


def gpt2_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny GPT-2 and a fine-tune of it whose every Conv1D weight moved by a rank-1
    matrix, so a rank-1 adapter holds the change exactly."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=2, n_head=2, vocab_size=20,
                                       n_positions=8))
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv1D):
                w = module.weight  # [in, out]
                w.add_(torch.randn(w.shape[0], 1, generator=g)
                       @ torch.randn(1, w.shape[1], generator=g))
    model.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft"


def test_a_gpt2_adapter_loads_in_peft_and_gives_the_fine_tune_back(tmp_path, capsys):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    base, ft = gpt2_pair(tmp_path)
    made = mergelang(capsys, "extract", ft, "--base", base, "--rank", "1",
                     "-o", tmp_path / "adapter")
    assert made.code == 0, made.text
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base),
                                       tmp_path / "adapter").merge_and_unload()
    want = GPT2LMHeadModel.from_pretrained(ft).state_dict()
    got = merged.state_dict()
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
