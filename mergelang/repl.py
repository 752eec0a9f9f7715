"""An interactive session: define things, then look at any expression on one tensor.

    merge> :tensor layers.3.mlp.up_proj
    merge> ties(math - base, code - base, density=0.2)
    tensor model.layers.3.mlp.up_proj.weight  shape [176, 64]  float32
    mean 1.2e-05  std 0.0021  min -0.031  max 0.029  nonzero 21.9%

The session is a script that grows: each accepted statement is appended to it, and
each expression is compiled against it as `output <expression>` through the same
pipeline as a script (so `set seed`, `set dtype`, `set out_dtype` and `set donor` hold
here too); a number is shown as it is, a per-tensor value like `depth` for the current
tensor. Errors print as diagnostics and leave the session unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from . import ast
from .bind import bind
from .diagnostics import MergeError, error
from .execute import run_tensor
from .ir import SCALAR, Node
from .lower import Lowered, lower
from .plan import plan, scalar_for
from .resolve import resolve
from .syntax import parse

HELP = """\
  NAME = expr        bind a name (also `fn ...`, `import "..."`, `set ...`)
  expr               show its value on the current tensor
  :tensor REGEX      choose the current tensor (first name that matches)
  :tensors [REGEX]   list tensor names
  :help              this text
  :quit              leave (also Ctrl-D)"""

_OPEN = {"(": ")", "[": "]", "{": "}"}


class Repl:
    def __init__(self, script: Path | None, console: Console,
                 read: Callable[[str], str] = input):
        self.console = console
        self.read = read
        self.path = script.resolve() if script else Path.cwd() / "<repl>"
        self.statements: list[str] = []
        self.tensor: str | None = None
        if script is not None:
            self._load_script(script)

    def _load_script(self, script: Path) -> None:
        text = script.read_text()
        module = parse(text, str(script), self.path)
        lines = text.splitlines()
        for stmt in module.statements:
            chunk = "\n".join(lines[stmt.span.line - 1:stmt.span.end_line])
            if isinstance(stmt, ast.Output):
                self.console.print(f"script output: {chunk.removeprefix('output').strip()}")
            else:
                self.statements.append(chunk)

    def loop(self) -> int:
        self.console.print("mergelang repl — :help for commands")
        while True:
            try:
                line = self._read_statement()
            except EOFError:
                return 0
            if line is None:
                continue
            if line.strip() in (":quit", ":q", ":exit"):
                return 0
            self.handle(line)

    def _read_statement(self) -> str | None:
        text = self.read("merge> ")
        while _unclosed(text):
            text += "\n" + self.read("  ...> ")
        return text if text.strip() else None

    def handle(self, line: str) -> None:
        try:
            if line.startswith(":"):
                self._command(line)
            elif _is_statement(line):
                self._define(line)
            else:
                self._show(line)
        except MergeError as exc:
            self.console.print(exc.render(), markup=False, highlight=False)

    # commands

    def _command(self, line: str) -> None:
        word, _, arg = line.strip().partition(" ")
        if word == ":help":
            self.console.print(HELP, markup=False)
        elif word == ":tensors":
            for name in self._names():
                if not arg or re.search(arg, name):
                    self.console.print(name, markup=False, highlight=False)
        elif word == ":tensor":
            match = next((n for n in self._names() if re.search(arg.strip(), n)), None)
            if match is None:
                raise error(f'no tensor matches "{arg.strip()}"', None,
                            hint=":tensors lists the names")
            self.tensor = match
            self.console.print(f"current tensor: {match}", markup=False, highlight=False)
        else:
            raise error(f"unknown command {word}", None, hint=":help lists the commands")

    def _define(self, line: str) -> None:
        candidate = self.statements + [line]
        resolve(parse("\n".join(candidate), "<repl>", self.path))
        self.statements = candidate

    def _lower(self, expression: str | None) -> Lowered:
        text = "\n".join(self.statements)
        if expression is not None:
            text += f"\noutput {expression}"
        return lower(resolve(parse(text or "\n", "<repl>", self.path)), session=True)

    def _show(self, expression: str) -> None:
        lowered = self._lower(expression)
        value = lowered.value
        if not isinstance(value, Node):
            self.console.print(repr(value), markup=False, highlight=False)
            return
        bound = bind(lowered)
        if value.kind == SCALAR:
            with bound:
                name = self._current(bound.names())
                scalar = scalar_for(bound, value, name)
            self.console.print(f"{scalar!r}   (for {name})", markup=False, highlight=False)
            return
        names = bound.names()
        only = [self.tensor] if self.tensor in names else None
        try:
            p = plan(bound, names=only)
        except BaseException:
            bound.close()
            raise
        with p:
            name = self._current([t.name for t in p.tensors])
            t = next(t for t in p.tensors if t.name == name)
            result = run_tensor(p, t).float()
        self.console.print(_describe(name, result, t.out_dtype), markup=False, highlight=False)

    def _names(self) -> list[str]:
        lowered = self._lower(None)
        if not lowered.models:
            raise error("no models yet", None, hint='bind one: base = model("path")')
        with bind(lowered) as bound:
            return bound.names()

    def _current(self, names: list[str]) -> str:
        if self.tensor in names:
            return self.tensor
        if not names:
            raise error("no tensors to show", None)
        self.tensor = names[0]
        return self.tensor


def _describe(name: str, x: torch.Tensor, dtype: torch.dtype) -> str:
    shape = list(x.shape)
    nonzero = float((x != 0).float().mean()) * 100
    return (f"tensor {name}  shape {shape}  {str(dtype).removeprefix('torch.')}\n"
            f"mean {x.mean():.4g}  std {x.std() if x.numel() > 1 else 0:.4g}  "
            f"min {x.min():.4g}  max {x.max():.4g}  nonzero {nonzero:.1f}%")


def _is_statement(line: str) -> bool:
    stripped = line.lstrip()
    if re.match(r"(fn|import|set)\b", stripped):
        return True
    return re.match(r"[A-Za-z_]\w*\s*=(?!=)", stripped) is not None


def _unclosed(text: str) -> bool:
    depth = 0
    for char in re.sub(r'"([^"\\]|\\.)*"|#[^\n]*', "", text):
        if char in _OPEN:
            depth += 1
        elif char in _OPEN.values():
            depth -= 1
    return depth > 0

