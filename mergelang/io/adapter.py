"""The adapter sink: finished deltas in, a PEFT LoRA adapter folder out.

`output extract_lora(x, ...)` runs like any merge up to the last step: plan and execute
compute x tensor by tensor and hand each finished one (in row blocks) to this sink in
place of the sharded model writer. The sink assembles a tensor, factorises it if it is
a LoRA target (the SVD runs on the writer thread, while the next tensor is computed),
and keeps only the factors: rank-r A and B, small next to the tensor. Tensors kept whole
(embeddings, head, norms: PEFT's `modules_to_save`) are written as base + x, the base
tensor read here a block of rows at a time, and appended to a scratch file in the
output's temporary folder (KeptFile), so no kept tensor is held whole. At the end come
`adapter_model.safetensors` (the kept tensors' bytes copied in from the scratch file,
which is then removed), `adapter_config.json` (the fields mergekit-extract-lora writes),
`extraction.json` (each tensor's rank and relative error) and a README model card
holding the script; the folder is moved into place by OutputFolder like a model folder.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterable, Iterator
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

    def __init__(self, p: Plan, form: AdapterForm, dtype: str | None, device: str,
                 scratch: Path):
        self.plan, self.form = p, form
        self.kept = KeptFile(scratch)
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
        if shape and self.roles[name] == KEEP:  # written as it comes, never assembled
            dtype = self.dtypes[name]
            with self.lock:
                self.kept.write(PREFIX + name, dtype, tuple(shape), row0,
                                self._base_plus(name, part, dtype, row0))
            return
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
        elif role == KEEP:  # a 0-d tensor (kept tensors with rows go by write_rows)
            with self.lock:
                self.kept.write(PREFIX + name, dtype, (), 0, self._base_plus(name, delta, dtype))

    def _base_plus(self, name: str, delta: torch.Tensor, dtype: torch.dtype, row0: int = 0
                   ) -> Iterator[torch.Tensor]:
        """base + delta (rows row0... of the tensor) in `dtype`, a block of rows at a
        time: neither an embedding's float32 copy of the base nor the sum is held whole."""
        if delta.dim() == 0:
            yield (self.base.load(name, None, delta.dtype) + delta).to(dtype)
            return
        step = max(1, BLOCK // max(1, delta[0].numel()))
        for r in range(0, len(delta), step):
            rows = (row0 + r, row0 + min(r + step, len(delta)))
            yield self.base.load(name, rows, delta.dtype).add_(
                delta[r:r + step]).to(dtype)

    def finish(self, folder: Path, script: str, script_name: str) -> None:
        """Write the adapter files into `folder`."""
        target = [n for n, r in self.roles.items() if r == LORA]
        ranks = {n.removesuffix(".weight"): self.factors[n].rank for n in target}
        top = max(ranks.values(), default=self.form.rank or 1)
        config = adapter_config(self.plan, self.form, ranks, top, self.roles,
                                self.fan_in_fan_out)
        save_tensors(folder / "adapter_model.safetensors", self.tensors,
                     {"format": "pt", SCRIPT_KEY: "see README.md"}, self.kept)
        self.kept.close()
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
                "parameters": sum(t.numel() for t in self.tensors.values())
                + sum(math.prod(e[1]) for e in self.kept.entries.values()),
                "tensors": rows,
                "kept": sorted(n for n, r in self.roles.items() if r == KEEP),
                "dropped": sorted(n for n, r in self.roles.items() if r == SKIP),
                "keepable": keepable(self.roles)}


class KeptFile:
    """The tensors kept whole, appended as they are finished to a scratch file (in the
    output's temporary folder, so an error or Ctrl-C leaves nothing): the sink holds one
    block of rows of one at a time, and `save_tensors` copies their bytes into place."""

    def __init__(self, path: Path):
        self.path, self.file, self.end = path, None, 0
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}

    def write(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], row0: int,
              blocks: Iterable[torch.Tensor]) -> None:
        """Write consecutive blocks of `name`'s rows from row `row0` on, into the place
        the tensor was given when first written (after the tensors before it)."""
        if name not in self.entries:
            self.entries[name] = (dtype, shape, self.end)
            self.end += math.prod(shape) * dtype.itemsize
        start = self.entries[name][2] + row0 * math.prod(shape[1:]) * dtype.itemsize
        with writing(self.path):
            if self.file is None:
                self.file = open(self.path, "w+b")  # closed by close()
            self.file.seek(start)
            for block in blocks:
                self.file.write(_bytes_of(block))

    def copy(self, name: str, out: Any) -> None:
        """`name`'s bytes into the open file `out`, BLOCK bytes at a time."""
        dtype, shape, start = self.entries[name]
        left = math.prod(shape) * dtype.itemsize
        self.file.seek(start)
        while left:
            chunk = self.file.read(min(left, BLOCK))
            out.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        """Remove the scratch file (it must not be left in the adapter folder)."""
        if self.file is not None:
            self.file.close()
            self.file = None
            self.path.unlink(missing_ok=True)


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(-1).view(torch.uint8).numpy())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 kept: KeptFile | None = None) -> None:
    """A safetensors file whose bytes depend only on its contents (the safetensors library
    orders metadata keys differently from run to run); widest dtypes first, so every
    tensor stays aligned, then by name. `kept`'s tensors are copied from its file."""
    parts = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    parts.update((n, (e[0], e[1])) for n, e in (kept.entries if kept else {}).items())
    names = sorted(parts, key=lambda n: (-parts[n][0].itemsize, n))
    entries, position = [], 0
    for n in names:
        dtype, shape = parts[n]
        nbytes = math.prod(shape) * dtype.itemsize
        entries.append(HeaderEntry(n, dtype, shape, position, position + nbytes))
        position += nbytes
    with writing(path), open(path, "wb") as f:
        f.write(encode_header(metadata, entries))
        for n in names:
            if n in tensors:
                f.write(_bytes_of(tensors[n]))
            else:
                kept.copy(n, f)


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
        sink = AdapterSink(p, form, out_dtype or program.lowered.out_dtype, device,
                           folder / ".kept-tensors.tmp")
        try:
            try:
                warnings = program.in_script(execute(p, sink.write_rows, device, strict,
                                                     progress, budget, order))
            except MergeError as exc:
                raise MergeError(program.in_script(exc.diagnostics)) from None
            name = program.path.name if program.path else "extract.merge"
            sink.finish(folder, program.source_text, name)
        finally:
            sink.kept.close()
        return warnings
    return write
