"""The command line's script parameters: `-D NAME=VALUE` on run, check and graph, how
check and graph show the parameters, and the `sweep` command (LANGUAGE.md §6).

Kept apart from cli.py so the sweep's display (a progress bar over a live table of the
finished points) and its many options stay in one place; cli.py only registers them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import api
from .diagnostics import Diagnostic, MergeError
from .params import Override, literal, parse_axis, parse_defines, text
from .sweep import SEARCHES, Record, Sweep

_SHOWN_ROWS = 12  # the live table's last rows
_LISTED_ROWS = 20  # the final table's best rows


def add_define_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-D", dest="defines", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="set a script parameter (`param NAME = default`): a number, a "
                             "string, true/false or a list such as [0.6,0.4]; repeatable")


def overrides(args: argparse.Namespace) -> dict[str, Override]:
    """The `-D` options, parsed and located on the command line."""
    return parse_defines(args.defines)


def load(args: argparse.Namespace) -> api.Program:
    """The script of `args`, compiled with its `-D` overrides."""
    return api.load(args.script, params=overrides(args))


def params_line(program: api.Program) -> str | None:
    """`density = 0.3 (default 0.2), weights = [0.6, 0.4]`, or None without parameters."""
    declared = program.resolved.params
    if not declared:
        return None
    shown = []
    for name, value in program.params.items():
        default = literal(declared[name].value)
        changed = value != default or type(value) is not type(default)
        shown.append(f"{name} = {text(value)}" + (f" (default {text(default)})"
                                                  if changed else ""))
    return ", ".join(shown)


def cluster_of(args: argparse.Namespace, console: Console):
    """The Dask cluster `--scheduler` or `--workers` names, or None for this process."""
    if args.scheduler is None and args.workers is None:
        return None
    from .cluster import Cluster
    say = None if args.quiet else (lambda text: console.print(text, markup=False))
    return Cluster(args.scheduler, args.workers, say=say)


def add_sweep_command(sub, report: Callable[[Console, list[Diagnostic]], None]) -> None:
    sweep = sub.add_parser("sweep", help="merge and score the script over a grid or a search "
                                         "of its parameters")
    sweep.add_argument("script", type=Path)
    sweep.add_argument("-D", dest="axes", action="append", default=[], metavar="NAME=VALUES",
                       help="values to try: one value, a list [a,b,c] or a range "
                            "start:stop:step (stop included when reached); repeatable")
    sweep.add_argument("--tasks", nargs="+", type=Path, required=True, metavar="FILE.jsonl",
                       help='task files, one {"task", "prompt", "answer"} object a line')
    sweep.add_argument("--results", type=Path, required=True, metavar="FILE.jsonl",
                       help="one line per finished point; rerunning skips the points in it")
    sweep.add_argument("--search", choices=SEARCHES, default="grid",
                       help="grid (every point, default) or an optuna sampler")
    sweep.add_argument("--trials", type=int, help="points a search scores in all")
    sweep.add_argument("--search-seed", type=int, default=0, help="seeds the search's sampler")
    sweep.add_argument("--objective", default="mean", metavar="mean|min|TASK",
                       help="what is maximised: the mean over tasks (default), the minimum, "
                            "or one task's exact match")
    sweep.add_argument("--keep-best", type=Path, metavar="OUT",
                       help="merge the best point into the folder OUT and write its script, "
                            "parameters filled in, as OUT.merge")
    sweep.add_argument("--force", action="store_true",
                       help="let --keep-best replace its previous model folder and script")
    sweep.add_argument("--plot", type=Path, metavar="FILE.png",
                       help="draw the scores against each parameter (needs matplotlib)")
    sweep.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    sweep.add_argument("--quiet", action="store_true", help="no live display")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="merge and score points in parallel on the Dask cluster of this "
                            "scheduler (tcp://HOST:8786, or its scheduler file)")
    where.add_argument("--workers", type=int, metavar="N",
                       help="merge and score points in parallel on a local Dask cluster of N "
                            "worker processes")
    sweep.set_defaults(handler=lambda args, console: _sweep(args, console, report))


def _sweep(args: argparse.Namespace, console: Console,
           report: Callable[[Console, list[Diagnostic]], None]) -> int:
    from .sweep_output import check_plot_target, keep_best, plot

    if args.plot is not None:
        check_plot_target(args.plot)
    if args.search != "grid":
        from .sweep_search import require
        require("optuna", f"--search {args.search}")
    elif args.trials is not None:
        raise MergeError(Diagnostic("--trials is for a search; a grid scores every point",
                                    hint="add --search random, tpe or cma, or leave out "
                                         "--trials"))
    sweep = Sweep(args.script, [parse_axis(a) for a in args.axes], args.tasks, args.results,
                  objective=args.objective, device=args.device)
    if sweep.results.dropped:
        report(console, [Diagnostic(sweep.results.dropped, severity="warning")])
    total = sweep.size if args.search == "grid" else min(args.trials or 1, sweep.size)
    display = _Display(sweep, total, console, args.quiet)
    cluster = cluster_of(args, console)
    try:
        with display:
            sweep.run(args.search, args.trials, args.search_seed, display.add, cluster=cluster)
    except KeyboardInterrupt:
        console.print(f"interrupted: {display.new} new points are in {args.results}; run the "
                      "same command again to go on from there")
        return 130
    finally:
        if cluster is not None:
            cluster.close()
    out = Console(highlight=False)
    finished = sorted(sweep.finished(), key=lambda r: -r.objective)
    title = f"{args.results}: the best {_LISTED_ROWS} of {len(finished)} points" \
        if len(finished) > _LISTED_ROWS else str(args.results)
    out.print(_table(sweep, finished[:_LISTED_ROWS], title))
    best = sweep.best()
    if best is not None:
        out.print("best: " + ", ".join(f"{k}={text(v)}" for k, v in best.params.items())
                  + f"  objective {best.objective:.4g}")
    if args.plot is not None:
        out.print(f"plot: {plot(sweep, args.plot)}")
    if args.keep_best is not None:
        kept = keep_best(sweep, args.keep_best, force=args.force, device=args.device)
        report(console, kept.warnings)
        out.print(f"kept: {kept.model} and {kept.script}")
    return 0


class _Display:
    """A progress bar over the points, above a table of the last ones finished."""

    def __init__(self, sweep: Sweep, total: int, console: Console, quiet: bool):
        self.sweep, self.console, self.quiet = sweep, console, quiet
        self.rows: list[tuple[Record, bool]] = []
        self.seen: set[str] = set()
        self.new = 0
        self.progress = Progress(TextColumn("points"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("sweep", total=total)
        self.live = Live(Group(self.progress), console=console, transient=True,
                         refresh_per_second=4)

    def __enter__(self) -> _Display:
        if not self.quiet:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self.live.__exit__(*exc)

    def add(self, record: Record, new: bool) -> None:
        self.new += new
        key = repr(sorted(record.params.items(), key=lambda kv: kv[0]))
        if key not in self.seen:
            self.seen.add(key)
            self.progress.update(self.task, completed=len(self.seen))
        self.rows = [*self.rows, (record, new)][-_SHOWN_ROWS:]
        if not self.quiet:
            table = _table(self.sweep, [r for r, _ in self.rows], "last points")
            self.live.update(Group(self.progress, table))


def _table(sweep: Sweep, records: list[Record], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for axis in sweep.axes:
        table.add_column(axis.name, justify="right")
    for task in sweep.task_names:
        table.add_column(task, justify="right")
    table.add_column(f"objective ({sweep.objective})", justify="right", style="bold")
    for r in records:
        table.add_row(*(text(r.params[a.name]) for a in sweep.axes),
                      *(f"{r.scores[t]:.3f}" for t in sweep.task_names), f"{r.objective:.3f}")
    return table


__all__ = ["add_define_option", "add_sweep_command", "load", "overrides", "params_line"]
