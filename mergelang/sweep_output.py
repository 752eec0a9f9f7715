"""What a sweep leaves besides its results file: the best point's script and model
(`--keep-best OUT`), and a plot of the scores against each parameter (`--plot FILE`).

The kept script is the swept script itself, comments and layout as written, with each
`param`'s default replaced by the best point's value, and its relative `model(...)` and
`import` paths rewritten for the folder it is written to. So the script is the record of
the merge: compiling it with no `-D` gives exactly the model kept beside it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from . import api, ast
from .diagnostics import Diagnostic, MergeError, Span, error
from .params import Value, text
from .sweep import Record, Sweep
from .sweep_search import require
from .unparse import string_text


@dataclasses.dataclass(frozen=True)
class Kept:
    script: Path
    model: Path
    warnings: list[Diagnostic]


def script_path(out: Path) -> Path:
    """Where `--keep-best OUT` writes the script: `OUT.merge`, beside the model folder."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + ".merge")


def keep_best(sweep: Sweep, out: str | Path, *, force: bool = False,
              device: str = "cpu") -> Kept:
    """Write the best point's script (`OUT.merge`) and merge it into the folder `OUT`.
    Raises MergeError when no point is finished or a target is in the way."""
    best = sweep.best()
    if best is None:
        raise error("no point of this sweep is finished, so there is no best to keep", None,
                    hint="run the sweep first (without --keep-best, or with it)")
    out = Path(out)
    script = script_path(out)
    if script.resolve() == sweep.script.resolve():
        raise error(f"--keep-best {out} would write its script over the swept script "
                    f"{sweep.script}", None, hint="choose another name for OUT")
    if script.exists() and not force:
        raise error(f"{script} already exists", None,
                    hint="pass --force to replace it (and the model folder), or choose "
                         "another --keep-best name")
    source, rest = filled_in(sweep, best, script.parent)
    program = api.compile(source, script, params=rest)
    warnings = program.run(out, device, force=force)
    notes = [Diagnostic(f'parameter "{n}" is declared in an imported file, so its value '
                        f"{text(v)} is not written into {script.name}; run it with "
                        f"-D {n}={text(v)}", severity="warning") for n, v in rest.items()]
    temp = script.with_name(f".{script.name}.tmp-{os.getpid()}")
    try:
        temp.write_text(source, encoding="utf-8")
        os.replace(temp, script)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise error(f"cannot write {script}: {exc.strerror}", None) from None
    return Kept(script, out, warnings + notes)


def filled_in(sweep: Sweep, record: Record, folder: Path) -> tuple[str, dict[str, Value]]:
    """The swept script's text with `record`'s values as its parameters' defaults and its
    relative paths made relative to `folder`; and the values of parameters declared in
    imported files, which the text cannot hold."""
    program = api.load(sweep.script)
    module = program.module
    edits: list[tuple[Span, str]] = []
    written = set()
    for stmt in module.statements:
        if isinstance(stmt, ast.ParamDecl) and stmt.name in record.params:
            edits.append((stmt.value.span, text(record.params[stmt.name])))
            written.add(stmt.name)
    here = sweep.script.resolve().parent
    if folder.resolve() != here:
        edits += _moved_paths(module, here, folder.resolve())
    described = ", ".join(f"{k}={text(v)}" for k, v in record.params.items())
    head = (f"# The best point of a sweep ({described}): objective {record.objective:.4g} "
            f"({_objective_words(sweep.objective)}), from {sweep.results.path.name}.\n")
    body = _apply(module.source.text, edits)
    return head + body, {k: v for k, v in record.params.items() if k not in written}


def _objective_words(objective: str) -> str:
    return {"mean": "mean over tasks", "min": "minimum over tasks"}.get(
        objective, f"task {objective}")


def _moved_paths(module: ast.Module, old: Path, new: Path) -> list[tuple[Span, str]]:
    """Edits that keep each relative `model("...")` and `import "..."` path pointing at
    the same file from `new` as it did from `old`."""
    edits = []
    for node in _walk(module.statements):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "model" and node.args
                and isinstance(node.args[0], ast.String)):
            path = node.args[0].value
            if not os.path.isabs(path):
                edits.append((node.args[0].span, string_text(_relative(old / path, new))))
        elif isinstance(node, ast.Import) and not os.path.isabs(node.path):
            edits.append((node.span, "import " + string_text(_relative(old / node.path, new))))
    return edits


def _relative(target: Path, folder: Path) -> str:
    return Path(os.path.relpath(target, folder)).as_posix()


def _walk(node: object) -> Iterator[object]:
    if isinstance(node, tuple):
        for item in node:
            yield from _walk(item)
    elif dataclasses.is_dataclass(node) and not isinstance(node, Span):
        yield node
        for f in dataclasses.fields(node):
            yield from _walk(getattr(node, f.name))


def _apply(source: str, edits: list[tuple[Span, str]]) -> str:
    """The text with each span replaced, from the last to the first."""
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))

    def offset(line: int, col: int) -> int:
        return starts[line - 1] + col - 1

    out = source
    for span, new in sorted(edits, key=lambda e: (e[0].line, e[0].col), reverse=True):
        out = out[:offset(span.line, span.col)] + new + out[offset(span.end_line, span.end_col):]
    return out


# the plot


def check_plot_target(file: str | Path) -> None:
    """Before the sweep: matplotlib is there, the folder exists, the format is known."""
    require("matplotlib", "--plot")
    from matplotlib.figure import Figure

    file = Path(file)
    kinds = Figure().canvas.get_supported_filetypes()
    kind = file.suffix.lstrip(".").lower()
    if kind not in kinds:
        raise error(f'--plot {file}: unknown image format "{file.suffix}"', None,
                    hint="use a name ending in .png, .svg or .pdf")
    if not file.parent.resolve().is_dir():
        raise error(f"--plot {file}: the folder {file.parent} does not exist", None)


def plot(sweep: Sweep, file: str | Path) -> Path:
    """One panel per swept parameter: at each of its values, the best point with that
    value (over the other parameters): its objective, thick, and each task's exact match;
    the best point of all is starred, so a panel reads as "the best this value can do"."""
    check_plot_target(file)
    from matplotlib.figure import Figure

    records = sweep.finished()
    if not records:
        raise MergeError(Diagnostic("no point of this sweep is finished: nothing to plot"))
    axes = [a for a in sweep.axes if len(a.values) > 1] or sweep.axes[:1]
    fig = Figure(figsize=(4.8 * max(len(axes), 1), 3.8), layout="constrained")
    best = sweep.best()
    for i, axis in enumerate(axes):
        ax = fig.add_subplot(1, len(axes), i + 1)
        values = [v for v in axis.values if any(r.params[axis.name] == v for r in records)]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        xs = list(values) if numeric else list(range(len(values)))
        tops = [max((r for r in records if r.params[axis.name] == v),
                    key=lambda r: r.objective) for v in values]
        for task in [*sweep.task_names, None]:
            ys = [r.objective if task is None else r.scores[task] for r in tops]
            if task is None:
                ax.plot(xs, ys, "-o", color="black", linewidth=2.2,
                        label=f"objective ({_objective_words(sweep.objective)})")
            else:
                ax.plot(xs, ys, "-", marker=".", linewidth=1, alpha=0.8, label=task)
        if best is not None and best.params[axis.name] in values:
            x = values.index(best.params[axis.name])
            ax.plot([xs[x]], [best.objective], "*", color="red", markersize=14, label="best")
        if not numeric:
            ax.set_xticks(xs, [text(v) for v in values], rotation=30)
        ax.set_xlabel(axis.name)
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize="small")
    file = Path(file)
    fig.savefig(file)
    return file


__all__ = ["Kept", "check_plot_target", "filled_in", "keep_best", "plot", "script_path"]
