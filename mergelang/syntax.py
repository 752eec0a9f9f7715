"""Parse: source text -> `ast.Module`, or a `MergeError` that points at the mistake.

The grammar lives in `grammar/mergelang.lark`. Where a newline ends a statement is not
context free and is decided by `_Continuations`, a post-lexer: newlines inside ( and [
do not end a statement, a line starting with `then` or `else` continues the one before
it, and so does a line ending with `=` or an operator (so a long `if` or `fn f(x) =`
can be laid out over several lines).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from functools import cache
from pathlib import Path

import lark
import lark.grammar
import lark.lexer
from lark import Token, Transformer, v_args

from . import ast
from .diagnostics import MergeError, Source, Span, error
from .resources import GRAMMAR_FILE

_OPENERS = {"LPAR": ")", "LSQB": "]"}
_CLOSERS = {"RPAR", "RSQB"}
_CONTINUES_LINE = {"THEN", "ELSE"}  # a line starting with these continues the one before
# a line ending with these continues on the next
_OPEN_ENDED = {"EQUAL", "PLUS", "MINUS", "STAR", "SLASH", "VBAR", "CMP_OP", "AND", "OR", "NOT",
               "IF", "THEN", "ELSE"}

_TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "$END": "end of file", "LPAR": '"("', "RPAR": '")"', "LSQB": '"["', "RSQB": '"]"',
    "LBRACE": '"{"', "RBRACE": '"}"', "COMMA": '","', "EQUAL": '"="', "CMP_OP": "a comparison",
    "PLUS": '"+"', "MINUS": '"-"', "STAR": '"*"', "SLASH": '"/"', "VBAR": '"|"', "DOT": '"."',
}


class _Continuations:
    """Post-lexer: drops newlines that do not end a statement; remembers open brackets."""

    always_accept = ("_NL",)

    def __init__(self) -> None:
        self.open_brackets: list[Token] = []
        self.previous: Token | None = None
        self.current: Token | None = None

    def process(self, stream):
        self.open_brackets = []
        pending_newline = None
        for tok in stream:
            if tok.type == "_NL":
                ended = self.current is not None and self.current.type in _OPEN_ENDED
                if not self.open_brackets and pending_newline is None and not ended:
                    pending_newline = tok
                continue
            if pending_newline is not None:
                if tok.type not in _CONTINUES_LINE:
                    yield self._remember(pending_newline)
                pending_newline = None
            if tok.type in _OPENERS:
                self.open_brackets.append(tok)
            elif tok.type in _CLOSERS and self.open_brackets:
                self.open_brackets.pop()
            yield self._remember(tok)
        if pending_newline is not None:
            yield self._remember(pending_newline)

    def _remember(self, tok: Token) -> Token:
        self.previous, self.current = self.current, tok
        return tok


@cache
def _grammar() -> str:
    return GRAMMAR_FILE.read_text()


_OPTIONS: dict = {"parser": "lalr", "lexer": "basic", "start": ["start", "expr"],
                  "propagate_positions": True, "maybe_placeholders": True}
_TABLES_FORMAT = 1  # bump when the way tables are written changes


@cache
def _parser() -> tuple[lark.Lark, _Continuations]:
    """The LALR parser, from its tables in this user's cache when they are there.

    Building the tables takes about 0.1 s; loading them, about 0.015 s. They are kept as
    JSON (never pickle: a cache file is data, and loading it must not be able to run
    code) in a folder only this user can write (see parser_cache_folder), under a name
    that hashes the grammar, lark's version and the options, so a changed grammar
    never meets stale tables."""
    postlex = _Continuations()
    grammar = _grammar()
    key = hashlib.sha256("\0".join(
        [str(_TABLES_FORMAT), lark.__version__, repr(sorted(_OPTIONS.items())), grammar]
    ).encode()).hexdigest()[:32]
    folder = parser_cache_folder()
    path = folder / f"parser-{key}.json" if folder is not None else None
    parser = _load_tables(path, key, postlex) if path is not None else None
    if parser is None:
        parser = lark.Lark(grammar, postlex=postlex, **_OPTIONS)
        if path is not None:
            _save_tables(parser, path, key)
    return parser, postlex


def parser_cache_folder() -> Path | None:
    """`$XDG_CACHE_HOME/mergelang` (default `~/.cache/mergelang`), made private (0700),
    or None when there is no such folder that this user alone owns and can write: then
    the tables are built every time rather than trusted to a shared place."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    folder = Path(base) / "mergelang"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode):
            return None
        if hasattr(os, "getuid"):
            if info.st_uid != os.getuid():
                return None
            if info.st_mode & 0o077:
                os.chmod(folder, 0o700)
    except OSError:
        return None
    return folder


def _load_tables(path: Path, key: str, postlex: _Continuations) -> lark.Lark | None:
    """The parser from tables saved by _save_tables, or None if there are none usable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        if not stat.S_ISREG(info.st_mode) or not mine or info.st_mode & 0o022:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            saved = json.loads(f.read())
        if saved.get("key") != key:
            return None
        data, memo = _untag(saved["tables"])
        return lark.Lark._load_from_dict(data, memo, postlex=postlex,
                                         propagate_positions=True)
    except Exception:  # a damaged or foreign file: build the tables instead
        return None
    finally:
        os.close(fd)


def _save_tables(parser: lark.Lark, path: Path, key: str) -> None:
    """Write the tables atomically (a private temporary file renamed into place)."""
    data, memo = parser.memo_serialize([lark.lexer.TerminalDef, lark.grammar.Rule])
    data["options"] = {k: v for k, v in data["options"].items() if k != "postlex"}
    text = json.dumps({"key": key, "tables": _tag((data, memo))}, separators=(",", ":"))
    try:
        fd, temp = tempfile.mkstemp(prefix=".parser-", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _tag(value: object) -> object:
    """lark's serialised tables as JSON, keeping what JSON alone would lose: tuples, and
    dictionaries with integer keys ("D", "T", "L" mark dicts, tuples and lists)."""
    if isinstance(value, dict):
        return ["D", [[_tag(k), _tag(v)] for k, v in value.items()]]
    if isinstance(value, tuple):
        return ["T", [_tag(v) for v in value]]
    if isinstance(value, list):
        return ["L", [_tag(v) for v in value]]
    if value is None or type(value) in (bool, int, str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in the parser tables")


def _untag(value: object) -> object:
    if not isinstance(value, list):
        return value
    tag, items = value
    if tag == "D":
        return {_untag(k): _untag(v) for k, v in items}
    if tag == "T":
        return tuple(_untag(v) for v in items)
    return [_untag(v) for v in items]


def parse(text: str, name: str = "<script>", path: Path | None = None) -> ast.Module:
    """Parse a whole script. Raises MergeError with a located diagnostic on bad syntax."""
    source = Source(name, text if text.endswith("\n") else text + "\n", path)
    return ast.Module(source, tuple(_parse(source, "start").children))


def parse_expression(text: str, name: str = "<expression>") -> ast.Module:
    """Parse a bare expression; it becomes the module's `output` (spans stay those of
    the text as given)."""
    source = Source(name, text.rstrip() + "\n")
    expr = _parse(source, "expr", source.text.rstrip("\n"))
    return ast.Module(source, (ast.Output(expr.span, expr),))


def _parse(source: Source, start: str, text: str | None = None):
    parser, postlex = _parser()
    try:
        tree = parser.parse(source.text if text is None else text, start=start)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, source, postlex) from None
    try:
        return _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, MergeError):
            raise exc.orig_exc from None
        raise


def _token_span(source: Source, tok: Token) -> Span:
    return Span(source, tok.line, tok.column, tok.end_line, tok.end_column)


def _describe(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    if tok.type == "_NL":
        return "end of line"
    return f'"{tok.value}"'


def _expected(names: set[str]) -> str | None:
    words = sorted({_TERMINAL_WORDS.get(n, f'"{n.lower()}"') for n in names})
    if not words or len(words) > 6:
        return None
    listed = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]
    return "expected " + listed


def _syntax_error(exc: lark.exceptions.UnexpectedInput, source: Source,
                  postlex: _Continuations) -> MergeError:
    if isinstance(exc, lark.exceptions.UnexpectedCharacters):
        span = Span(source, exc.line, exc.column, exc.line, exc.column + 1)
        char = exc.char
        if char == '"':
            return error("unterminated string", span,
                         hint='close the string with " on the same line')
        if char == "'":
            return error("strings use double quotes", span, hint='write "text", not \'text\'')
        return error(f'unexpected character "{char}"', span,
                     hint="remove it, or check the operators in docs/language.md")
    tok: Token = exc.token
    if tok.type == "$END" or tok.line is None:
        last = source.text.rstrip("\n").splitlines() or [""]
        line, col = len(last), len(last[-1]) + 1
        span = Span(source, line, col, line, col + 1)
    else:
        span = _token_span(source, tok)
    prev = postlex.previous
    if (prev is not None and prev.type == "NUMBER" and tok.type in ("NUMBER", "NAME")
            and prev.end_line == tok.line and prev.end_column == tok.column):
        text = prev.value + tok.value
        return error(f'malformed number "{text}"', _token_span(source, prev).__class__(
            source, prev.line, prev.column, tok.end_line, tok.end_column),
            hint="numbers look like 3, 0.25, .5 or 1e-3")
    if postlex.open_brackets:
        opener = postlex.open_brackets[-1]
        closer = _OPENERS[opener.type]
        if tok.type == "$END" or tok.line > opener.line:
            return error(f'"{opener.value}" is never closed', _token_span(source, opener),
                         hint=f'add "{closer}" to close it',
                         notes=[f"reached {_describe(tok)} at {span} still inside it"])
    expected = _expected(set(getattr(exc, "expected", ()) or ()))
    return error(f"unexpected {_describe(tok)}", span, hint=expected)


@v_args(meta=True)
class _ToAst(Transformer):
    """Lark tree -> ast dataclasses, with spans."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    # statements
    def start(self, meta, children):
        return lark.Tree("start", children)

    def assign(self, meta, c):
        return ast.Assign(self._span(meta), str(c[0]), c[1])

    def output(self, meta, c):
        return ast.Output(self._span(meta), c[0])

    def import_(self, meta, c):
        return ast.Import(self._span(meta), _unquote(c[0]))

    def set_(self, meta, c):
        return ast.Set(self._span(meta), str(c[0]), c[1])

    def param_decl(self, meta, c):
        return ast.ParamDecl(self._span(meta), str(c[0]), c[1])

    def fn_expr(self, meta, c):
        name, params, result = c
        return ast.FnDef(self._span(meta), str(name), params or (), (), result)

    def fn_block(self, meta, c):
        name, params, *body, result = c
        return ast.FnDef(self._span(meta), str(name), params or (), tuple(body), result)

    def params(self, meta, c):
        return tuple(c)

    def param_plain(self, meta, c):
        return ast.Param(str(c[0]), None, False, self._span(meta))

    def param_default(self, meta, c):
        return ast.Param(str(c[0]), c[1], False, self._span(meta))

    def param_rest(self, meta, c):
        return ast.Param(str(c[1]), None, True, self._span(meta))

    # expressions
    def cond(self, meta, c):
        return ast.Cond(self._span(meta), *c)

    def or_(self, meta, c):
        return ast.Binary(self._span(meta), "or", c[0], c[1])

    def and_(self, meta, c):
        return ast.Binary(self._span(meta), "and", c[0], c[1])

    def not_(self, meta, c):
        return ast.Unary(self._span(meta), "not", c[0])

    def compare(self, meta, c):
        return ast.Binary(self._span(meta), str(c[1]), c[0], c[2])

    def fallback(self, meta, c):
        return ast.Binary(self._span(meta), "|", c[0], c[1])

    def binop(self, meta, c):
        return ast.Binary(self._span(meta), str(c[1]), c[0], c[2])

    def neg(self, meta, c):
        return ast.Unary(self._span(meta), "-", c[1])

    def call(self, meta, c):
        func, args = c
        positional, keywords = [], []
        for arg in args or ():
            if isinstance(arg, ast.Keyword):
                keywords.append(arg)
            elif keywords:
                raise error("a positional argument cannot follow a keyword argument",
                            arg.span, hint=f"move it before {keywords[0].name}=...")
            else:
                positional.append(arg)
        return ast.Call(self._span(meta), func, tuple(positional), tuple(keywords))

    def args(self, meta, c):
        return c

    def arg_pos(self, meta, c):
        return c[0]

    def arg_kw(self, meta, c):
        return ast.Keyword(str(c[0]), c[1], self._span(meta))

    def index(self, meta, c):
        return ast.Index(self._span(meta), c[0], c[1])

    def slice_(self, meta, c):
        return ast.Slice(self._span(meta), c[0], c[1], c[2])

    def attr(self, meta, c):
        return ast.Attr(self._span(meta), c[0], str(c[1]))

    def number(self, meta, c):
        text = str(c[0])
        value: int | float = int(text) if text.isdigit() else float(text)
        return ast.Number(self._span(meta), value)

    def string(self, meta, c):
        return ast.String(self._span(meta), _unquote(c[0]))

    def true(self, meta, c):
        return ast.Bool(self._span(meta), True)

    def false(self, meta, c):
        return ast.Bool(self._span(meta), False)

    def none(self, meta, c):
        return ast.NoneLit(self._span(meta))

    def name(self, meta, c):
        return ast.Name(self._span(meta), str(c[0]))

    def list_(self, meta, c):
        return ast.ListExpr(self._span(meta), tuple(x for x in c if x is not None))


def _unquote(tok: Token) -> str:
    body = str(tok)[1:-1]
    if "\\" not in body:
        return body
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")
