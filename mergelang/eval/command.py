"""`mergelang eval MODEL... --tasks FILE.jsonl... [--text FILE] [--against BASE FT...]`.

Everything that can be checked before a model is loaded is: task files are parsed and
model folders looked for first, so a typo in the last file costs no loading time. Each
model is then loaded once and scored on every task (and the text file), under one
progress bar. The table has the models as rows and the tasks as columns; `--json`
prints the same figures as one JSON array (LANGUAGE.md §6).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..diagnostics import Diagnostic, MergeError
from .against import Inputs, annotate, kept_by_finetune
from .models import load_model
from .score import perplexity_loaded, score_loaded
from .tasks import load_tasks


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `eval` subcommand's arguments (cli.py owns the other commands)."""
    p = sub.add_parser("eval", help="score models on task files (exact match, log-likelihood)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders to score")
    p.add_argument("--tasks", nargs="+", type=Path, default=[], metavar="FILE.jsonl",
                   help='JSONL, one {"task", "prompt", "answer"} a line')
    p.add_argument("--text", type=Path, metavar="FILE", help="also: perplexity over a text file")
    p.add_argument("--against", nargs="+", metavar="INPUT", default=None,
                   help="BASE FT [FT...]: the merge's inputs, the base first; shows each "
                        "task's best input score and the share of each fine-tune's gain "
                        "over the base that a MODEL keeps")
    p.add_argument("--lm-eval", metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks (names or local YAML "
                        "files); needs the lm-eval extra")
    p.add_argument("--json", action="store_true", help="print the figures as a JSON array")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (default: longest answer + 4)")
    p.add_argument("--window", type=int, default=None,
                   help="--text window in tokens (default: the model's context, <= 1024)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the models are scored in (default float32)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def run(args: argparse.Namespace, console: Console) -> int:
    if not (args.tasks or args.text or args.lm_eval):
        raise MergeError(Diagnostic("nothing to score: give --tasks, --text or --lm-eval",
                                    hint="e.g. mergelang eval merged/ --tasks "
                                         "examples/tasks/math.jsonl"))
    if args.against is not None and len(args.against) < 2:
        raise MergeError(Diagnostic("--against needs the base and at least one fine-tune",
                                    hint="--against BASE FT [FT...]"))
    records = load_tasks(args.tasks) if args.tasks else []
    if args.text is not None and not args.text.is_file():
        raise MergeError(Diagnostic(f"text file not found: {args.text}"))
    inputs = list(args.against or [])
    everyone = list(dict.fromkeys([*args.models, *inputs]))
    for m in everyone:
        if not Path(m).is_dir():
            raise MergeError(Diagnostic(f"model not found: {m}",
                                        hint="a Hugging Face model folder"))
    harness = None
    if args.lm_eval:
        from .harness import check_lm_eval
        harness = check_lm_eval(args.lm_eval)
    _quiet_transformers()
    results = _score_all(args, console, everyone, records, harness)
    rows = _rows(results, args.models, inputs)
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        out = Console(highlight=False)
        if not out.is_terminal:  # a file or a pipe: never cut a model's path
            out = Console(highlight=False, width=200)
        out.print(_table(results, args.models, inputs))
    return 0


def _score_all(args: argparse.Namespace, console: Console, models: list[str],
               records: list[dict], harness: object) -> dict[str, dict[str, dict]]:
    """model -> task name -> result dict, for every model (the inputs included)."""
    results: dict[str, dict[str, dict]] = {}
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                        transient=True, disable=args.quiet)
    with progress:
        bar = progress.add_task("loading", total=len(models) * len(records) or None)
        for m in models:
            progress.update(bar, description=f"scoring {m}")
            loaded = load_model(m, device=args.device, dtype=args.dtype)
            out = score_loaded(loaded, records, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens,
                               progress=lambda n: progress.advance(bar, n)) if records else []
            if args.text is not None:
                progress.update(bar, description=f"perplexity {m} on {args.text.name}")
                out.append(perplexity_loaded(loaded, args.text, window=args.window,
                                             batch_size=max(1, args.batch_size // 2)))
            if harness is not None:
                progress.update(bar, description=f"lm-eval {m}")
                from .harness import run_lm_eval
                out += run_lm_eval(m, harness, device=args.device, batch_size=args.batch_size)
            results[m] = {r["task"]: r for r in out}
            del loaded
    return results


def _rows(results: dict[str, dict[str, dict]], merges: list[str], inputs: list[str]) -> list:
    """The JSON array: one object per (model, task); with --against, merges carry the best
    input's score and the kept gain, and every object says its role."""
    info = _inputs(results, inputs)
    rows = []
    for m, tasks in results.items():
        for r in tasks.values():
            row = {"model": m, **r}
            if info is not None:
                if m in merges:
                    row = annotate(row, info) if "exact_match" in r else row
                    row["role"] = "merge"
                else:
                    row["role"] = "base" if m == info.base else "finetune"
            rows.append(row)
    return rows


def _inputs(results: dict[str, dict[str, dict]], inputs: list[str]) -> Inputs | None:
    if not inputs:
        return None
    return Inputs(inputs[0], tuple(inputs[1:]), {m: results[m] for m in inputs})


def _table(results: dict[str, dict[str, dict]], merges: list[str], inputs: list[str]) -> Table:
    """Models as rows, tasks as columns; with --against, the inputs below the merges, a
    "best input" row, and per merge the share of each fine-tune's gain it keeps."""
    tasks = list(dict.fromkeys(t for r in results.values() for t in r))
    em_tasks = [t for t in tasks if any("exact_match" in results[m].get(t, {}) for m in results)]
    other = [t for t in tasks if t not in em_tasks]
    info = _inputs(results, inputs)
    caption = None
    if info is not None:
        caption = ("kept: (merge - base) / (fine-tune - base), pooled over the tasks the "
                   "fine-tune leads the inputs on")
    table = Table(title="exact match (mean log-likelihood of the answer)", title_justify="left",
                  caption=caption, caption_justify="left")
    table.add_column("model", no_wrap=True)
    if info is not None:
        table.add_column("role")
    for t in em_tasks:
        table.add_column(t, justify="right")
    if len(em_tasks) > 1:
        table.add_column("mean", justify="right")
    for t in other:
        first = next(results[m][t] for m in results if t in results[m])
        table.add_column(f"ppl {t}" if "perplexity" in first else t, justify="right")
    if info is not None:
        for ft in info.finetunes:
            table.add_column(f"kept {Path(ft).name}", justify="right")
    order = list(merges) + [m for m in inputs if m not in merges]
    for i, m in enumerate(order):
        cells = [m] + ([_role(m, merges, info)] if info is not None else [])
        for t in em_tasks:
            r = results[m].get(t)
            cells.append("-" if r is None else
                         f"{r['exact_match']:.3f} [dim]({r['loglik']:.2f})[/]")
        if len(em_tasks) > 1:
            found = [results[m][t]["exact_match"] for t in em_tasks if t in results[m]]
            cells.append(f"{sum(found) / len(found):.3f}" if found else "-")
        cells += [_other(results[m].get(t)) for t in other]
        if info is not None:
            em = {t: r for t, r in results[m].items() if "exact_match" in r}
            kept = kept_by_finetune(info, em) if m in merges else {}
            cells += [_percent(kept.get(ft)) for ft in info.finetunes]
        table.add_row(*cells, end_section=(i == len(merges) - 1 and bool(inputs)))
    if info is not None:
        best = [info.best(t) for t in em_tasks]
        cells = ["[italic]best input[/]", ""] + [
            "-" if b is None else f"{b[1]:.3f} [dim]({Path(b[0]).name})[/]" for b in best]
        table.add_row(*cells, *[""] * (len(table.columns) - len(cells)))
    return table


def _role(model: str, merges: list[str], info: Inputs | None) -> str:
    if info is None or model in merges:
        return "merge"
    return "base" if model == info.base else "fine-tune"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _other(r: dict | None) -> str:
    if r is None:
        return "-"
    if "perplexity" in r:
        return f"{r['perplexity']:.2f}"
    value = r.get("value")
    return "-" if not isinstance(value, float) else f"{value:.3f}"


def _quiet_transformers() -> None:
    """The command draws its own progress: no loading bars or advice from transformers."""
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is needed to score anyway
        pass
