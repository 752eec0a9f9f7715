"""`mergelang extract FT --base BASE --rank R -o ADAPTER` (LANGUAGE.md §6).

The command is the language form written out: it compiles

    output extract_lora(model("FT") - model("BASE"), rank=R)

and runs it as `mergelang run` would, so a script and the command write the same
adapter bytes and share every check and diagnostic; a diagnostic is shown under the
argument of the command line that wrote the part of the script it points at
(CommandLine), not in a script the user never wrote. Then it prints what the adapter
lost: each factorised tensor's relative error ||delta - B A||_F / ||delta||_F, and the
error over all of them (`--json`: the same as one JSON object).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rich.console import Console

from .. import api
from ..builtins import DTYPES
from ..diagnostics import Diagnostic, MergeError, Source, Span
from ..io.adapter import REPORT
from ..io.allocator import keep_freed_memory
from .svd import METHODS


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `extract` subcommand (cli.py owns the other commands)."""
    p = sub.add_parser("extract", help="a fine-tune's delta as a PEFT LoRA adapter (SVD)")
    p.add_argument("model", metavar="FT", help="the fine-tuned model folder")
    p.add_argument("--base", required=True, metavar="BASE", help="the base model folder")
    p.add_argument("--rank", type=int, help="the rank (with --energy: the largest rank)")
    p.add_argument("--energy", type=float,
                   help="per tensor, the smallest rank keeping this share of the delta's "
                        "squared Frobenius norm, e.g. 0.9")
    p.add_argument("--keep", action="append", default=[], metavar="REGEX",
                   help="keep the tensors whose name matches whole (modules_to_save); "
                        "embeddings, head and norms always are")
    p.add_argument("--svd", choices=METHODS, default="auto",
                   help="exact SVD, or the randomised one (auto: by tensor size and rank)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the adapter folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--out-dtype", choices=DTYPES, help="adapter dtype (default: the base's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the errors as one JSON object")
    p.add_argument("--quiet", action="store_true", help="print no table")
    p.set_defaults(handler=run)
    return p


def script(ft: str, base: str, rank: int | None, energy: float | None = None,
           keep: list[str] | tuple[str, ...] = (), svd: str = "auto") -> str:
    """The script `mergelang extract` runs."""
    return _pieces(ft, base, rank, energy, keep, svd)[0]


def _pieces(ft: str, base: str, rank: int | None, energy: float | None,
            keep: list[str] | tuple[str, ...], svd: str) -> tuple[str, dict[str, tuple]]:
    """The script, and the column range (1-based, end exclusive) each option fills."""
    text, cols = "output extract_lora(", {}

    def put(key: str | None, before: str, value: str, after: str = "") -> None:
        nonlocal text
        text += before
        if key is not None:
            cols[key] = (len(text) + 1, len(text) + 1 + len(value))
        text += value + after

    put("FT", "model(", _string(ft), ")")
    put("--base", " - model(", _string(base), ")")
    if rank is not None:
        put("--rank", ", rank=", str(rank))
    if energy is not None:
        put("--energy", ", energy=", repr(energy))
    if keep:
        put("--keep", ", keep=", f"[{', '.join(_string(k) for k in keep)}]")
    if svd != "auto":
        put("--svd", ", svd=", _string(svd))
    return text + ")\n", cols


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class CommandLine:
    """The command's arguments as one line of text, so that a diagnostic found in the
    script the command compiles is shown under the argument that made that part of it
    (as `mergelang compress` shows its own)."""

    def __init__(self, args: argparse.Namespace):
        text, self.cols = "mergelang extract", {}
        parts = [("FT", str(args.model)), ("--base", str(args.base))]
        parts += [(k, str(v)) for k, v in (("--rank", args.rank), ("--energy", args.energy))
                  if v is not None]
        parts += [("--keep", k) for k in args.keep]
        parts += [("--svd", args.svd)] if args.svd != "auto" else []
        parts += [("-o", str(args.output))]
        for key, value in parts:
            text += " " if key == "FT" else f" {key} "
            start, end = len(text) + 1, len(text) + 1 + len(value)
            first = self.cols.get(key, (start, end))[0]  # --keep, given again: all of them
            self.cols[key] = (first, end)
            text += value
        self.source = Source(_COMMAND, text + "\n")
        self.end = len(text) + 1

    def span(self, key: str | None) -> Span:
        """The argument `key`'s text; the whole line for None or one not given."""
        start, end = self.cols.get(key, (1, self.end)) if key else (1, self.end)
        return Span(self.source, 1, start, 1, max(end, start + 1))

    def moved(self, diagnostics: list[Diagnostic], script: str,
              cols: dict[str, tuple]) -> list[Diagnostic]:
        """Diagnostics in the compiled `script` moved onto the argument that wrote the
        text they point at (the whole line when no one argument did); a hint to write
        `set vocab` names what the command can do instead."""
        out = []
        for d in diagnostics:
            if d.span is not None and d.span.source.path is None \
                    and d.span.source.text == script:
                key = next((k for k, (a, b) in cols.items()
                            if d.span.line == 1 and a <= d.span.col < b), None)
                d = dataclasses.replace(d, span=self.span(key))
            if d.hint and "set vocab" in d.hint:
                d = dataclasses.replace(d, hint=VOCAB_HINT)
            out.append(d)
        return out


_COMMAND = "<command line>"
VOCAB_HINT = ("extract needs a fine-tune and a base of the same vocabulary; to give the "
              "fine-tune the base's rows, write a script and run it with `mergelang run`: "
              "base = model(\"BASE\"); set vocab = base; "
              "output extract_lora(model(\"FT\") - base, rank=R)")


def run(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()  # as `mergelang run` does: the SVDs run on the writer thread
    text, cols = _pieces(args.model, args.base, args.rank, args.energy, args.keep, args.svd)
    where = CommandLine(args)
    try:
        program = api.compile(text, path=None)
        warnings = program.run(args.output, args.device, force=args.force,
                               out_dtype=args.out_dtype)
    except MergeError as exc:
        raise MergeError(where.moved(exc.diagnostics, text, cols)) from None
    for w in where.moved(warnings, text, cols):
        console.print(w.render(), markup=False, highlight=False)
    report = json.loads((args.output / REPORT).read_text())
    if report["dropped"]:
        console.print(dropped_warning(report["dropped"], report["keepable"]),
                      markup=False, highlight=False)
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        print(table(report))
    return 0


def dropped_warning(dropped: list[str], keepable: list[str]) -> str:
    """What the adapter lacks, split into the tensors `--keep` can carry (a bias of some
    factorised modules only: PEFT's lora_bias is all or nothing) and those no adapter
    can (no module's weight or bias, or not floating point)."""
    def shown(names: list[str]) -> str:
        return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")

    lost = [n for n in dropped if n not in keepable]
    parts = []
    if keepable:
        modules = sorted({n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in keepable})
        parts.append(f"{len(keepable)} are biases of factorised modules ({shown(keepable)}), "
                     "which PEFT's lora_bias carries only when every factorised module has "
                     "one: keep their modules whole to carry them, e.g. "
                     + " ".join(f"--keep {m}" for m in modules[:3]))
    if lost:
        parts.append(f"{len(lost)} cannot be carried by an adapter ({shown(lost)}): no "
                     "module's weight or bias, or not floating point; --keep cannot carry them")
    return f"warning: {len(dropped)} tensors are not in the adapter: " + "; ".join(parts)


def table(report: dict) -> str:
    """The per-tensor errors as aligned text, worst last, and the overall error."""
    rows = [("tensor", "shape", "rank", "rel. error", "svd")]
    for t in sorted(report["tensors"], key=lambda t: t["error"]):
        rows.append((t["name"], "x".join(map(str, t["shape"])), str(t["rank"]),
                     f"{t['error']:.4f}", t["method"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 4) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in rows]
    lines.append(f"overall relative error {report['overall_error']:.4f} over "
                 f"{len(report['tensors'])} factorised tensors; {len(report['kept'])} kept "
                 f"whole; {report['parameters']:,} adapter parameters")
    return "\n".join(lines)
