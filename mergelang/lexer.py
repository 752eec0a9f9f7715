"""A pygments lexer for `.merge` scripts, and one for REPL lines (the same, plus `:commands`).

Registered as the pygments entry point `mergelang`, so `pygmentize -l mergelang x.merge`
and documentation tools highlight scripts; the REPL colours its input with it.

The token rules follow `grammar/mergelang.lark` (the single source of the syntax): a
character the grammar cannot start a token with is an `Error` token, so a test that
lexes every shipped script and finds no error token also checks that the lexer keeps up
with the grammar. The lists of built-in names are kept here as plain data, because
importing the compiler (and torch) to colour a file would make `pygmentize` slow; a test
checks them against `builtins.BUILTINS` and `builtins.CONTEXT_NAMES`.
"""

from __future__ import annotations

from pygments.lexer import RegexLexer, bygroups, words
from pygments.token import (
    Comment,
    Error,
    Keyword,
    Name,
    Number,
    Operator,
    Punctuation,
    String,
    Whitespace,
)

KEYWORDS = ("output", "import", "set", "return", "param")
FLOW = ("if", "then", "else")
WORD_OPERATORS = ("and", "or", "not")
CONSTANTS = ("true", "false", "none")
BUILTIN_FUNCTIONS = ("model", "lora", "delta", "sum", "broadcast", "len", "gradient",
                     "stack", "extract_lora")
CONTEXT_NAMES = ("name", "layer", "num_layers", "depth")

_NAME = r"[A-Za-z_][A-Za-z_0-9]*"
_FLOAT = r"(\d+\.\d*|\.\d+)([eE][+-]?\d+)?|\d+[eE][+-]?\d+"


def _rules() -> list:
    """The token rules of the script lexer's root state, most specific first."""
    return [
        (r"[ \t\f]+", Whitespace),
        (r"\r?\n", Whitespace),
        (r"#[^\n]*", Comment.Single),
        (r'"', String.Double, "string"),
        (rf"(fn)([ \t]+)({_NAME})", bygroups(Keyword.Declaration, Whitespace, Name.Function)),
        (words(KEYWORDS, suffix=r"\b"), Keyword.Namespace),
        (words(FLOW, suffix=r"\b"), Keyword),
        (words(WORD_OPERATORS, suffix=r"\b"), Operator.Word),
        (words(CONSTANTS, suffix=r"\b"), Keyword.Constant),
        (words(BUILTIN_FUNCTIONS, suffix=r"(?=[ \t]*\()"), Name.Builtin),
        (words(CONTEXT_NAMES, suffix=r"\b"), Name.Builtin.Pseudo),
        (rf"{_NAME}(?=[ \t]*\()", Name.Function),
        (rf"{_NAME}(?=[ \t]*=(?!=))", Name.Variable),  # a binding or a keyword argument
        (_NAME, Name),
        (_FLOAT, Number.Float),
        (r"\d+", Number.Integer),
        (r"==|!=|<=|>=|[<>~|+\-*/=]", Operator),
        (r"[()\[\]{},.:]", Punctuation),
    ]


class MergeLexer(RegexLexer):
    """Lexer for mergelang `.merge` scripts."""

    name = "mergelang"
    aliases = ["mergelang", "merge"]
    filenames = ["*.merge"]
    mimetypes = ["text/x-mergelang"]

    tokens = {
        "root": _rules(),
        "string": [
            (r'\\.', String.Escape),
            (r'[^"\\\n]+', String.Double),
            (r'"', String.Double, "#pop"),
            (r"\n", Error, "#pop"),  # the grammar's "unterminated string"
        ],
    }


class MergeReplLexer(MergeLexer):
    """A REPL line: a script line, or a `:command` followed by its arguments."""

    name = "mergelang-repl"
    aliases = ["mergelang-repl"]
    filenames = []
    mimetypes = []

    tokens = {
        "root": [(r"^[ \t]*:[A-Za-z_]+", Keyword.Pseudo), *_rules()],
        "string": MergeLexer.tokens["string"],
    }
