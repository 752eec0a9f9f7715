"""`mergelang extract FT --base BASE --rank R -o ADAPTER` (LANGUAGE.md §6).

The command is the language form written out: it compiles

    output extract_lora(model("FT") - model("BASE"), rank=R)

and runs it as `mergelang run` would, so a script and the command write the same
adapter bytes and share every check and diagnostic. Then it prints what the adapter
lost: each factorised tensor's relative error ||delta - B A||_F / ||delta||_F, and the
error over all of them (`--json`: the same as one JSON object).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from .. import api
from ..builtins import DTYPES
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
    args = [f"model({_string(ft)}) - model({_string(base)})"]
    if rank is not None:
        args.append(f"rank={rank}")
    if energy is not None:
        args.append(f"energy={energy!r}")
    if keep:
        args.append(f"keep=[{', '.join(_string(k) for k in keep)}]")
    if svd != "auto":
        args.append(f"svd={_string(svd)}")
    return f"output extract_lora({', '.join(args)})\n"


def _string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def run(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()  # as `mergelang run` does: the SVDs run on the writer thread
    text = script(args.model, args.base, args.rank, args.energy, args.keep, args.svd)
    program = api.compile(text, path=None)
    warnings = program.run(args.output, args.device, force=args.force,
                           out_dtype=args.out_dtype)
    for w in warnings:
        console.print(w.render(), markup=False, highlight=False)
    report = json.loads((args.output / REPORT).read_text())
    if report["dropped"]:
        shown = ", ".join(report["dropped"][:3]) + (" ..." if len(report["dropped"]) > 3 else "")
        console.print(f"warning: {len(report['dropped'])} tensors are not in the adapter "
                      f"({shown}): a bias of some factorised modules only (PEFT's lora_bias "
                      "is all or nothing), or no module's weight; keep their modules whole "
                      "with --keep to carry them", markup=False, highlight=False)
    if args.json:
        print(json.dumps(report))
    elif not args.quiet:
        print(table(report))
    return 0


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
