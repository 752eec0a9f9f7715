"""The `mergelang` command: run, check, graph, repl, convert (LANGUAGE.md §6).

Every script or input error is printed as a diagnostic and exits with status 2; no
traceback reaches the user and nothing is written to the output folder.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from . import api, cli_params, startup
from .builtins import DTYPES
from .diagnostics import Diagnostic, MergeError
from .io.allocator import keep_freed_memory
from .io.interrupt import EXIT_TERMINATED, Terminated, sigterm_as_interrupt, stdout_closed
from .ir import Op, walk
from .plan import Plan
from .schedule import DEFAULT_BUDGET_TEXT

EXIT_INPUT_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    console = Console(stderr=True, highlight=False)
    try:
        startup.release()  # Ctrl-C from here on is the KeyboardInterrupt below
        args = _parser().parse_args(argv)
        with sigterm_as_interrupt():
            return args.handler(args, console)
    except MergeError as exc:
        _report(console, exc.diagnostics)
        return EXIT_INPUT_ERROR
    except Terminated:
        console.print("terminated; nothing was written")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written")
        return 130
    except BrokenPipeError:
        return stdout_closed()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergelang", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="merge: write the output model folder")
    run.add_argument("script", type=Path)
    run.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    run.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    run.add_argument("--seed", type=_seed, help="overrides `set seed`")
    run.add_argument("--dtype", choices=DTYPES, help="compute dtype; overrides `set dtype`")
    run.add_argument("--out-dtype", choices=DTYPES, help="overrides `set out_dtype`")
    run.add_argument("--shard-size", default=api.DEFAULT_SHARD_SIZE,
                     help="largest output shard, e.g. 5GB (default) or 500MB")
    run.add_argument("--max-memory", default=DEFAULT_BUDGET_TEXT,
                     help=f"tensor data held at once (default {DEFAULT_BUDGET_TEXT}); large "
                          "tensors are computed in row blocks to stay under it")
    run.add_argument("--force", action="store_true", help="replace an existing output folder")
    run.add_argument("--strict", action="store_true",
                     help="a NaN or infinite value in the result is an error, not a warning")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    where = run.add_mutually_exclusive_group()
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="compute on the Dask cluster of this scheduler (tcp://HOST:8786, "
                            "or its scheduler file); see docs/cluster.md")
    where.add_argument("--workers", type=int, metavar="N",
                       help="compute on a local Dask cluster of N worker processes")
    cli_params.add_define_option(run)
    run.set_defaults(handler=_run)

    check = sub.add_parser("check", help="check against the model headers; load nothing")
    check.add_argument("script", type=Path)
    cli_params.add_define_option(check)
    check.set_defaults(handler=_check)

    graph = sub.add_parser("graph", help="print the planned graph")
    graph.add_argument("script", type=Path)
    graph.add_argument("--tensor", help="only tensors whose name matches this regex")
    graph.add_argument("--format", choices=("text", "dot"), default="text")
    cli_params.add_define_option(graph)
    graph.set_defaults(handler=_graph)

    repl = sub.add_parser("repl", help="explore a script interactively")
    repl.add_argument("script", type=Path, nargs="?")
    repl.set_defaults(handler=_repl)

    convert = sub.add_parser("convert", help="turn a mergekit YAML config into a .merge script")
    convert.add_argument("config", type=Path, help="the mergekit YAML config")
    convert.add_argument("-o", "--output", type=Path,
                         help="the script to write (default: print it)")
    convert.add_argument("--force", action="store_true", help="replace an existing script")
    convert.set_defaults(handler=_convert)

    fmt = sub.add_parser("fmt", help="lay scripts out one canonical way, comments kept")
    fmt.add_argument("scripts", type=Path, nargs="+")
    fmt.add_argument("--check", action="store_true",
                     help="change nothing; exit 1 if a file would change (for CI)")
    fmt.add_argument("--diff", action="store_true", help="print the changes as a unified diff")
    fmt.set_defaults(handler=_fmt)

    inspect = sub.add_parser("inspect", help="a model's structure, from its headers alone")
    inspect.add_argument("model", type=Path, help="a model folder or .safetensors file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_inspect)

    diff = sub.add_parser("diff", help="the task vectors of fine-tunes against their base")
    diff.add_argument("base", type=Path)
    diff.add_argument("models", type=Path, nargs="+")
    diff.add_argument("--density", type=float, default=0.2,
                      help="trim density for sign conflicts and trim mass (default 0.2)")
    diff.add_argument("--json", action="store_true", help="print one JSON object")
    diff.add_argument("--plot", type=Path, metavar="FILE.png", help="draw per-layer heatmaps")
    diff.add_argument("--max-memory", default=DEFAULT_BUDGET_TEXT,
                      help=f"tensor data held at once (default {DEFAULT_BUDGET_TEXT})")
    diff.add_argument("--quiet", action="store_true", help="no progress display")
    diff.set_defaults(handler=_diff)

    from .eval.command import add_parser as add_eval_parser
    add_eval_parser(sub).set_defaults(handler=_eval)
    from .extraction.command import add_parser as add_extract_parser
    add_extract_parser(sub)
    cli_params.add_sweep_command(sub, _report)
    from .compress import add_parser as add_compress_parser
    add_compress_parser(sub)
    return parser


def _seed(text: str) -> int:
    """--seed takes what `set seed` takes: a whole number from 0 to 2**63 - 1."""
    if not text.isdigit() or len(text) > 19 or int(text) > 2**63 - 1:
        raise argparse.ArgumentTypeError(
            f"the seed must be a whole number from 0 to {2**63 - 1}, not {text[:30]!r}")
    return int(text)


def _report(console: Console, diagnostics: list[Diagnostic]) -> None:
    for d in diagnostics:
        style = "bold red" if d.severity == "error" else "bold yellow"
        head, _, rest = d.render().partition("\n")
        # soft_wrap: never re-wrap a diagnostic; a wrapped source line loses its caret
        console.print(f"[{style}]{_escape(head)}[/]", soft_wrap=True)
        if rest:
            console.print(_escape(rest), soft_wrap=True)


def _escape(text: str) -> str:
    return text.replace("[", r"\[")


def _run(args: argparse.Namespace, console: Console) -> int:
    keep_freed_memory()
    program = cli_params.load(args)
    progress = Progress(
        TextColumn("merging {task.fields[done]}/{task.fields[count]} tensors"), BarColumn(),
        DownloadColumn(), TimeRemainingColumn(), console=console, disable=args.quiet,
        transient=True)
    state: dict = {}

    def started(p: Plan) -> None:
        state["task"] = progress.add_task("merge", total=p.output_bytes, done=0,
                                          count=len(p.tensors))
        state["done"] = 0
        progress.start()

    def advance(tensor) -> None:
        state["done"] += 1
        progress.update(state["task"], advance=tensor.nbytes, done=state["done"])

    cluster = cli_params.cluster_of(args, console)
    try:
        warnings = program.run(args.output, args.device, force=args.force,
                               shard_size=args.shard_size, strict=args.strict, seed=args.seed,
                               dtype=args.dtype, out_dtype=args.out_dtype,
                               max_memory=args.max_memory,
                               progress=advance, on_plan=started, cluster=cluster)
    finally:
        progress.stop()
        if cluster is not None:
            cluster.close()
    _report(console, warnings)
    if not args.quiet:
        console.print(f"wrote {args.output}")
    return 0


def _check(args: argparse.Namespace, console: Console) -> int:
    program = cli_params.load(args)
    summary = program.check()
    _report(console, list(summary.warnings))
    out = Console(highlight=False)
    out.print(f"ok: {args.script}")
    if params := cli_params.params_line(program):
        out.print(f"  params:        {params}", markup=False)
    out.print(f"  models:        {', '.join(summary.models)}")
    out.print(f"  donor:         {summary.donor}")
    if program.lowered.form is not None:  # extract_lora: what is written is the adapter
        from .extraction.summary import summarize_adapter
        with program.plan() as p:
            adapter = summarize_adapter(p, program.lowered.form, program.lowered.out_dtype)
        out.print(f"  outputs:       {adapter.line(_bytes(adapter.bytes))}", markup=False,
                  soft_wrap=True)
    else:
        out.print(f"  outputs:       {summary.outputs} tensors, {_bytes(summary.output_bytes)}"
                  + (f" ({summary.copied} non-float copied)" if summary.copied else ""))
    out.print(f"  graph:         {summary.tensors} operations")
    out.print(f"  inputs read:   {_bytes(summary.input_bytes)}")
    out.print(f"  working set:   about {_bytes(summary.peak_bytes)} of tensor data at once "
              "(bounded by --max-memory)")
    return 0


def _graph(args: argparse.Namespace, console: Console) -> int:
    try:
        pattern = re.compile(args.tensor) if args.tensor else None
    except re.error as exc:
        bad = Diagnostic(f'bad --tensor pattern "{args.tensor}": {exc}',
                         hint="it is a regular expression, e.g. 'layers\\.3\\.'")
        raise MergeError(bad) from None
    program = cli_params.load(args)
    params = cli_params.params_line(program)
    with program.plan() as p:
        graph = p.graph
    tensors = [t for t in p.tensors if pattern is None or pattern.search(t.name)]
    if not tensors:
        raise MergeError(Diagnostic(f'no output tensor matches "{args.tensor}"',
                                    hint="see `mergelang check` for the tensors"))
    if args.format == "dot":
        keep = {n for n in graph.nodes if graph.nodes[n]["tensor"] in {t.name for t in tensors}}
        sys.stdout.write((f"// params: {params}\n" if params else "") + _dot(graph.subgraph(keep)))
        return 0
    if params:
        print(f"params: {params}")
    for t in tensors:
        print(_text(t))
    return 0


def _text(t) -> str:
    """One tensor's plan as numbered three-address code."""
    dtype = str(t.out_dtype).removeprefix("torch.")
    lines = [f"{t.name}  {list(t.shape)} {dtype}"]
    ids: dict = {}
    for node in walk(t.root):
        if node.is_const:
            continue
        ids[node] = f"%{len(ids) + 1}"
        args = " ".join(ids.get(a, repr(a.attr)) for a in node.args)
        lines.append(f"  {ids[node]} = {TEXT[node.op](node, args)}")
    lines.append(f"  write {ids[t.root]}")
    return "\n".join(lines)


def _operation(node, args: str) -> str:
    return f"{node.op.value} {args}"


# how the text graph writes each operation a plan can hold
TEXT = {
    Op.CONST: lambda node, args: repr(node.attr),
    Op.LOAD: lambda node, args: f"load {Path(node.attr[0]).name}",
    Op.PRIM: lambda node, args: f"{node.attr[0]}({args})",
    **{op: _operation for op in (Op.LIST, Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG,
                                 Op.COPY_AGREEING)},
}


def _dot(graph) -> str:
    import networkx as nx

    labelled = nx.DiGraph()
    ids = {node: f"n{i}" for i, node in enumerate(graph.nodes)}
    for node, data in graph.nodes(data=True):
        labelled.add_node(ids[node], label=f'"{data["label"]}"')
    for a, b in graph.edges:
        labelled.add_edge(ids[a], ids[b])
    return nx.nx_pydot.to_pydot(labelled).to_string()


def _repl(args: argparse.Namespace, console: Console) -> int:
    from .repl import Repl
    out = Console(highlight=False)
    if not sys.stdin.isatty():  # scripted: plain lines, no prompt
        return Repl(args.script, out, read=lambda prompt: input()).loop()
    # Ctrl-C stops an evaluation, so it must reach us even when we were started with
    # SIGINT ignored (by `nohup`, or as a background job of a non-interactive shell,
    # which is how `timeout` and CI runners start commands).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    repl = Repl(args.script, out, interactive=True)
    try:
        from .replui import reader
    except ImportError:
        console.print('plain line input: pip install "mergelang[repl]" for history, '
                      "completion and highlighting")
    else:
        repl.read = reader(repl)
    return repl.loop()


def _convert(args: argparse.Namespace, console: Console) -> int:
    from .convert import convert_file
    result = convert_file(args.config, args.output, force=args.force)
    _report(console, result.warnings)
    if args.output is None:
        sys.stdout.write(result.script)
    else:
        console.print(f"wrote {args.output}")
    return 0


def _fmt(args: argparse.Namespace, console: Console) -> int:
    from .fmt import run
    return run(args.scripts, args.check, args.diff,
               report=lambda exc: _report(console, exc.diagnostics),
               say=lambda text: console.print(text, markup=False),
               write_diff=sys.stdout.write)


def _wide_console() -> Console:
    """Standard output for tables: as wide as the terminal, or wide enough when piped."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=200)


def _inspect(args: argparse.Namespace, console: Console) -> int:
    import json

    from .structure import inspect_model, render
    structure = inspect_model(args.model)
    if args.json:
        print(json.dumps(structure.as_json(), indent=2))
    else:
        render(structure, _wide_console())
    return 0


def _diff(args: argparse.Namespace, console: Console) -> int:
    import json

    from .compare import compare
    from .diffreport import plot, render
    from .io.write import parse_size
    try:
        budget = parse_size(args.max_memory)
    except ValueError as exc:
        raise MergeError(Diagnostic(str(exc), hint="e.g. --max-memory 500MB")) from None
    progress = Progress(TextColumn("comparing"), BarColumn(), DownloadColumn(),
                        TimeRemainingColumn(), console=console,
                        disable=args.quiet or not console.is_terminal, transient=True)
    task = progress.add_task("diff", total=None)

    def advance(done: int, total: int) -> None:
        progress.update(task, advance=done, total=total)

    with progress:
        result = compare(args.base, args.models, args.density, budget, advance)
    if args.plot is not None:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        render(result, _wide_console())
    if args.plot is not None and not args.quiet:
        console.print(f"wrote {args.plot}")
    return 0


def _eval(args: argparse.Namespace, console: Console) -> int:
    from .eval.command import run as run_eval
    return run_eval(args, console)


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
