"""`mergelang repl [SCRIPT]`: define things, then look at any expression, on any tensor.

    merge> d = math - base
    merge> d["layers.3.mlp.up"]
    tensor model.layers.3.mlp.up_proj.weight  shape [176, 64]  bfloat16  ▁▂▅█▅▂▁
    mean 1.2e-05  std 0.0021  min -0.031  max 0.029  norm 0.17  nonzero 99.9%
    merge> :stats trim(d, 0.2) mlp
    merge> norm(d)

A model expression shows a summary of the model it makes; `x["regex"]` (REPL syntax:
a tensor name, or a regular expression that selects several) shows tensors; `:tensor
REGEX` focuses on one tensor, so that every model expression after it shows that tensor;
a number is shown as it is, a per-tensor value (`depth`, `norm(d)`) for the tensor in
view. The state lives in a `Session` (session.py): statements resolved as they come,
models opened once, values cached by IR node. Errors print as diagnostics and leave the
session as it was; Ctrl-C stops the running evaluation, not the session.

The line editor (history, completion, highlighting, multi-line input) is prompt_toolkit,
in replui.py; when standard input is not a terminal, plain lines are read, so a session
can be scripted: `mergelang repl x.merge < lines.txt`.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from . import ast
from .diagnostics import Diagnostic, MergeError, Source, error
from .ir import SCALAR, Node
from .lower import Lowered
from .lower.values import describe
from .ops.analysis import number_valued
from .plan import Plan, scalar_for
from .replview import (
    model_summary,
    number_view,
    stats_header,
    stats_row,
    stats_width,
    tensor_view,
)
from .session import Session, matching, output_infos
from .session import model_wide as _model_wide
from .structure import bytes_text
from .structure import describe as describe_structure
from .syntax import _parse, parse

SHOWN = 8  # tensors a selection shows before it says how many more there are
HELP = """\
  NAME = expr             bind a name (also `fn ...`, `import "..."`, `set ...`, `param ...`)
  expr                    show it: a model's summary, a number, or the tensor in view
  x["regex"]              show x's tensors whose names match (or the one named so)
  :tensor [REGEX]         view this tensor in every model expression (none: summaries)
  :tensors [REGEX]        list the tensor names of the session's models
  :keys EXPR [REGEX]      list a model expression's tensors, with shapes and dtypes
  :stats EXPR [REGEX]     statistics of every matching tensor, computed tensor by tensor
  :type EXPR              what kind of value EXPR is
  :graph EXPR [REGEX]     the operations that compute one tensor of EXPR
  :time EXPR              show EXPR, with the time taken, the data loaded, the cache hits
  :save EXPR PATH         merge EXPR into the model folder PATH (the session as a script)
  :load SCRIPT            add a script's definitions to the session
  :set [OPTION VALUE]     dtype, out_dtype, seed, device, max-memory, cache (none: list)
  :help                   this text
  :quit                   leave (also Ctrl-D); Ctrl-C stops a running evaluation"""
COMMANDS = ("help", "tensor", "tensors", "keys", "stats", "type", "graph", "time", "save",
            "load", "set", "quit")


class Repl:
    def __init__(self, script: Path | None, console: Console,
                 read: Callable[[str], str] = input, interactive: bool = False):
        self.console = console
        self.read = read
        self.interactive = interactive
        # relative paths in what is typed resolve against the script's folder
        self.path = script.resolve() if script else Path.cwd() / "<repl>"
        self.session = Session(self.path)
        self.focus: str | None = None
        if script is not None:
            self.load_script(script)

    def load_script(self, script: Path) -> None:
        """Add a script's statements; its `output` is shown as text, not evaluated."""
        try:
            text = script.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise error(f"cannot read {script}: {getattr(exc, 'strerror', None) or exc}",
                        None) from None
        module = parse(text, str(script), script.resolve())
        for output in self.session.define(module):
            self.say(f"script output: {_text_of(output.value)}")

    # the loop

    def loop(self) -> int:
        if self.interactive:
            self.say("mergelang repl — :help for commands, Ctrl-D to leave")
        try:
            while True:
                try:
                    text = self._read_statement()
                except EOFError:
                    return 0
                except KeyboardInterrupt as exc:  # Ctrl-C at the prompt: a fresh line
                    _stop_unless_ctrl_c(exc)
                    continue
                if text is None:
                    continue
                if text.split()[0] in (":quit", ":q", ":exit"):
                    return 0
                self.handle(text)
        finally:
            self.session.close()

    def _read_statement(self) -> str | None:
        text = self.read("merge> ")
        while incomplete(text):
            try:
                text += "\n" + self.read("  ...> ")
            except EOFError:
                break  # show what is wrong with what there is
        return text if text.strip() else None

    def handle(self, text: str) -> None:
        """One input: a command, a statement or an expression. Nothing that goes wrong
        ends the session."""
        try:
            stripped = text.strip()
            if stripped.startswith(":"):
                self.command(stripped)
            elif is_statement(stripped):
                self.define(text)
            else:
                self.show(*self.expression(text))
        except MergeError as exc:
            self.console.print(exc.render(), markup=False, highlight=False, soft_wrap=True)
        except KeyboardInterrupt as exc:
            _stop_unless_ctrl_c(exc)
            self.say("interrupted")
        except Exception as exc:  # a bug: report it, keep the session
            self.say(f"internal error: {type(exc).__name__}: {exc}")

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    # statements and expressions

    def define(self, text: str) -> None:
        for output in self.session.define(parse(text, "<repl>", self.path)):
            self.show(output.value, None)

    def expression(self, text: str) -> tuple[ast.Expr, str | None]:
        """An expression as typed, and the pattern of a trailing `["..."]` selection."""
        text = re.sub(r"^\s*output\b", "", text).strip()
        source = Source("<repl>", text + "\n", self.path)
        expr = _parse(source, "expr", text)
        if isinstance(expr, ast.Index) and isinstance(expr.index, ast.String):
            return expr.value, expr.index.value
        return expr, None

    def show(self, expr: ast.Expr, pattern: str | None) -> None:
        lowered = self.session.lower(expr)
        value = lowered.value
        if not isinstance(value, Node):
            self.say(_python(value))
        elif value.kind == SCALAR:
            bound = self.session.bind(lowered)
            for name in self._names(bound.names(), pattern):
                self.say(f"{scalar_for(bound, value, name)!r}   (for {name})")
        elif pattern is None and self.focus is None:
            p = self.session.plan(lowered)
            structure = describe_structure(Path("<expression>"), output_infos(p), None,
                                           p.num_layers)
            self.say(model_summary(structure, p.tensors))
        else:
            self._show_tensors(lowered, pattern, _text_of(expr))

    def _names(self, names: list[str], pattern: str | None) -> list[str]:
        """The tensors to show: those the pattern selects, else the one in view (the
        first, when none is)."""
        if pattern is not None:
            chosen = matching(names, pattern)
            if not chosen:
                raise error(f'no tensor matches "{pattern}"', None,
                            hint=":tensors lists the names")
            return chosen
        if not names:
            raise error("no tensors to show", None)
        return [self.focus if self.focus in names else names[0]]

    def _show_tensors(self, lowered: Lowered, pattern: str | None, label: str) -> None:
        bound = self.session.bind(lowered)
        chosen = self._names(bound.names(), pattern)
        p = self.session.plan(lowered, names=chosen[:SHOWN])
        for t in p.tensors:
            value = self.session.compute(p, t)
            if number_valued(t.root):
                flat = value.reshape(-1)
                number = float(flat[0]) if flat.numel() else float("nan")
                self.say(number_view(label, number, None if _model_wide(t) else t.name))
            else:
                self.say(tensor_view(t.name, value.to(t.out_dtype), t.out_dtype))
        if len(chosen) > SHOWN:
            self.say(f"... and {len(chosen) - SHOWN} more tensors: :stats shows them all")

    # commands

    def command(self, line: str) -> None:
        word, _, arg = line.partition(" ")
        name = word[1:]
        if name not in COMMANDS:
            raise error(f"unknown command {word}", None, hint=":help lists the commands")
        getattr(self, f"_{name}")(arg.strip())

    def _help(self, arg: str) -> None:
        self.say(HELP)

    def _quit(self, arg: str) -> None:
        """(The loop ends the session before a command is run.)"""

    def _tensor(self, arg: str) -> None:
        if not arg:
            self.focus = None
            self.say("no tensor in view: model expressions show summaries")
            return
        found = matching(self._session_names(), arg)
        if not found:
            raise error(f'no tensor matches "{arg}"', None, hint=":tensors lists the names")
        self.focus = found[0]
        self.say(f"current tensor: {self.focus}")

    def _tensors(self, arg: str) -> None:
        names = self._session_names()
        for name in matching(names, arg) if arg else names:
            self.say(name)

    def _session_names(self) -> list[str]:
        names = self.session.tensor_names()
        if not names:
            raise error("no models yet", None, hint='bind one: base = model("path")')
        return names

    def _keys(self, arg: str) -> None:
        p, names = self._model_and_names(arg, ":keys")
        for t in p.tensors:
            if t.name in names:
                self.say(f"{t.name}  {list(t.shape)}  {str(t.out_dtype).removeprefix('torch.')}")

    def _model_and_names(self, arg: str, command: str) -> tuple[Plan, set[str]]:
        expr, pattern = self._split(arg, command)
        lowered = self.session.lower(expr)
        if not isinstance(lowered.value, Node) or lowered.value.kind == SCALAR:
            raise error(f"{command} takes a model expression, not {describe(lowered.value)}",
                        expr.span)
        p = self.session.plan(lowered)
        names = [t.name for t in p.tensors]
        chosen = set(matching(names, pattern) if pattern else names)
        if not chosen:
            raise error(f'no tensor matches "{pattern}"', None)
        return p, chosen

    def _stats(self, arg: str) -> None:
        p, names = self._model_and_names(arg, ":stats")
        p = p.only(names)
        number = number_valued(p.tensors[0].root)
        if number:  # the numbers as computed, not rounded to the models' dtype
            p.tensors = [dataclasses.replace(t, out_dtype=p.compute_dtype) for t in p.tensors]
        width = stats_width([t.name for t in p.tensors])
        self.say(stats_header(width, number))
        self.session.stream(p, lambda t, s: self.say(stats_row(t, s, width, number)))

    def _type(self, arg: str) -> None:
        expr, _ = self.expression(arg)
        lowered = self.session.lower(expr)
        if isinstance(lowered.value, Node) and lowered.value.kind != SCALAR:
            p = self.session.plan(lowered)
            self.say(f"a model expression: {len(p.tensors)} tensors")
        else:
            self.say(describe(lowered.value))

    def _graph(self, arg: str) -> None:
        from .cli import _text as plan_text
        p, names = self._model_and_names(arg, ":graph")
        shown = [t for t in p.tensors if t.name in names]
        if len(names) == len(p.tensors) and self.focus in names:
            shown = [t for t in shown if t.name == self.focus]
        self.say(plan_text(shown[0]))

    def _time(self, arg: str) -> None:
        loads, data, hits = (self.session.loads.tensors, self.session.loads.bytes,
                             self.session.cache.hits)
        start = time.perf_counter()
        self.show(*self.expression(arg))
        took = time.perf_counter() - start
        self.say(f"time {took * 1000:.0f} ms; loaded {self.session.loads.tensors - loads} "
                 f"tensors ({bytes_text(self.session.loads.bytes - data)}); "
                 f"{self.session.cache.hits - hits} values from the cache")

    def _save(self, arg: str) -> None:
        from .replsave import save
        expr_text, _, path = arg.rpartition(" ")
        if not expr_text.strip() or not path:
            raise error(":save takes an expression and a folder", None,
                        hint=":save base + ties(a - base, b - base) merged/")
        expr, _ = self.expression(expr_text)
        save(self.session, expr, Path(path), self.console, self.interactive)

    def _load(self, arg: str) -> None:
        if not arg:
            raise error(":load takes a script", None, hint=":load examples/slerp.merge")
        self.load_script(Path(arg))
        self.say(f"loaded {arg}")

    def _set(self, arg: str) -> None:
        from .replsave import set_option
        set_option(self.session, arg, self.say)

    def _split(self, arg: str, command: str) -> tuple[ast.Expr, str | None]:
        """`EXPR [REGEX]`: the whole argument if it is an expression, else all but its
        last word (the regex, quoted or not)."""
        if not arg:
            raise error(f"{command} takes an expression", None,
                        hint=f"{command} EXPR [REGEX], e.g. {command} math - base mlp")
        try:
            expr, pattern = self.expression(arg)
            return expr, pattern
        except MergeError as whole:
            head, _, tail = arg.rpartition(" ")
            if not head.strip():
                raise whole from None
            expr, _ = self.expression(head)
            return expr, tail.strip().strip('"')


def _stop_unless_ctrl_c(exc: KeyboardInterrupt) -> None:
    """Ctrl-C stops what runs; a kind of KeyboardInterrupt that asks the process to stop
    (SIGTERM, see cli) ends the session."""
    if type(exc) is not KeyboardInterrupt:
        raise exc


def _python(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    if isinstance(value, Node):
        return describe(value)
    return repr(value)


def _text_of(expr: ast.Expr) -> str:
    from .unparse import unparse
    return unparse(expr)


def is_statement(text: str) -> bool:
    """A binding, definition, import, setting or parameter; anything else is shown."""
    if re.match(r"(fn|import|set|param)\b", text):
        return True
    return re.match(r"[A-Za-z_]\w*\s*=(?!=)", text) is not None


def incomplete(text: str) -> bool:
    """Whether the input so far stops where a statement cannot end: an open bracket or
    block, or after an operator, `if`, `then` or `=` (what the parser finds at the end)."""
    stripped = text.strip()
    if not stripped or stripped.startswith(":"):
        return False
    try:
        if is_statement(stripped):
            parse(text)
        else:
            source = Source("<repl>", stripped + "\n")
            _parse(source, "expr", stripped)
    except MergeError as exc:
        d: Diagnostic = exc.diagnostics[0]
        last = len(stripped.splitlines())
        return "never closed" in d.message or d.message == "unexpected end of file" or (
            d.message == "unexpected end of line" and d.span is not None
            and d.span.line >= last)
    return False

