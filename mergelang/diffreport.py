"""How `mergelang diff` shows a `Comparison`: rich tables, and per-layer heatmaps.

The tables have one row per layer (embeddings first, head last) and one per module type;
each figure has a column per model (or per pair of models, for cosines). The heatmaps
(`--plot FILE.png`, matplotlib, the `plot` extra) put module types down and layers
across, one panel per figure and model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .compare import Comparison, Sums
from .diagnostics import Diagnostic, MergeError
from .structure import PLACE_LABELS, module_of, place_of


def short_labels(labels: list[str]) -> list[str]:
    """The models' names as columns: their folder names, unless two are the same."""
    names = [Path(label).name or label for label in labels]
    return names if len(set(names)) == len(names) else labels


def _columns(c: Comparison, names: list[str]) -> list[tuple[str, Any]]:
    """(header, figure of a Sums) for every column of the tables."""
    n = len(c.models)
    cols: list[tuple[str, Any]] = [("norm " + names[i], lambda s, i=i: s.relative_norm(i))
                                   for i in range(n)]
    cols += [(f"cos {names[i]}·{names[j]}", lambda s, i=i, j=j: s.cosine(i, j))
             for i in range(n) for j in range(i + 1, n)]
    if n > 1:
        cols.append(("conflicts", Sums.sign_conflicts))
    cols += [(f"trim {names[i]}", lambda s, i=i: s.trim_mass(i)) for i in range(n)]
    return cols


def _number(x: float) -> str:
    if math.isnan(x):
        return "—"
    return f"{x:.4f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def render(c: Comparison, console: Any) -> None:
    """The comparison as three parts: the whole model, by layer, by module type."""
    from rich.table import Table

    names = short_labels([c.base, *c.models])
    cols = _columns(c, names[1:])
    total = c.total()
    console.print(f"[bold]diff[/] against {c.base}: {', '.join(c.models)} "
                  f"({len(c.tensors)} tensors, {total.numel:,} parameters)")
    console.print(f"norm: ‖model - base‖ / ‖base‖; cos: cosine of two task vectors; "
                  f"conflicts: entries whose deltas, each trimmed to its top {c.density:g}, "
                  f"disagree in sign; trim: the share of a delta's L1 mass that trim at "
                  f"density {c.density:g} keeps (a random drop keeps {c.density:g} of it, in "
                  f"expectation)")
    for title, groups in (("whole model", {"all": total}), ("by layer", c.by_layer()),
                          ("by module type", c.by_module())):
        table = Table(title=title, title_justify="left")
        table.add_column("layer" if title == "by layer" else "module", no_wrap=True)
        for header, _ in cols:
            table.add_column(header, justify="right")
        for key, sums in groups.items():
            table.add_row(PLACE_LABELS.get(key, key), *(_number(f(sums)) for _, f in cols))
        console.print(table)
    for name, reason in list(c.skipped.items())[:10]:
        console.print(f"[yellow]skipped[/] {name}: {reason}")
    if len(c.skipped) > 10:
        console.print(f"[yellow]skipped[/] {len(c.skipped) - 10} more tensors")


def plot(c: Comparison, path: Path) -> None:
    """Per-layer heatmaps: module types down, layers across. Raises MergeError without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MergeError(Diagnostic("--plot needs matplotlib",
                                    hint='pip install "mergelang[plot]"')) from None
    layers = sorted({k for k in c.by_layer() if k.isdigit()}, key=int)
    if not layers:
        raise MergeError(Diagnostic("--plot draws per-layer heatmaps, and these models have "
                                    "no layers that mergelang can find"))
    cells: dict[tuple[str, str], Sums] = c.group(lambda name: _cell(name))
    modules = list(dict.fromkeys(m for (m, layer) in cells if layer in layers))
    names = short_labels([c.base, *c.models])[1:]
    panels = _columns(c, names)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(6.0, 0.45 * len(layers) + 3),
                                      len(panels) * (0.3 * len(modules) + 1.2)))
    for ax, (title, figure) in zip(axes[:, 0], panels, strict=True):
        grid = [[figure(cells[(m, layer)]) if (m, layer) in cells else math.nan
                 for layer in layers] for m in modules]
        if title.startswith("cos"):  # centred: blue against, red along
            extent = max((abs(v) for row in grid for v in row if not math.isnan(v)),
                         default=1.0) or 1.0
            style = {"cmap": "coolwarm", "vmin": -extent, "vmax": extent}
        else:
            style = {"cmap": "viridis"}
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", **style)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(modules)), modules, fontsize=7)
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        fig.colorbar(image, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(name: str) -> tuple[str, str]:
    return (module_of(name), place_of(name))
