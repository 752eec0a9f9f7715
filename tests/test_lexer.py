"""Editor support: the pygments lexer and the TextMate grammar place every character of
every shipped script, and agree with the compiler on the built-in names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pygments.lexers import get_lexer_by_name, get_lexer_for_filename
from pygments.token import Error, Keyword, Name, String

from mergelang import builtins, lexer
from mergelang.lexer import MergeLexer, MergeReplLexer

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "stdlib").glob("*.merge")) + sorted((ROOT / "examples").glob("*.merge"))
GRAMMAR = ROOT / "editors" / "vscode" / "syntaxes" / "mergelang.tmLanguage.json"
IDS = {"ids": lambda p: f"{p.parent.name}/{p.name}"}


@pytest.mark.parametrize("path", SCRIPTS, **IDS)
def test_pygments_lexes_every_script_without_an_error_token(path):
    text = path.read_text()
    tokens = list(MergeLexer().get_tokens(text))
    assert [v for t, v in tokens if t in Error] == []
    assert "".join(v for _, v in tokens) == text  # nothing lost or invented


def test_the_lexer_is_registered_with_pygments():
    assert isinstance(get_lexer_by_name("mergelang"), MergeLexer)
    assert isinstance(get_lexer_for_filename("ties.merge"), MergeLexer)


def test_built_in_names_agree_with_the_compiler():
    assert set(lexer.BUILTIN_FUNCTIONS) == set(builtins.BUILTINS)
    assert set(lexer.CONTEXT_NAMES) == set(builtins.CONTEXT_NAMES)


def test_tokens_of_a_line():
    tokens = [(t, v) for t, v in MergeLexer().get_tokens(
        'fn f(x, w=0.5) = if name ~ "mlp\\." then trim(x, 1e-3) else none  # c\n')
        if v.strip()]
    assert (Keyword.Declaration, "fn") in tokens and (Name.Function, "f") in tokens
    assert (Name.Variable, "w") in tokens and (Name.Builtin.Pseudo, "name") in tokens
    assert (String.Escape, "\\.") in tokens and (Name.Function, "trim") in tokens
    assert (Keyword.Constant, "none") in tokens
    bad = [v for t, v in MergeLexer().get_tokens('x = "open\ny = \'q\'\n') if t in Error]
    assert bad == ["\n", "'", "'"]  # an unterminated string, and single quotes


def test_the_repl_lexer_knows_commands():
    tokens = list(MergeReplLexer().get_tokens(':stats ties(a, b) "mlp"\n'))
    assert tokens[0] == (Keyword.Pseudo, ":stats")
    assert not [v for t, v in tokens if t in Error]


# --- the TextMate grammar, run by a small interpreter of the subset it uses -------------


def _compile(grammar: dict) -> dict:
    return {name: rule for name, rule in grammar["repository"].items()}


def _expand(patterns: list, repository: dict) -> list:
    out = []
    for p in patterns:
        if "include" in p:
            out += _expand([repository[p["include"].lstrip("#")]], repository)
        elif "patterns" in p and "begin" not in p:
            out += _expand(p["patterns"], repository)
        else:
            out.append(p)
    return out


def textmate_scopes(text: str, grammar: dict) -> list[tuple[str, str]]:
    """(text, scope) for each token, by TextMate's rule: at each point the pattern whose
    match starts first wins (the earlier pattern on a tie); a begin/end rule pushes a
    context whose end pattern is tried before its own patterns."""
    repository = _compile(grammar)
    top = _expand(grammar["patterns"], repository)
    out: list[tuple[str, str]] = []
    stack: list[dict] = []
    for line in text.splitlines(keepends=True):
        pos = 0
        while pos < len(line):
            if stack:
                rule = stack[-1]
                candidates = [({"match": rule["end"], "end_of": rule}, None)]
                candidates += [(p, None) for p in _expand(rule.get("patterns", []), repository)]
            else:
                candidates = [(p, None) for p in top]
            best = None
            for p, _ in candidates:
                m = re.compile(p.get("match") or p["begin"]).search(line, pos)
                if m and m.end() > m.start() and (best is None or m.start() < best[1].start()):
                    best = (p, m)
            if best is None:
                out.append((line[pos:], stack[-1]["name"] if stack else ""))
                break
            p, m = best
            if m.start() > pos:
                out.append((line[pos:m.start()], stack[-1]["name"] if stack else ""))
            captures = p.get("captures") or p.get("beginCaptures") or (
                p["end_of"].get("endCaptures") if "end_of" in p else None) or {}
            out += _split(m, p.get("name", ""), captures)
            if "begin" in p:
                stack.append(p)
            elif "end_of" in p:
                stack.pop()
            pos = m.end()
    return out


def _split(m: re.Match, name: str, captures: dict) -> list[tuple[str, str]]:
    """A match as tokens: each captured group with its scope added to the rule's, the
    text between them with the rule's scope alone."""
    groups = sorted((m.span(int(k)), v["name"]) for k, v in captures.items()
                    if m.group(int(k)))
    out, pos = [], m.start()
    for (start, end), scope in groups:
        if start > pos:
            out.append((m.string[pos:start], name))
        out.append((m.string[start:end], f"{name} {scope}".strip()))
        pos = end
    if pos < m.end():
        out.append((m.string[pos:m.end()], name))
    return out


@pytest.mark.parametrize("path", SCRIPTS, **IDS)
def test_the_textmate_grammar_places_every_script_without_an_illegal_scope(path):
    grammar = json.loads(GRAMMAR.read_text())
    tokens = textmate_scopes(path.read_text(), grammar)
    assert [t for t in tokens if "invalid" in t[1]] == []
    assert all(scope or not text.strip() for text, scope in tokens), tokens


def test_the_textmate_grammar_marks_mistakes():
    grammar = json.loads(GRAMMAR.read_text())
    tokens = textmate_scopes("x = 'a' $\ny = \"open\n", grammar)
    assert [t for t, s in tokens if "invalid" in s] == ["'", "'", "$", "\n"]
    scopes = dict(textmate_scopes("fn ties(x) = trim(x, 0.2)  # c\n", grammar))
    assert scopes["ties"] == "entity.name.function.mergelang"
    assert scopes["trim"] == "entity.name.function.call.mergelang"
    assert scopes["0.2"] == "constant.numeric.float.mergelang"
    assert scopes["#"].startswith("comment.line")
