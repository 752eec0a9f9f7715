"""The adapter sink: finished deltas in, a PEFT LoRA adapter folder out.

`output extract_lora(x, ...)` runs like any merge up to the last step: plan and execute
compute x tensor by tensor and hand each finished one (in row blocks) to this sink in
place of the sharded model writer. The sink assembles a tensor, factorises it if it is
a LoRA target (the SVD runs on the writer thread, while the next tensor is computed),
and keeps only the factors: rank-r A and B, small next to the tensor. Tensors kept whole
(embeddings, head, norms: PEFT's `modules_to_save`) are written as base + x, the base
tensor read here. At the end come `adapter_model.safetensors`, `adapter_config.json`
(the fields mergekit-extract-lora writes), `extraction.json` (each tensor's rank and
relative error) and a README model card holding the script; the folder is moved into
place by OutputFolder like a model folder.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..builtins import COMPUTE_DTYPES
from ..devices import parse_devices
from ..extraction.form import (
    BIAS,
    KEEP,
    LORA,
    SKIP,
    AdapterForm,
    keepable,
    layout,
    module_of,
    stores_transposed,
)
from ..extraction.svd import Factors, factorise
from .header import HeaderEntry, encode_header
from .hf import SCRIPT_KEY, write_text
from .lora_config import PREFIX
from .write import writing

if TYPE_CHECKING:
    from ..api import Program
    from ..diagnostics import Diagnostic
    from ..plan import Plan

REPORT = "extraction.json"
BLOCK = 1 << 20  # elements of a kept tensor's base read at once


class AdapterSink:
    """Receives finished rows of each delta (execute's sink) and keeps the adapter's
    tensors; `finish` writes the folder."""

    def __init__(self, p: Plan, form: AdapterForm, dtype: str | None, device: str = "cpu"):
        self.plan, self.form = p, form
        self.roles = layout(form, p)
        self.base = p.bound.models[form.base].source
        self.fan_in_fan_out = stores_transposed(self.base.config)
        self.device = parse_devices(device)[0]
        self.shapes = {t.name: t.shape for t in p.tensors}
        # written in `dtype` if given, else in the base's dtype (compute dtype if it has none)
        self.dtypes = {t.name: COMPUTE_DTYPES[dtype] if dtype else
                       getattr(self.base.tensors.get(t.name), "dtype", t.out_dtype)
                       for t in p.tensors}
        self.partial: dict[str, tuple[torch.Tensor, int]] = {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.factors: dict[str, Factors] = {}
        self.lock = threading.Lock()

    def write_rows(self, name: str, row0: int, part: torch.Tensor) -> None:
        shape = self.shapes[name]
        rows = shape[0] if shape else 1
        if not shape or (row0 == 0 and len(part) == rows):
            self._finished(name, part.reshape(shape))
            return
        with self.lock:
            whole, filled = self.partial.get(name) or (torch.empty(shape, dtype=part.dtype), 0)
            whole[row0:row0 + len(part)] = part
            filled += len(part)
            self.partial[name] = (whole, filled)
            if filled < rows:
                return
            del self.partial[name]
        self._finished(name, whole)

    def _finished(self, name: str, delta: torch.Tensor) -> None:
        role, dtype = self.roles[name], self.dtypes[name]
        if role == LORA:
            # a Conv1D weight is stored [in, out]; the pair PEFT loads factorises [out, in]
            oriented = delta.T if self.fan_in_fan_out else delta
            f = factorise(oriented.to(self.device), self.form.rank, self.form.energy,
                          self.form.svd, self.plan.seed, name)
            module = PREFIX + name.removesuffix(".weight")
            with self.lock:
                self.factors[name] = f
                self.tensors[module + ".lora_A.weight"] = f.a.to(dtype).cpu().contiguous()
                self.tensors[module + ".lora_B.weight"] = f.b.to(dtype).cpu().contiguous()
        elif role == BIAS:
            with self.lock:
                self.tensors[PREFIX + module_of(name) + ".lora_B.bias"] = \
                    delta.to(dtype).cpu().contiguous()
        elif role == KEEP:
            whole = self._base_plus(name, delta, dtype)
            with self.lock:
                self.tensors[PREFIX + name] = whole

    def _base_plus(self, name: str, delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """base + delta in `dtype`, a block of rows at a time: an embedding's float32 copy
        of the base would cost as much as the delta itself."""
        if delta.dim() == 0:
            return (self.base.load(name, None, delta.dtype) + delta).to(dtype)
        whole = torch.empty(delta.shape, dtype=dtype)
        step = max(1, BLOCK // max(1, delta[0].numel()))
        for r in range(0, len(delta), step):
            rows = (r, min(r + step, len(delta)))
            block = self.base.load(name, rows, delta.dtype).add_(delta[rows[0]:rows[1]])
            whole[rows[0]:rows[1]] = block
        return whole

    def finish(self, folder: Path, script: str, script_name: str) -> None:
        """Write the adapter files into `folder`."""
        target = [n for n, r in self.roles.items() if r == LORA]
        ranks = {n.removesuffix(".weight"): self.factors[n].rank for n in target}
        top = max(ranks.values(), default=self.form.rank or 1)
        config = adapter_config(self.plan, self.form, ranks, top, self.roles,
                                self.fan_in_fan_out)
        save_tensors(folder / "adapter_model.safetensors", self.tensors,
                     {"format": "pt", SCRIPT_KEY: "see README.md"})
        write_text(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
        write_text(folder / REPORT, json.dumps(self.report(), indent=2) + "\n")
        write_card(folder, script, script_name, config["base_model_name_or_path"])

    def report(self) -> dict[str, Any]:
        """Each factorised tensor's rank and relative error ||x - B A||_F / ||x||_F, and
        the error over all of them together."""
        rows = [{"name": n, "shape": list(self.shapes[n]), "rank": f.rank,
                 "error": f.error, "norm": f.norm, "method": f.method}
                for n, f in sorted(self.factors.items())]
        total = sum(r["norm"] ** 2 for r in rows)
        lost = sum((r["error"] * r["norm"]) ** 2 for r in rows)
        return {"rank": self.form.rank, "energy": self.form.energy,
                "overall_error": (lost / total) ** 0.5 if total > 0 else 0.0,
                "parameters": sum(t.numel() for t in self.tensors.values()),
                "tensors": rows,
                "kept": sorted(n for n, r in self.roles.items() if r == KEEP),
                "dropped": sorted(n for n, r in self.roles.items() if r == SKIP),
                "keepable": keepable(self.roles)}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
                 ) -> None:
    """A safetensors file whose bytes depend only on its contents (the safetensors library
    orders metadata keys differently from run to run); widest dtypes first, so every
    tensor stays aligned, then by name."""
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries, position = [], 0
    for n in names:
        nbytes = tensors[n].numel() * tensors[n].element_size()
        entries.append(HeaderEntry(n, tensors[n].dtype, tuple(tensors[n].shape), position,
                                   position + nbytes))
        position += nbytes
    with writing(path), open(path, "wb") as f:
        f.write(encode_header(metadata, entries))
        for n in names:
            f.write(memoryview(tensors[n].contiguous().view(-1).view(torch.uint8).numpy()))


def adapter_config(p: Plan, form: AdapterForm, ranks: dict[str, int], top: int,
                   roles: dict[str, str], fan_in_fan_out: bool = False) -> dict[str, Any]:
    """adapter_config.json as mergekit-extract-lora writes it: lora_alpha = r, so PEFT
    applies B A at scale 1; modules of another rank (energy=) in rank_pattern and
    alpha_pattern; fan_in_fan_out for weights stored [in, out] (GPT-2's Conv1D)."""
    modules = {module_of(n): r for n, r in roles.items() if r in (LORA, KEEP)}
    different = {m: r for m, r in sorted(ranks.items()) if r != top}
    config = p.bound.models[form.base].source.config or {}
    causal = any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or ())
    return {
        "base_model_name_or_path": form.base,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if causal else None,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": different,
        "alpha_pattern": different,
        "target_modules": target_names(modules),
        "modules_to_save": sorted(m for m, r in modules.items() if r == KEEP) or None,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": BIAS in roles.values(),
        "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True,
    }


def target_names(modules: dict[str, str]) -> list[str]:
    """target_modules: a module's last name (q_proj) where every module of that name is a
    target, as mergekit writes them; the full name otherwise, so PEFT wraps no module
    that is not (PEFT matches a name or a suffix after a dot)."""
    by_suffix: dict[str, list[str]] = {}
    for module in modules:
        by_suffix.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    names: set[str] = set()
    for suffix, group in by_suffix.items():
        targets = [m for m in group if modules[m] == LORA]
        names.update([suffix] if len(targets) == len(group) else targets)
    return sorted(names)


def write_card(folder: Path, script: str, script_name: str, base: str) -> None:
    """README.md: Hub metadata (a PEFT adapter, tagged mergelang, so --force knows it as
    a previous output) and the script that made it."""
    fence = "```"
    while fence in script:
        fence += "`"
    body = script if script.endswith("\n") else script + "\n"
    write_text(folder / "README.md", (
        "---\ntags:\n- lora\n- mergelang\nlibrary_name: peft\n---\n\n"
        f"# {Path(script_name).stem or 'adapter'}\n\n"
        f"A LoRA adapter for `{Path(base).name}` extracted by mergelang from the script "
        f"`{script_name}`:\n\n{fence}merge\n{body}{fence}\n"))


def writer(form: AdapterForm, out_dtype: str | None, cluster: object = None
           ) -> Callable[..., list[Diagnostic]]:
    """The function Program.run calls in place of its model writer."""
    if cluster is not None:
        from ..diagnostics import error
        raise error("extract_lora() writes its adapter from one process; a cluster run is "
                    "not supported", form.span, hint="drop --scheduler / --workers")

    def write(program: Program, p: Plan, folder: Path, device: str, shard_bytes: int,
              strict: bool, progress, budget: int, order) -> list[Diagnostic]:
        from ..diagnostics import MergeError
        from ..execute import execute
        sink = AdapterSink(p, form, out_dtype or program.lowered.out_dtype, device)
        try:
            warnings = program.in_script(execute(p, sink.write_rows, device, strict,
                                                  progress, budget, order))
        except MergeError as exc:
            raise MergeError(program.in_script(exc.diagnostics)) from None
        name = program.path.name if program.path else "extract.merge"
        sink.finish(folder, program.source_text, name)
        return warnings
    return write
