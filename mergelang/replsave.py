"""The REPL's `:save` (the session as a script, merged into a model folder, with progress)
and `:set` (the session's options)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from . import api, ast
from .builtins import DTYPES
from .devices import parse_devices
from .diagnostics import Span, error
from .io.write import parse_size
from .session import Session
from .unparse import unparse


def script_text(session: Session, expr: ast.Expr) -> str:
    """The session's statements and `output expr` as one script. Model paths and imports
    are made absolute, since the statements may come from scripts in several folders."""
    statements = [_absolute(s, _folder(s.span)) for s in session.statements]
    output = ast.Output(expr.span, _absolute(expr, _folder(expr.span)))
    return unparse(ast.Module(expr.span.source, (*statements, output)))


def _folder(span: Span) -> Path:
    return span.source.path.parent if span.source.path is not None else Path.cwd()


def _absolute(node: Any, folder: Path) -> Any:
    if isinstance(node, ast.Import):
        return dataclasses.replace(node, path=str((folder / node.path).resolve()))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "model" and node.args and isinstance(node.args[0], ast.String)):
        path = ast.String(node.args[0].span, str((folder / node.args[0].value).resolve()))
        return dataclasses.replace(node, args=(path, *node.args[1:]))
    if isinstance(node, tuple):
        return tuple(_absolute(n, folder) for n in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, Span) and not isinstance(
            node, type):
        changes = {f.name: _absolute(getattr(node, f.name), folder)
                   for f in dataclasses.fields(node) if f.name != "span"}
        return dataclasses.replace(node, **changes)
    return node


def save(session: Session, expr: ast.Expr, out: Path, console: Console,
         interactive: bool) -> None:
    """Merge `expr` into the folder `out`, as `mergelang run` would (the model card holds
    the session's script)."""
    program = api.compile(script_text(session, expr), session.path)
    options = session.options
    progress = Progress(TextColumn("merging {task.fields[done]}/{task.fields[count]} tensors"),
                        BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        console=console, disable=not interactive, transient=True)
    state: dict = {}

    def started(p: Any) -> None:
        state["task"] = progress.add_task("merge", total=p.output_bytes, done=0,
                                          count=len(p.tensors))
        state["done"] = 0

    def advance(tensor: Any) -> None:
        state["done"] += 1
        progress.update(state["task"], advance=tensor.nbytes, done=state["done"])

    with progress:
        warnings = program.run(out, options.device, seed=options.seed, dtype=options.dtype,
                               out_dtype=options.out_dtype, max_memory=options.max_memory,
                               progress=advance, on_plan=started)
    for w in warnings:
        console.print(w.render(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out}", markup=False, highlight=False)


OPTIONS = {
    "dtype": "compute dtype (overrides `set dtype`)",
    "out_dtype": "dtype shown and saved (overrides `set out_dtype`)",
    "seed": "seed of every random op (overrides `set seed`)",
    "device": "cpu, cuda or cuda:N",
    "max_memory": "tensor data held at once while computing, e.g. 500MB",
    "cache": "computed values kept for reuse, e.g. 2GB",
}


def set_option(session: Session, arg: str, say: Callable[[str], None]) -> None:
    """`:set` lists the options; `:set NAME VALUE` sets one (`none` resets a setting to
    the script's)."""
    options = session.options
    if not arg:
        shown = {**dataclasses.asdict(options), "cache": session.cache.limit}
        for key, what in OPTIONS.items():
            say(f"{key:<11} {shown[key]!s:<12} {what}")
        return
    key, _, value = arg.partition(" ")
    key, value = key.replace("-", "_"), value.strip()
    if key not in OPTIONS:
        raise error(f'unknown option "{key}"', None, hint=f"options: {', '.join(OPTIONS)}")
    if not value:
        raise error(f":set {key} needs a value", None, hint=f"{key}: {OPTIONS[key]}")
    if key in ("dtype", "out_dtype"):
        if value not in (*DTYPES, "none"):
            raise error(f'unknown {key} "{value}"', None, hint=f"use one of {', '.join(DTYPES)}")
        setattr(options, key, None if value == "none" else value)
    elif key == "seed":
        if value != "none" and not value.isdigit():
            raise error(f'seed must be a whole number >= 0, not "{value}"', None)
        options.seed = None if value == "none" else int(value)
    elif key == "device":
        parse_devices(value)
        options.device = value
    else:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise error(str(exc), None, hint="e.g. 500MB") from None
        if key == "cache":
            session.cache.limit = size
            session.cache.clear()
        else:
            options.max_memory = size
    say(f"{key} = {value}")
