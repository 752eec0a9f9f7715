"""What `mergelang check` says an `output extract_lora(...)` will write: the adapter, not
the dense delta the plan computes on the way. Everything comes from the headers: each
tensor's role (form.layout), its shape, and the dtype the adapter sink writes it in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..builtins import COMPUTE_DTYPES
from .form import BIAS, KEEP, LORA, SKIP, AdapterForm, layout, stores_transposed

if TYPE_CHECKING:
    from ..plan import Plan


@dataclass(frozen=True)
class AdapterSummary:
    """The adapter's parts; with `energy`, ranks (and so bytes) are upper bounds, as the
    data decides each tensor's rank."""

    factorised: int          # modules written as lora_A and lora_B
    rank: int | None         # their rank (the largest one with energy); None: by energy only
    energy: float | None
    kept: int                # tensors of modules_to_save: written whole as base + delta
    biases: int              # lora_B biases (lora_bias)
    dropped: int             # tensors no adapter part holds
    bytes: int               # adapter_model.safetensors' tensor data (upper bound by energy)

    def line(self, size: str) -> str:
        """One line for `check`; `size` is `bytes` as the command writes sizes."""
        if self.rank is None:
            rank = f"rank by energy {self.energy}"
        elif self.energy is not None:
            rank = f"rank at most {self.rank}, by energy {self.energy}"
        else:
            rank = f"rank {self.rank}"
        parts = [f"{self.factorised} factorised modules ({rank})",
                 f"{self.kept} tensors kept whole"]
        parts += [f"{self.biases} lora_B biases"] if self.biases else []
        parts += [f"{self.dropped} tensors dropped"] if self.dropped else []
        bound = "at most" if self.energy is not None else "about"
        return f"a LoRA adapter: {', '.join(parts)}; {bound} {size}"


def summarize_adapter(p: Plan, form: AdapterForm, out_dtype: str | None) -> AdapterSummary:
    """The adapter `p`'s run writes, in the dtypes the adapter sink writes (`out_dtype`
    if given, else each base tensor's)."""
    roles = layout(form, p)
    base = p.bound.models[form.base].source
    transposed = stores_transposed(base.config)
    total, ranks = 0, []
    for t in p.tensors:
        role = roles[t.name]
        dtype = COMPUTE_DTYPES[out_dtype] if out_dtype else \
            getattr(base.tensors.get(t.name), "dtype", t.out_dtype)
        size = dtype.itemsize
        if role == LORA:
            out, inp = reversed(t.shape) if transposed else t.shape
            r = min(form.rank or min(out, inp), out, inp)
            ranks.append(r)
            total += r * (out + inp) * size
        elif role in (BIAS, KEEP):
            total += math.prod(t.shape) * size
    count = list(roles.values()).count
    return AdapterSummary(factorised=count(LORA), rank=form.rank, energy=form.energy,
                          kept=count(KEEP), biases=count(BIAS), dropped=count(SKIP),
                          bytes=total)
