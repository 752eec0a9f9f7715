"""The REPL's line editor (prompt_toolkit): history kept across sessions, completion,
highlighting and multi-line input.

- History: one file, `$MERGELANG_HISTORY` if set, else `$XDG_DATA_HOME/mergelang/history`
  (by default `~/.local/share/mergelang/history`). Up and Ctrl-R search it.
- Tab completes `:commands`; inside a string, the tensor names of the session's models;
  elsewhere the names in scope (the session's, the standard library's, the built-ins and
  primitives) and, inside a call, the callee's keyword arguments as `name=`.
- Enter runs the input when it is complete, and starts a new line when it is not (an
  open bracket or `fn` block, or a line that stops after an operator, `if`, `then` or
  `=`); Escape then Enter runs it as it is.
- Input is coloured by the pygments lexer (lexer.MergeReplLexer).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from prompt_toolkit.lexers import PygmentsLexer

from .builtins import BUILTINS, CONTEXT_NAMES
from .lexer import CONSTANTS, FLOW, KEYWORDS, WORD_OPERATORS, MergeReplLexer
from .ops import PRIMITIVES

if TYPE_CHECKING:
    from .repl import Repl

HISTORY_VARIABLE = "MERGELANG_HISTORY"


def history_path() -> Path:
    """Where the history is kept (see the module docstring)."""
    given = os.environ.get(HISTORY_VARIABLE)
    if given:
        return Path(given)
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                           "share")
    return Path(data) / "mergelang" / "history"


class MergeCompleter(Completer):
    """Completion from the session's state (see the module docstring)."""

    def __init__(self, repl: Repl):
        self.repl = repl

    def get_completions(self, document: Document,
                        complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        command = re.fullmatch(r"\s*(:\w*)", text)
        if command:
            from .repl import COMMANDS
            yield from _matches(command.group(1), [f":{c}" for c in COMMANDS])
            return
        line = document.current_line_before_cursor
        quoted = re.search(r'"((?:[^"\\]|\\.)*)$', line)
        if quoted and _in_string(line):
            prefix = quoted.group(1)
            names = self.repl.session.tensor_names()
            yield from _matches(prefix, names, anywhere=True)
            return
        word = re.search(r"[A-Za-z_]\w*$", text)
        prefix = word.group() if word else ""
        if not prefix and not text.rstrip().endswith(("(", ",")):
            return
        yield from _matches(prefix, [f"{p}=" for p in self.keywords(text)])
        yield from _matches(prefix, self.names())

    def names(self) -> list[str]:
        scope = self.repl.session.resolved.scope
        found = set(scope.all_names()) | set(BUILTINS) | set(PRIMITIVES) | set(CONTEXT_NAMES)
        found |= {*KEYWORDS, *FLOW, *WORD_OPERATORS, *CONSTANTS, "fn"}
        return sorted(found)

    def keywords(self, text: str) -> list[str]:
        """The parameters of the function whose call the cursor is in."""
        callee = _callee(text)
        if callee is None:
            return []
        found = self.repl.session.resolved.scope.lookup_function(callee)
        if found is not None:
            return [p.name for p in found[0].params if not p.rest]
        if callee in PRIMITIVES:
            return [p.name for p in PRIMITIVES[callee].params]
        if callee in BUILTINS:
            return [p.name for p in BUILTINS[callee].signature.params if not p.rest]
        return []


def _matches(prefix: str, candidates: list[str], anywhere: bool = False
             ) -> Iterator[Completion]:
    for c in candidates:
        if c.startswith(prefix) or (anywhere and prefix and prefix in c):
            yield Completion(c, start_position=-len(prefix))


def _in_string(line: str) -> bool:
    """Whether the end of the line is inside a string (an odd number of quotes that are
    not escaped, outside comments)."""
    quotes = 0
    escaped = False
    for ch in line:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quotes += 1
        elif ch == "#" and quotes % 2 == 0:
            return False
    return quotes % 2 == 1


def _callee(text: str) -> str | None:
    """The name before the innermost open `(` of the text (strings skipped)."""
    depth = 0
    plain = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    for i in range(len(plain) - 1, -1, -1):
        ch = plain[i]
        if ch in ")]":
            depth += 1
        elif ch in "([":
            if depth == 0:
                if ch == "[":
                    return None
                name = re.search(r"([A-Za-z_]\w*)\s*$", plain[:i])
                return name.group(1) if name else None
            depth -= 1
    return None


def reader(repl: Repl) -> Callable[[str], str]:
    """A `read(prompt)` for the Repl that edits lines with prompt_toolkit."""
    from .repl import incomplete

    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history: History = FileHistory(str(path))
    except OSError as exc:  # an unwritable home: this session's history only
        repl.say(f"history is not kept: cannot write {path} ({exc.strerror})")
        history = InMemoryHistory()
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event) -> None:
        buffer = event.current_buffer
        if buffer.complete_state is not None and buffer.complete_state.current_completion:
            buffer.apply_completion(buffer.complete_state.current_completion)
            return
        if incomplete(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _run_as_is(event) -> None:
        event.current_buffer.validate_and_handle()

    session: PromptSession = PromptSession(
        history=history, completer=MergeCompleter(repl),
        lexer=PygmentsLexer(MergeReplLexer), multiline=True, key_bindings=bindings,
        prompt_continuation=lambda width, line, soft: "  ...> ".rjust(width),
        complete_while_typing=False, enable_history_search=False)
    return lambda prompt: session.prompt(prompt)

