"""How the REPL shows values: a tensor's statistics and histogram, a number per tensor, a
model expression's summary, a row of `:stats`. Plain text, so it reads the same in a
terminal, a pipe and a test."""

from __future__ import annotations

import math
from collections import Counter

import torch

from .bind import layer_of
from .plan import TensorPlan
from .session import Stats
from .structure import (
    PLACE_LABELS,
    Structure,
    count_text,
    dtype_name,
    layer_runs,
    module_of,
    place_of,
)

_BARS = "▁▂▃▄▅▆▇█"
BINS = 16


def histogram(x: torch.Tensor, bins: int = BINS) -> str:
    """A one-line histogram of the finite values between their min and max, one bar per
    bin, heights on a log scale (so the tails of a spiky delta still show); a blank is an
    empty bin."""
    x = x.detach().reshape(-1).float()
    x = x[torch.isfinite(x)]
    if not x.numel():
        return ""
    low, high = float(x.min()), float(x.max())
    if low == high:
        return "(constant)"
    counts = torch.histc(x, bins, low, high)
    top = math.log1p(float(counts.max()))
    return "".join(" " if c == 0 else _BARS[min(len(_BARS) - 1, round(
        math.log1p(float(c)) / top * (len(_BARS) - 1)))] for c in counts.tolist())


def tensor_view(name: str, x: torch.Tensor, dtype: torch.dtype) -> str:
    """Two lines: what the tensor is (with its histogram), and its statistics. `x` holds
    the values as written (in `dtype`)."""
    values = x.detach().double()
    head = f"tensor {name}  shape {list(x.shape)}  {dtype_name(dtype)}  {histogram(x)}".rstrip()
    if not values.numel():
        return head + "\n(empty)"
    finite = torch.isfinite(values)
    bad = int((~finite).sum())
    shown = values[finite] if bad else values
    if not shown.numel():
        return head + f"\nevery value is NaN or infinite ({bad})"
    std = float(shown.std()) if shown.numel() > 1 else 0.0
    nonzero = float((values != 0).double().mean()) * 100
    stats = (f"mean {float(shown.mean()):.4g}  std {std:.4g}  min {float(shown.min()):.4g}  "
             f"max {float(shown.max()):.4g}  norm {float(shown.norm()):.4g}  "
             f"nonzero {nonzero:.1f}%")
    return head + "\n" + stats + (f"  non-finite {bad}" if bad else "")


def number_view(what: str, value: float, name: str | None) -> str:
    where = f"   (for {name})" if name is not None else "   (the whole model)"
    return f"{what} = {value:.6g}{where}"


def model_summary(s: Structure, planned: list[TensorPlan]) -> str:
    """A model expression as structure: counts, dtypes, layers, and each kind of tensor
    once (a layer's tensors as module types), with shapes."""
    dtypes = Counter(dtype_name(t.out_dtype) for t in planned)
    lines = [f"model: {len(planned)} tensors, {count_text(s.parameters)} parameters, "
             + ", ".join(f"{d} ×{n}" for d, n in dtypes.items())
             + (f", {s.num_layers} layers" if s.num_layers else "")]
    shapes = {t.name: t.shape for t in planned}
    for run, group in layer_runs(s):
        first = run if run in PLACE_LABELS else run.split(",")[0].split("-")[0].strip()
        names = [n for n in shapes if place_of(n) == first]
        label = PLACE_LABELS.get(run, f"layers {run}, each")
        items = [f"{module_of(n) if layer_of(n) is not None else n} shape {list(shapes[n])}"
                 for n in names]
        shown = ", ".join(items[:6]) + (f", ... {len(items) - 6} more" if len(items) > 6 else "")
        lines.append(f"  {label}: {count_text(group.parameters)} parameters: {shown}")
    lines.append('  x["regex"] shows tensors; :tensor REGEX focuses on one; :stats x, every one')
    return "\n".join(lines)


def stats_width(names: list[str]) -> int:
    """The width of the module column of `:stats` for these tensors."""
    return max(len(module_of(n)) for n in names)


def stats_header(width: int, number: bool) -> str:
    """`:stats` is a table by layer: a row per tensor, its layer first."""
    head = f"{'layer':>6}  {'tensor':<{width}}  {'shape':>14}"
    if number:
        return f"{head}  {'value':>11}"
    return (f"{head}  {'mean':>11}  {'std':>10}  {'min':>11}  {'max':>11}  {'norm':>10}  "
            f"{'nonzero':>8}")


def stats_row(t: TensorPlan, s: Stats, width: int, number: bool) -> str:
    """One tensor of `:stats`: its statistics, or its number (an analysis function)."""
    place = place_of(t.name)
    head = f"{place:>6}  {module_of(t.name):<{width}}  {str(list(t.shape)):>14}"
    if number:
        return f"{head}  {_g(s.first):>11}"
    nonzero = 100 * s.nonzero / s.count if s.count else 0.0
    return (f"{head}  {_g(s.mean):>11}  {_g(s.std):>10}  {_g(s.low):>11}  {_g(s.high):>11}  "
            f"{_g(s.norm):>10}  {nonzero:>7.1f}%")


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x + 0.0:.4g}"  # (+ 0.0: no "-0")
