"""Parse: source text -> `ast.Module`, or a `MergeError` that points at the mistake.

The grammar lives in `grammar/mergelang.lark`. Where a newline ends a statement is not
context free and is decided by `_Continuations`, a post-lexer: newlines inside ( and [
do not end a statement, a line starting with `then` or `else` continues the one before
it, and so does a line ending with `=` or an operator (so a long `if` or `fn f(x) =`
can be laid out over several lines).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import lark
from lark import Token, v_args
from lark.visitors import Transformer_NonRecursive

from . import ast
from .diagnostics import MergeError, Source, Span, error
from .literals import check_path, number_value, string_value
from .parser_tables import build_parser
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
                if len(self.open_brackets) > MAX_NESTING:
                    raise _TooDeep(tok)
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
MAX_NESTING = 100
"""Brackets nested deeper than this are an error: no merge needs them, and each level
costs the later stages stack depth."""


@cache
def _parser() -> tuple[lark.Lark, _Continuations]:
    """The LALR parser; its tables come from this user's cache (see parser_tables)."""
    postlex = _Continuations()
    return build_parser(_grammar(), _OPTIONS, postlex), postlex


class _TooDeep(Exception):
    """Raised by the post-lexer at the bracket that nests one level too deep."""

    def __init__(self, token: Token) -> None:
        super().__init__(token)
        self.token = token


def normalize(text: str) -> str:
    """The text as the parser reads it: without a UTF-8 byte-order mark, and with \r\n
    and a lone \r as \n, so a script means the same from a file (read with universal
    newlines) and from a string, whatever editor wrote it."""
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def _check_encodable(source: Source) -> None:
    """A script is saved as UTF-8 in the output (model card, shard metadata): a lone
    surrogate, which only a str made in Python can hold, is refused where it is."""
    bad = next((i for i, c in enumerate(source.text) if "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return
    line = source.text.count("\n", 0, bad) + 1
    col = bad - (source.text.rfind("\n", 0, bad) + 1) + 1
    raise error(f"the script holds a lone surrogate (U+{ord(source.text[bad]):04X}), which "
                "UTF-8 cannot encode", Span(source, line, col, line, col + 1),
                hint="remove it; the text was probably decoded with errors='surrogateescape'")


def parse(text: str, name: str = "<script>", path: Path | None = None) -> ast.Module:
    """Parse a whole script. Raises MergeError with a located diagnostic on bad syntax."""
    text = normalize(text)
    source = Source(name, text if text.endswith("\n") else text + "\n", path)
    _check_encodable(source)
    return ast.Module(source, tuple(_parse(source, "start").children))


def parse_expression(text: str, name: str = "<expression>") -> ast.Module:
    """Parse a bare expression; it becomes the module's `output` (spans stay those of
    the text as given)."""
    source = Source(name, normalize(text).rstrip() + "\n")
    expr = _parse(source, "expr", source.text.rstrip("\n"))
    return ast.Module(source, (ast.Output(expr.span, expr),))


def _parse(source: Source, start: str, text: str | None = None):
    parser, postlex = _parser()
    try:
        tree = parser.parse(source.text if text is None else text, start=start)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, source, postlex) from None
    except _TooDeep as exc:
        raise error(f"brackets nested more than {MAX_NESTING} deep",
                    _token_span(source, exc.token),
                    hint="name the inner parts (x = ...) and combine the names") from None
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
        shown = f'"{char}"' if char.isprintable() else f"U+{ord(char):04X}"
        return error(f"unexpected character {shown}", span,
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
class _ToAst(Transformer_NonRecursive):
    """Lark tree -> ast dataclasses, with spans. Not recursive, so a long chain of
    operators (a sum of 400 models) does not run out of Python's stack."""

    def __init__(self, source: Source):
        super().__init__()
        self.source = source

    def _span(self, meta) -> Span:
        return Span(self.source, meta.line, meta.column, meta.end_line, meta.end_column)

    def _token_span(self, tok: Token) -> Span:
        return _token_span(self.source, tok)

    # statements
    def start(self, meta, children):
        return lark.Tree("start", children)

    def assign(self, meta, c):
        return ast.Assign(self._span(meta), str(c[0]), c[1])

    def output(self, meta, c):
        return ast.Output(self._span(meta), c[0])

    def import_(self, meta, c):
        span = self._token_span(c[0])
        path = string_value(str(c[0]), span)
        check_path(path, span)
        return ast.Import(self._span(meta), path)

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
        return ast.Unary(self._span(meta), ast.NOT, c[0])

    def compare(self, meta, c):
        return ast.Binary(self._span(meta), str(c[1]), c[0], c[2])

    def fallback(self, meta, c):
        return ast.Binary(self._span(meta), "|", c[0], c[1])

    def binop(self, meta, c):
        return ast.Binary(self._span(meta), str(c[1]), c[0], c[2])

    def neg(self, meta, c):
        return ast.Unary(self._span(meta), ast.NEGATE, c[1])

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
        return ast.Number(self._span(meta), number_value(str(c[0]), self._span(meta)))

    def string(self, meta, c):
        return ast.String(self._span(meta), string_value(str(c[0]), self._span(meta)))

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

