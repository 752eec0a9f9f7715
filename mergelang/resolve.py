"""Resolve: names, imports, the standard library, function definitions, call signatures.

Input: the parsed script. Output: a `Resolved` program in which every name used is
known to exist, every call matches its callee's parameters, no name is bound twice, and
there is at most one `output`. Nothing here looks at models or tensors.

Scopes, innermost first: a function's parameters and block locals; the script's names
(its bindings and functions, and those of the files it imports); the standard library;
the built-ins (primitives, `model`, `sum`, ..., and the per-tensor names `name`,
`layer`, `num_layers`, `depth`). Standard-library functions see only the library and
the built-ins, so a script's names never change what `ties` means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from . import ast
from .builtins import BUILTINS, CONTEXT_NAMES, SETTINGS, Signature, signature_of_fn
from .diagnostics import MergeError, Span, did_you_mean, error
from .literals import check_path
from .ops import PRIMITIVES
from .params import check_declaration, declared
from .resources import STDLIB_DIR
from .syntax import parse


@dataclass
class Scope:
    """The names one module level defines: value bindings and functions."""

    bindings: dict[str, ast.Assign] = field(default_factory=dict)
    functions: dict[str, ast.FnDef] = field(default_factory=dict)
    parent: Scope | None = None
    externals: frozenset[str] = frozenset()  # names bound by the embedding program

    def defines(self, name: str) -> bool:
        return name in self.bindings or name in self.functions or name in self.externals

    def lookup_function(self, name: str) -> tuple[ast.FnDef, Scope] | None:
        scope: Scope | None = self
        while scope is not None:
            if name in scope.functions:
                return scope.functions[name], scope
            scope = scope.parent
        return None

    def all_names(self) -> set[str]:
        names: set[str] = set()
        scope: Scope | None = self
        while scope is not None:
            names |= scope.bindings.keys() | scope.functions.keys() | scope.externals
            scope = scope.parent
        return names


@dataclass
class Resolved:
    module: ast.Module
    scope: Scope                       # the script's names; parent is the standard library
    settings: dict[str, ast.Set]
    output: ast.Output | None

    @property
    def params(self) -> dict[str, ast.ParamDecl]:
        """The script parameters (`param NAME = literal`), imported files' included."""
        return declared(self.scope.bindings)


def resolve(module: ast.Module, externals: frozenset[str] = frozenset()) -> Resolved:
    """Check a parsed script and build its scopes. Raises MergeError.

    `externals` are names the embedding program binds (`mergelang.evaluate`'s inputs)."""
    scope = Scope(parent=stdlib_scope(), externals=externals)
    settings: dict[str, ast.Set] = {}
    outputs: list[ast.Output] = []
    _collect(module, scope, settings, outputs, importing=())
    if len(outputs) > 1:
        raise error("a script has one `output`; this is the second", outputs[1].span,
                    hint="combine them into one expression, or keep one",
                    notes=[f"the first is at {outputs[0].span}"])
    checker = _Checker(scope)
    checker.check_scope(scope)
    for stmt in [*outputs, *settings.values()]:
        checker.expr(stmt.value, frozenset())
    return Resolved(module, scope, settings, outputs[0] if outputs else None)


@cache
def stdlib_scope() -> Scope:
    """The standard library: every `stdlib/*.merge`, parsed and checked once."""
    scope = Scope()
    for path in sorted(STDLIB_DIR.glob("*.merge")):
        module = parse(path.read_text(), f"stdlib/{path.name}", path)
        for stmt in module.statements:
            if not isinstance(stmt, ast.FnDef):
                raise error("the standard library holds only `fn` definitions", stmt.span)
            _define(scope, stmt.name, stmt, stmt.span)
    _Checker(scope).check_scope(scope)
    return scope


def _collect(module: ast.Module, scope: Scope, settings: dict[str, ast.Set],
             outputs: list[ast.Output], importing: tuple[Path, ...]) -> None:
    for stmt in module.statements:
        if isinstance(stmt, ast.Assign):
            _define(scope, stmt.name, stmt, stmt.span)
        elif isinstance(stmt, ast.FnDef):
            _define(scope, stmt.name, stmt, stmt.span)
        elif isinstance(stmt, ast.ParamDecl):  # a binding that -D may replace
            check_declaration(stmt)
            _define(scope, stmt.name, stmt, stmt.span)
        elif isinstance(stmt, ast.Output):
            if importing:
                raise error("an imported file cannot have an `output`", stmt.span,
                            hint="move the output into the script that imports this file")
            outputs.append(stmt)
        elif isinstance(stmt, ast.Set):
            _check_setting(stmt, settings)
        elif isinstance(stmt, ast.Import):
            _import(stmt, module, scope, settings, outputs, importing)


def _import(stmt: ast.Import, module: ast.Module, scope: Scope, settings: dict[str, ast.Set],
            outputs: list[ast.Output], importing: tuple[Path, ...]) -> None:
    here = module.source.path.parent if module.source.path else Path.cwd()
    shown = stmt.path if len(stmt.path) <= 80 else f"{stmt.path[:60]}... ({len(stmt.path)} " \
        "characters)"
    try:
        path = (here / stmt.path).resolve()
        chain = importing + ((module.source.path.resolve(),) if module.source.path else ())
        found = path.is_file()
    except (OSError, RuntimeError) as exc:  # too long a name; a loop of symbolic links
        raise error(f'cannot import "{shown}": {getattr(exc, "strerror", None) or exc}',
                    stmt.span, hint="check the path; paths are relative to the importing "
                    "script's folder") from None
    if path in chain:
        cycle = " -> ".join(p.name for p in chain[chain.index(path):] + (path,))
        raise error(f"import cycle: {cycle}", stmt.span,
                    hint="move the shared definitions into a file that imports neither")
    if not found:
        where = str(path) if len(str(path)) <= 200 else f"{str(path)[:180]}..."
        raise error(f'cannot import "{shown}": no such file ({where})', stmt.span,
                    hint="paths are relative to the importing script's folder")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f'cannot import "{stmt.path}": it is not UTF-8 text', stmt.span,
                    hint="save the file as UTF-8") from None
    except OSError as exc:
        raise error(f'cannot import "{stmt.path}": {exc.strerror}', stmt.span) from None
    imported = parse(text, _display_name(path), path)
    _collect(imported, scope, settings, outputs, chain)


def _display_name(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _define(scope: Scope, name: str, stmt: ast.Stmt, span: Span) -> None:
    if name in CONTEXT_NAMES or name in BUILTINS or name in PRIMITIVES:
        raise error(f'"{name}" is a built-in name and cannot be redefined', span,
                    hint="choose another name")
    if scope.defines(name):
        first = scope.bindings.get(name) or scope.functions.get(name)
        raise error(f'"{name}" is already defined', span,
                    hint="names are bound once; choose another name",
                    notes=[f"first defined at {first.span}"])
    if isinstance(stmt, ast.FnDef):
        scope.functions[name] = stmt
    else:
        scope.bindings[name] = stmt


def _check_setting(stmt: ast.Set, settings: dict[str, ast.Set]) -> None:
    if stmt.key not in SETTINGS:
        raise error(f'unknown setting "{stmt.key}"', stmt.span,
                    hint=did_you_mean(stmt.key, SETTINGS)
                    or f"settings are: {', '.join(sorted(SETTINGS))}")
    if stmt.key in settings:
        raise error(f'"{stmt.key}" is already set', stmt.span,
                    notes=[f"first set at {settings[stmt.key].span}"])
    settings[stmt.key] = stmt


class _Checker:
    """Walks expressions: every name exists, every call matches its callee."""

    def __init__(self, scope: Scope):
        self.scope = scope

    def check_scope(self, scope: Scope) -> None:
        for stmt in scope.bindings.values():
            self.expr(stmt.value, frozenset())
        for fn in scope.functions.values():
            self.function(fn)

    def function(self, fn: ast.FnDef) -> None:
        seen: set[str] = set()
        rest_seen = False
        for param in fn.params:
            if param.name in seen:
                raise error(f'parameter "{param.name}" appears twice', param.span)
            if rest_seen and param.default is None and not param.rest:
                raise error(f'parameter "{param.name}" after *{rest_name(fn)} needs a default',
                            param.span, hint="give it a default; it can only be passed by keyword")
            if param.rest and rest_seen:
                raise error("a function has at most one *parameter", param.span)
            rest_seen = rest_seen or param.rest
            seen.add(param.name)
            if param.default is not None:
                self.expr(param.default, frozenset())
        local = frozenset(seen)
        for stmt in fn.body:
            # a block may rebind its own locals step by step (LANGUAGE.md §2), not parameters
            if stmt.name in seen:
                raise error(f'"{stmt.name}" is a parameter of {fn.name}() and cannot be '
                            "rebound", stmt.span, hint="give the new value another name")
            self.expr(stmt.value, local)
            local = local | {stmt.name}
        self.expr(fn.result, local)

    def expr(self, node: ast.Expr, local: frozenset[str]) -> None:
        """Check an expression, parts in source order, on a stack of its own (an
        expression may nest thousands deep: a sum of 400 models)."""
        stack: list[tuple[ast.Expr, bool]] = [(node, False)]
        while stack:
            node, after_args = stack.pop()
            if after_args:  # a call, once its arguments are checked
                self.call(node, local)
            elif isinstance(node, ast.Name):
                self.name(node, local)
            elif isinstance(node, ast.Call):
                if not isinstance(node.func, ast.Name):
                    raise error("only named functions can be called", node.func.span)
                stack.append((node, True))
                stack.extend((e, False) for e in reversed([*node.args,
                                                            *(k.value for k in node.kwargs)]))
            elif isinstance(node, ast.ListExpr):
                stack.extend((e, False) for e in reversed(node.items))
            elif isinstance(node, ast.Unary):
                stack.append((node.operand, False))
            elif isinstance(node, ast.Binary):
                stack.extend([(node.right, False), (node.left, False)])
            elif isinstance(node, ast.Cond):
                stack.extend([(node.orelse, False), (node.then, False), (node.test, False)])
            elif isinstance(node, (ast.Index, ast.Slice)):
                if not (isinstance(node.value, ast.Attr) and node.value.name == "layers"):
                    raise error("only a model's layers can be indexed", node.span,
                                hint="e.g. a.layers[0:24] or a.layers[3]")
                bounds = [node.index] if isinstance(node, ast.Index) else [node.start,
                                                                           node.stop]
                parts = [node.value, *(b for b in bounds if b is not None)]
                stack.extend((e, False) for e in reversed(parts))
            elif isinstance(node, ast.Attr):
                if node.name != "layers":
                    raise error(f'unknown attribute ".{node.name}"', node.span,
                                hint="a model has one attribute, `.layers` (e.g. "
                                     "a.layers[0:24])")
                stack.append((node.value, False))

    def name(self, node: ast.Name, local: frozenset[str]) -> None:
        if node.id in local or node.id in CONTEXT_NAMES or self.scope.all_names() & {node.id}:
            if self.scope.lookup_function(node.id) and node.id not in local:
                raise error(f'"{node.id}" is a function; call it with ( )', node.span)
            return
        if node.id in BUILTINS or node.id in PRIMITIVES:
            raise error(f'"{node.id}" is a function; call it with ( )', node.span)
        candidates = local | CONTEXT_NAMES | self.scope.all_names()
        raise error(f'unknown name "{node.id}"', node.span,
                    hint=did_you_mean(node.id, candidates)
                    or "define it first, e.g. `x = model(\"path\")`")

    def call(self, node: ast.Call, local: frozenset[str]) -> None:
        """A call's own checks (`expr` has checked its arguments)."""
        name = node.func.id
        sig = self.signature(name, node, local)
        check_call(sig, node)
        if name == "model" and node.args and isinstance(node.args[0], ast.String):
            check_path(node.args[0].value, node.args[0].span)  # a built-in: never redefined

    def signature(self, name: str, node: ast.Call, local: frozenset[str]) -> Signature:
        found = None if name in local else self.scope.lookup_function(name)
        if found is not None:
            return signature_of_fn(found[0])
        if name in BUILTINS:
            return BUILTINS[name].signature
        if name in PRIMITIVES:
            return Signature.of_primitive(PRIMITIVES[name])
        functions = set(BUILTINS) | set(PRIMITIVES)
        scope: Scope | None = self.scope
        while scope is not None:
            functions |= scope.functions.keys()
            scope = scope.parent
        what = "is not a function" if name in local or name in self.scope.all_names() \
            else "is not defined"
        raise error(f'unknown function "{name}": it {what}', node.func.span,
                    hint=did_you_mean(name, functions))


def rest_name(fn: ast.FnDef) -> str:
    return next(p.name for p in fn.params if p.rest)


def check_call(sig: Signature, node: ast.Call) -> None:
    """Arity and keywords of one call against a signature."""
    named = [p for p in sig.params if not p.rest]
    has_rest = any(p.rest for p in sig.params)
    positional_slots = [p for p in sig.params if not p.rest and not p.keyword_only]
    if len(node.args) > len(positional_slots) and not has_rest:
        raise error(f"{sig.name}() takes {_count(len(positional_slots), 'positional argument')}"
                    f" but {len(node.args)} were given", node.args[len(positional_slots)].span,
                    hint=f"{sig.name}({sig.describe()})")
    filled = {p.name for p in positional_slots[:len(node.args)]}
    seen: set[str] = set()
    for kw in node.kwargs:
        param = next((p for p in named if p.name == kw.name), None)
        if param is None:
            raise error(f'{sig.name}() has no parameter "{kw.name}"', kw.span,
                        hint=did_you_mean(kw.name, [p.name for p in named])
                        or f"{sig.name}({sig.describe()})")
        if kw.name in seen or kw.name in filled:
            raise error(f'"{kw.name}" is given twice in this call to {sig.name}()', kw.span)
        seen.add(kw.name)
    missing = [p.name for p in named if p.required and p.name not in filled | seen]
    if missing:
        raise error(f"{sig.name}() is missing {_count(len(missing), 'argument')}: "
                    + ", ".join(missing), node.span, hint=f"{sig.name}({sig.describe()})")
    if has_rest and sig.rest_min and len(node.args) < sig.rest_min:
        raise error(f"{sig.name}() needs at least {sig.rest_min} positional arguments",
                    node.span, hint=f"{sig.name}({sig.describe()})")


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


__all__ = ["Resolved", "Scope", "resolve", "stdlib_scope", "check_call", "MergeError"]
