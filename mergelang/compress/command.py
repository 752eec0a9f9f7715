"""The `mergelang compress` command: options, and the figures printed as a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..diagnostics import Diagnostic, MergeError, error
from ..io.write import parse_size
from ..schedule import DEFAULT_BUDGET_TEXT
from . import CommandLine, Report, compress

_VALUES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `compress` subcommand (cli.py registers it)."""
    p = sub.add_parser("compress", help="store a fine-tune's task vector compactly (sparse "
                                        "or 1-bit), to apply later as base + delta(...)")
    p.add_argument("ft", type=Path, help="the fine-tuned model")
    p.add_argument("--base", type=Path, required=True, help="the model it was trained from")
    p.add_argument("--density", help="keep the top DENSITY of each tensor by magnitude, "
                                     "in (0, 1]")
    p.add_argument("--bits", help="1: BitDelta's signs and a scale per matrix")
    p.add_argument("--values", choices=sorted(_VALUES),
                   help="the dtype kept values are stored in (default: the fine-tune's); "
                        "float32 keeps them exact")
    p.add_argument("-o", "--output", type=Path, required=True, help="the delta file")
    p.add_argument("--force", action="store_true", help="replace an existing delta file")
    p.add_argument("--max-memory", default=DEFAULT_BUDGET_TEXT,
                   help=f"tensor data held at once (default {DEFAULT_BUDGET_TEXT})")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(handler=run)
    return p


def run(args: argparse.Namespace, console: Console) -> int:
    where = CommandLine([(k, v) for k, v in (
        ("ft", str(args.ft)), ("--base", str(args.base)), ("--density", args.density),
        ("--bits", args.bits), ("-o", str(args.output)),
        ("--max-memory", args.max_memory if args.max_memory != DEFAULT_BUDGET_TEXT else None))
        if v is not None])
    density = _number(args.density, float, "--density", where, "0.1")
    bits = _number(args.bits, int, "--bits", where, "1")
    try:
        budget = parse_size(args.max_memory, minimum=1)
    except ValueError as exc:
        raise error(str(exc), where.span("--max-memory"), hint="e.g. --max-memory 500MB"
                    ) from None
    bar = Progress(TextColumn("compressing {task.completed}/{task.total} tensors"),
                   BarColumn(), TimeRemainingColumn(), console=console, transient=True,
                   disable=args.quiet or args.json or not console.is_terminal)
    task = bar.add_task("compress", total=None)

    def advance(figures: Any, total: int) -> None:
        bar.update(task, advance=1, total=total)

    with bar:
        report = compress(args.ft, args.base, args.output, density=density, bits=bits,
                          values=_VALUES.get(args.values), force=args.force, budget=budget,
                          where=where, progress=advance)
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    elif not args.quiet:
        _render(report, Console(highlight=False))
        console.print(f"wrote {args.output}")
    return 0


def _number(text: str | None, kind: type, key: str, where: CommandLine, example: str) -> Any:
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        raise MergeError(Diagnostic(f"{key} takes a number, not {text!r}", where.span(key),
                                    hint=f"e.g. {key} {example}")) from None


def _render(report: Report, out: Console) -> None:
    table = Table(title=f"{report.out}", show_edge=False)
    for column in ("tensor", "form", "stored", "dense", "ratio", "rel. error"):
        table.add_column(column, justify="left" if column in ("tensor", "form") else "right")
    for t in [*report.tensors, report.total]:
        table.add_row(t.name, t.form, _bytes(t.stored), _bytes(t.dense),
                      f"{t.stored / t.dense:.3f}" if t.dense else "-",
                      f"{t.relative_error:.4f}", end_section=t is report.tensors[-1])
    out.print(table)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
