"""The unparser: syntax tree -> text that parses back to the same tree, laid out one way."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from mergelang import ast
from mergelang.diagnostics import Source, Span
from mergelang.syntax import parse, parse_expression
from mergelang.unparse import WIDTH, Trivia, number_text, string_text, unparse

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "stdlib").glob("*.merge")) + sorted((ROOT / "examples").glob("*.merge"))
AT = Span(Source("<test>", ""), 1, 1, 1, 1)


def bare(node):
    """`node` without spans (nor the module's source), to compare trees."""
    if isinstance(node, ast.Module):
        return bare(node.statements)
    if isinstance(node, tuple):
        return tuple(bare(n) for n in node)
    if dataclasses.is_dataclass(node):
        return (type(node).__name__,
                *(bare(getattr(node, f.name)) for f in dataclasses.fields(node)
                  if f.name != "span"))
    return node


def expr(text: str) -> ast.Expr:
    return parse_expression(text).statements[0].value


def again(text: str, width: int = WIDTH) -> str:
    """Parse `text`, unparse it, and check the text parses back to the same tree."""
    tree = parse(text)
    out = unparse(tree, width=width)
    assert bare(parse(out)) == bare(tree), out
    return out


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_round_trip_and_unparsing_is_idempotent(path):
    tree = parse(path.read_text())
    text = unparse(tree)
    assert bare(parse(text)) == bare(tree)
    assert unparse(parse(text)) == text


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_narrow_layouts_still_parse_back(path):
    """At 30 columns nearly every bracket and `if` breaks: every break must be legal."""
    text = again(path.read_text(), width=30)
    assert unparse(parse(text), width=30) == text


def test_the_scripts_cover_every_node_kind():
    def kinds(node, found: set) -> set:
        if isinstance(node, tuple):
            for n in node:
                kinds(n, found)
        elif dataclasses.is_dataclass(node) and not isinstance(node, Span):
            found.add(type(node))
            for f in dataclasses.fields(node):
                kinds(getattr(node, f.name), found)
        return found

    found: set = set()
    for path in SCRIPTS:
        kinds(parse(path.read_text()).statements, found)
    sample = parse('import "x.merge"\nset seed = 1\nparam p = -1\nfn f(x) = x\nn = none\n'
                   "s = a.layers[1:]\nt = a.layers[:2]\noutput not -a[0]\n")
    kinds(sample.statements, found)
    declared = {c for _, c in inspect.getmembers(ast, inspect.isclass)
                if c.__module__ == ast.__name__ and c not in (ast.Expr, ast.Stmt, ast.Module)}
    assert declared <= found, declared - found
    again(unparse(sample))


@pytest.mark.parametrize(("text", "expected"), [
    ("(a + b) * c", "(a + b) * c"),
    ("-(a - b)", "-(a - b)"),
    ("a - (b - c)", "a - (b - c)"),
    ("(a - b) - c", "a - b - c"),
    ("a / (b * c)", "a / (b * c)"),
    ("(a / b) * c", "a / b * c"),
    ("1 + (if a then b else c) * 2", "1 + (if a then b else c) * 2"),
    ("(if a then b else c) + 1", "(if a then b else c) + 1"),
    ("x * (if a then b else c)", "x * (if a then b else c)"),
    ("not (a and b)", "not (a and b)"),
    ("(not a) and b", "not a and b"),
    ("not (a == b)", "not a == b"),
    ("(a | b).layers[0:4]", "(a | b).layers[0:4]"),
    ("a | (b | c)", "a | (b | c)"),
    ("(a + b) | c", "a + b | c"),
    ("a == (b == c)", "a == (b == c)"),
    ("(a < b) == c", "(a < b) == c"),
    ("a ~ (b | c)", "a ~ b | c"),
    ("(a or b) and c", "(a or b) and c"),
    ("a or (b and c)", "a or b and c"),
    ("a or (b or c)", "a or (b or c)"),
    ("-(-a)", "- -a"),
    ("a * -b", "a * -b"),
    ("(-a) * b", "-a * b"),
    ("-(a * b)", "-(a * b)"),
    ("-a.b[0](c)", "-a.b[0](c)"),
    ("(-a).b", "(-a).b"),
    ("(a + b)(c)", "(a + b)(c)"),
    ("(f)(x, y=(1))", "f(x, y=1)"),
    ("f(if a then b else c, k=if a then b else c)", "f(if a then b else c, k=if a then b else c)"),
    ("[(a + b), (if a then b else c)][(0)]", "[a + b, if a then b else c][0]"),
    ("if a then (if b then c else d) else e", "if a then (if b then c else d) else e"),
    ("if (if a then b else c) then d else e", "if (if a then b else c) then d else e"),
    ("if a then b else (if c then d else e)", "if a then b else if c then d else e"),
    ("if a or b then c + d else not e", "if a or b then c + d else not e"),
    ("(1).real", "(1).real"),
    ("1.5 + .5 + 1e-3 + 2.0", "1.5 + 0.5 + 0.001 + 2.0"),
    ('"a\\"b" ~ "\\\\d"', '"a\\"b" ~ "\\\\d"'),
    ("x[:]", "x[:]"),
])
def test_precedence_adds_only_the_parentheses_it_needs(text, expected):
    tree = expr(text)
    assert unparse(tree) == expected
    assert bare(expr(expected)) == bare(tree)


def test_trees_the_parser_does_not_make():
    """A negative number (the converter writes weights like -0.5) reads as unary minus."""
    x = ast.Name(AT, "x")
    minus = ast.Number(AT, -0.5)
    assert unparse(ast.Binary(AT, "*", x, minus)) == "x * -0.5"
    assert unparse(ast.Binary(AT, "-", x, minus)) == "x - -0.5"
    assert unparse(ast.Attr(AT, minus, "y")) == "(-0.5).y"
    assert unparse(ast.Unary(AT, "-", minus)) == "- -0.5"
    assert unparse(ast.ListExpr(AT, ())) == "[]"
    assert unparse(ast.Call(AT, x, (), ())) == "x()"
    with pytest.raises(ValueError):
        number_text(float("inf"))


def test_strings_round_trip():
    for value in ['a"b', "back\\slash", "line\nbreak\ttab\r", "é and 中", "\x00\x7f", ""]:
        text = string_text(value)
        assert "\n" not in text
        assert expr(text).value == value


def test_statements_and_functions():
    text = again('import "lib.merge"\nset dtype = "float32"\nfn half(x) = x / 2\n'
                 "fn f(*xs, w=[1, -2], k=none) {\n  y = sum(xs)\n  return y * w\n}\n"
                 "base = model(\"models/base\")\noutput half(base)\n")
    assert text == ('import "lib.merge"\nset dtype = "float32"\nfn half(x) = x / 2\n'
                    "fn f(*xs, w=[1, -2], k=none) {\n    y = sum(xs)\n    return y * w\n}\n"
                    'base = model("models/base")\noutput half(base)\n')


def test_long_calls_break_one_argument_a_line_aligned_after_the_bracket():
    args = ", ".join(f"model_number_{i} - base" for i in range(6))
    text = again(f"output base + ties({args}, weights=[0.1, 0.2], density=0.5)\n")
    assert text == ("output base + ties(model_number_0 - base,\n"
                    "                   model_number_1 - base,\n"
                    "                   model_number_2 - base,\n"
                    "                   model_number_3 - base,\n"
                    "                   model_number_4 - base,\n"
                    "                   model_number_5 - base,\n"
                    "                   weights=[0.1, 0.2],\n"
                    "                   density=0.5)\n")


def test_long_lists_of_literals_are_filled():
    values = ", ".join(str(i / 10) for i in range(40))
    text = again(f"t = gradient([{values}])\n")
    lines = text.splitlines()
    assert len(lines) == 3 and all(WIDTH - 6 < len(line) <= WIDTH for line in lines[:2])
    column = len("t = gradient([")
    assert all(line[:column].isspace() and line[column].isdigit() for line in lines[1:])
    assert lines[2].endswith("3.9])")


def test_lines_fit_where_brackets_allow():
    inner = ", ".join(f"f_{i}(alpha_{i}, beta_{i})" for i in range(12))
    text = again(f"x = g(h([{inner}]), k=if a then {inner.replace(', ', ' + ')} else 0)\n")
    assert all(len(line) <= WIDTH for line in text.splitlines()), text
    assert "f_2(alpha_2 + beta_2) +\n" + " " * 18 + "f_3(" in text   # after the operator


def test_else_if_chains_break_one_branch_a_line():
    text = again('t = if name ~ "attn" then (if layer == none then 0 else 1) else if name ~ '
                 '"mlp" then 1 else 0.5\nu = if a then b else c\n')
    assert text == ('t = if name ~ "attn" then (if layer == none then 0 else 1)\n'
                    '    else if name ~ "mlp" then 1\n'
                    "    else 0.5\n"
                    "u = if a then b else c\n")
    long = again(f"v = if {'a_long_condition_name and ' * 3}c then 1.0 else 2.0\n", width=60)
    assert long == ("v = if a_long_condition_name and a_long_condition_name and\n"
                    "       a_long_condition_name and c then 1.0\n"
                    "    else 2.0\n")


def test_trivia_comments_blank_lines_and_aligned_trailing_comments():
    tree = parse('set dtype = "float32"\nset seed = 42\nbase = model("b")\n'
                 "fn f(x) {\n  y = x\n  return y\n}\noutput f(base)\n")
    dtype, seed, base, fn, out = tree.statements
    trivia = {
        dtype: Trivia(above=("# head", ""), after="# compute dtype"),
        seed: Trivia(after="# seeds the random ops"),
        base: Trivia(above=("",), after="# the base"),
        fn.body[0]: Trivia(above=("# inside",)),
        fn.result: Trivia(after="# the result"),
        out: Trivia(above=("",)),
    }
    text = unparse(tree, trivia, end=("# the end",))
    assert text == ("# head\n"
                    "\n"
                    'set dtype = "float32"  # compute dtype\n'
                    "set seed = 42          # seeds the random ops\n"
                    "\n"
                    'base = model("b")  # the base\n'
                    "fn f(x) {\n"
                    "    # inside\n"
                    "    y = x\n"
                    "    return y  # the result\n"
                    "}\n"
                    "\n"
                    "output f(base)\n"
                    "# the end\n")
    assert bare(parse(text)) == bare(tree)
    with pytest.raises(ValueError):
        unparse(tree, {out: Trivia(above=("not a comment",))})
