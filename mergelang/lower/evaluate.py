"""Lower: the resolved program -> one IR expression for the output.

Lowering is evaluation at compile time. Numbers, strings, booleans and lists are
ordinary Python values and fold as they meet; functions are inlined by evaluating
their bodies with the arguments bound; whatever depends on tensors (or on the
per-tensor names `name`, `layer`, `depth`, ...) becomes an interned `ir.Node`.

Lists exist only here: `[1.0, 0.7] * [d1, d2]` becomes two products, `sum(...)` a
chain of additions, and a primitive given a list where it takes one tensor is applied
to each element. The IR that leaves this stage has tensors and per-tensor scalars only.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import ast, ir
from .builtins import CONTEXT_NAMES, DTYPES
from .diagnostics import MergeError, Span, error
from .ir import SCALAR, TENSOR, Node
from .ops import PRIMITIVES, REQUIRED, Primitive
from .resolve import Resolved, Scope

Value = Any  # int | float | bool | str | None | tuple[Value, ...] | Node

_MAX_INLINE_DEPTH = 64
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class ModelRef:
    """A model as the script names it: the path as written, and where."""

    written: str
    span: Span


@dataclass
class Lowered:
    """What the back end needs: the output expression and the facts around it."""

    output: Node | None
    models: dict[str, ModelRef]         # model key (resolved path) -> how it was first named
    donor: str | None                   # model key whose config/tokenizer are copied
    seed: int = 0
    dtype: str = "float32"
    out_dtype: str | None = None
    setting_spans: dict[str, Span] = field(default_factory=dict)


@dataclass
class _Frame:
    """One inlined call: its locals, its lexical scope, and where it was called from."""

    scope: Scope
    locals: dict[str, Value]
    call: ast.Call | None = None
    fn: ast.FnDef | None = None
    arg_exprs: dict[str, ast.Expr] = field(default_factory=dict)
    parent: _Frame | None = None


def lower(resolved: Resolved, externals: dict[str, Value] | None = None) -> Lowered:
    """Evaluate the script at compile time. Raises MergeError.

    `externals` gives values to the names the embedding program binds (see resolve)."""
    return _Lowerer(resolved, externals or {}).run()


def lower_session(resolved: Resolved, expr: ast.Expr | None) -> tuple[Value, dict[str, ModelRef]]:
    """For the REPL: lower every binding of the script and then `expr` in its scope.
    Returns expr's value (a constant, a per-tensor scalar or a tensor node) and every
    model the script names."""
    lowerer = _Lowerer(resolved, {})
    top = _Frame(resolved.scope, {})
    for name, stmt in resolved.scope.bindings.items():
        lowerer.eval(ast.Name(stmt.span, name), top)
    value = lowerer.eval(expr, top) if expr is not None else None
    return value, lowerer.models


class _Lowerer:
    def __init__(self, resolved: Resolved, externals: dict[str, Value]):
        self.resolved = resolved
        self.globals: dict[str, Value] = dict(externals)
        self.in_progress: list[str] = []
        self.models: dict[str, ModelRef] = {}

    def run(self) -> Lowered:
        top = _Frame(self.resolved.scope, {})
        out = None
        if self.resolved.output is not None:
            value = self.eval(self.resolved.output.value, top)
            if not (isinstance(value, Node) and value.kind == TENSOR):
                raise error(f"`output` must be a model expression, not {_describe(value)}",
                            self.resolved.output.value.span,
                            hint="e.g. `output base + ties(a - base, b - base)`")
            out = value
        lowered = Lowered(out, {}, None)
        for key, stmt in self.resolved.settings.items():
            self._setting(lowered, key, stmt, top)
        lowered.models = self.models
        if lowered.donor is None and out is not None:
            lowered.donor = next((n.attr for n in ir.walk(out) if n.op == "model"), None)
        return lowered

    # settings

    def _setting(self, lowered: Lowered, key: str, stmt: ast.Set, top: _Frame) -> None:
        value = self.eval(stmt.value, top)
        lowered.setting_spans[key] = stmt.value.span
        if key in ("dtype", "out_dtype"):
            if value not in DTYPES:
                raise error(f"{key} must be one of {', '.join(DTYPES)}, not {_describe(value)}",
                            stmt.value.span, hint=f'e.g. set {key} = "bfloat16"')
            setattr(lowered, key, value)
        elif key == "seed":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise error(f"seed must be a non-negative integer, not {_describe(value)}",
                            stmt.value.span, hint="e.g. set seed = 42")
            lowered.seed = value
        elif key == "donor":
            if not (isinstance(value, Node) and value.op == "model"):
                raise error(f"donor must name a model, not {_describe(value)}", stmt.value.span,
                            hint='e.g. base = model("models/base") then set donor = base')
            lowered.donor = value.attr

    # expressions

    def eval(self, node: ast.Expr, frame: _Frame) -> Value:
        method = getattr(self, "_" + type(node).__name__)
        return method(node, frame)

    def _Number(self, node: ast.Number, frame: _Frame) -> Value:
        return node.value

    def _String(self, node: ast.String, frame: _Frame) -> Value:
        return node.value

    def _Bool(self, node: ast.Bool, frame: _Frame) -> Value:
        return node.value

    def _NoneLit(self, node: ast.NoneLit, frame: _Frame) -> Value:
        return None

    def _ListExpr(self, node: ast.ListExpr, frame: _Frame) -> Value:
        return tuple(self.eval(item, frame) for item in node.items)

    def _Name(self, node: ast.Name, frame: _Frame) -> Value:
        if node.id in frame.locals:
            return frame.locals[node.id]
        if node.id in CONTEXT_NAMES:
            return Node.make("ctx", (), node.id, SCALAR, node.span)
        return self._global(node, frame.scope)

    def _global(self, node: ast.Name, scope: Scope) -> Value:
        if node.id in self.globals:
            return self.globals[node.id]
        owner: Scope | None = scope
        while owner is not None and node.id not in owner.bindings:
            owner = owner.parent
        if owner is None:  # resolve guarantees this cannot happen
            raise error(f'unknown name "{node.id}"', node.span)
        if node.id in self.in_progress:
            cycle = " -> ".join(self.in_progress[self.in_progress.index(node.id):] + [node.id])
            raise error(f"definition refers to itself: {cycle}", node.span)
        self.in_progress.append(node.id)
        value = self.eval(owner.bindings[node.id].value, _Frame(owner, {}))
        self.in_progress.pop()
        self.globals[node.id] = value
        return value

    def _Unary(self, node: ast.Unary, frame: _Frame) -> Value:
        value = self.eval(node.operand, frame)
        if node.op == "-":
            return _map1(value, lambda v: self._negate(v, node))
        return _map1(value, lambda v: self._not(v, node))

    def _negate(self, v: Value, node: ast.Unary) -> Value:
        if _is_number(v):
            return -v
        if isinstance(v, Node):
            return Node.make("neg", (v,), None, v.kind, node.span)
        raise error(f"cannot negate {_describe(v)}", node.span)

    def _not(self, v: Value, node: ast.Unary) -> Value:
        if isinstance(v, bool):
            return not v
        if isinstance(v, Node) and v.kind == SCALAR:
            return Node.make("not", (v,), None, SCALAR, node.span)
        raise error(f"`not` needs true or false, not {_describe(v)}", node.span)

    def _Binary(self, node: ast.Binary, frame: _Frame) -> Value:
        left = self.eval(node.left, frame)
        if node.op in ("and", "or") and isinstance(left, bool):
            if left == (node.op == "or"):
                return left
            right = self.eval(node.right, frame)
            return self._logical(node, left, right)
        right = self.eval(node.right, frame)
        return _broadcast2(left, right, node, lambda a, b: self._binary(node, a, b))

    def _binary(self, node: ast.Binary, a: Value, b: Value) -> Value:
        op = node.op
        if op in ("and", "or"):
            return self._logical(node, a, b)
        if op == "|":
            if isinstance(a, Node) and isinstance(b, Node) and a.kind == b.kind == TENSOR:
                return Node.make("fallback", (a, b), None, TENSOR, node.span)
            raise error(f"`|` chooses between models, not {_describe(a)} and {_describe(b)}",
                        node.span, hint="`a | b` is a's tensor where a has it, else b's")
        if op == "~":
            if not (isinstance(b, str)):
                raise error(f"the right side of `~` must be a regular expression string, "
                            f"not {_describe(b)}", node.right.span)
            try:
                re.compile(b)
            except re.error as exc:
                raise error(f"bad regular expression: {exc}", node.right.span) from None
            if isinstance(a, str):
                return re.search(b, a) is not None
            if isinstance(a, Node) and a.kind == SCALAR:
                return Node.make("match", (a, ir.const(b)), None, SCALAR, node.span)
            raise error(f"`~` matches a string such as `name`, not {_describe(a)}", node.span)
        if op in _COMPARE:
            if isinstance(a, Node) or isinstance(b, Node):
                if _is_tensor(a) or _is_tensor(b):
                    raise error("comparisons work on numbers and names, not tensors",
                                node.span, hint="compare `layer`, `depth`, `name` or numbers")
                return Node.make("compare", (_as_node(a), _as_node(b)), op, SCALAR, node.span)
            try:
                return _COMPARE[op](a, b)
            except TypeError:
                raise error(f"cannot compare {_describe(a)} with {_describe(b)}",
                            node.span) from None
        return self._arithmetic(op, a, b, node.span)

    def _arithmetic(self, op: str, a: Value, b: Value, span: Span) -> Value:
        if op == "/" and _is_number(b) and b == 0:
            raise error("division by zero", span, hint="weights that sum to zero cannot be "
                        "normalized; pass normalize=false or change the weights")
        if _is_number(a) and _is_number(b):
            return _ARITHMETIC[op](a, b)
        if op == "+" and isinstance(a, str) and isinstance(b, str):
            return a + b
        for v in (a, b):
            if not (_is_number(v) or isinstance(v, Node)):
                raise error(f"cannot use {_describe(v)} in arithmetic (`{op}`)", span)
        kind = TENSOR if _is_tensor(a) or _is_tensor(b) else SCALAR
        return Node.make(op, (_as_node(a), _as_node(b)), None, kind, span)

    def _logical(self, node: ast.Binary, a: Value, b: Value) -> Value:
        for v in (a, b):
            if not (isinstance(v, bool) or (isinstance(v, Node) and v.kind == SCALAR)):
                raise error(f"`{node.op}` needs true or false, not {_describe(v)}", node.span)
        if isinstance(a, bool) and isinstance(b, bool):
            return (a and b) if node.op == "and" else (a or b)
        if isinstance(a, bool):  # a did not decide it (see _Binary), so b does
            return b
        return Node.make(node.op, (a, _as_node(b)), None, SCALAR, node.span)

    def _Cond(self, node: ast.Cond, frame: _Frame) -> Value:
        test = self.eval(node.test, frame)
        if isinstance(test, bool):
            return self.eval(node.then if test else node.orelse, frame)
        if not (isinstance(test, Node) and test.kind == SCALAR):
            raise error(f"an `if` condition must be true or false, not {_describe(test)}",
                        node.test.span, hint="conditions may use `name`, `layer`, `depth`, "
                        "numbers and settings; they are decided before tensors are loaded")
        then, orelse = self.eval(node.then, frame), self.eval(node.orelse, frame)
        return _broadcast2(then, orelse, node,
                           lambda a, b: self._cond_node(test, a, b, node), same_length=True)

    def _cond_node(self, test: Node, a: Value, b: Value, node: ast.Cond) -> Value:
        if not ((_is_number(a) or isinstance(a, (Node, str, bool)) or a is None)
                and (_is_number(b) or isinstance(b, (Node, str, bool)) or b is None)):
            raise error("`if` branches must be values", node.span)
        kind = TENSOR if _is_tensor(a) or _is_tensor(b) else SCALAR
        if kind == TENSOR and not (_is_tensor(a) and _is_tensor(b)):
            raise error("one branch of this `if` is a model and the other is not", node.span,
                        hint="both branches must give a model (e.g. `if ... then a else b`)")
        return Node.make("cond", (test, _as_node(a), _as_node(b)), None, kind, node.span)

    def _Attr(self, node: ast.Attr, frame: _Frame) -> Value:
        """`x.layers`: all of x's layers, as a slice (resolve allows no other attribute)."""
        value = self.eval(node.value, frame)
        if not _is_tensor(value):
            raise error(f"`.layers` is a model's, not {_describe(value)}'s", node.span)
        return Node.make("layers", (value,), (0, None), TENSOR, node.span)

    def _Index(self, node: ast.Index, frame: _Frame) -> Value:
        """`x.layers[i]`: one layer."""
        index = self._layer_bound(node.index, frame)
        return self._layers(node, frame, index, index + 1)

    def _Slice(self, node: ast.Slice, frame: _Frame) -> Value:
        """`x.layers[i:j]`: layers i to j - 1 (j omitted: to the last)."""
        start = self._layer_bound(node.start, frame) if node.start is not None else 0
        stop = self._layer_bound(node.stop, frame) if node.stop is not None else None
        if stop is not None and stop <= start:
            raise error(f"the layer range {start}:{stop} is empty", node.span,
                        hint="write a.layers[start:stop] with start < stop")
        return self._layers(node, frame, start, stop)

    def _layers(self, node, frame: _Frame, start: int, stop: int | None) -> Node:
        model = self.eval(node.value, frame)  # a `layers` node, from _Attr
        return Node.make("layers", model.args, (start, stop), TENSOR, node.span)

    def _layer_bound(self, expr: ast.Expr, frame: _Frame) -> int:
        value = self.eval(expr, frame)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise error(f"a layer index is a whole number >= 0, not {_describe(value)}",
                        expr.span)
        return value

    # calls

    def _Call(self, node: ast.Call, frame: _Frame) -> Value:
        assert isinstance(node.func, ast.Name)
        name = node.func.id
        found = frame.scope.lookup_function(name)
        if found is not None:
            return self._inline(found[0], found[1], node, frame)
        args = [self.eval(a, frame) for a in node.args]
        kwargs = {kw.name: self.eval(kw.value, frame) for kw in node.kwargs}
        if name in PRIMITIVES:
            return self._primitive(PRIMITIVES[name], node, args, kwargs, frame)
        return getattr(self, "_builtin_" + name)(node, frame, *args, **kwargs)

    def _inline(self, fn: ast.FnDef, scope: Scope, node: ast.Call, caller: _Frame) -> Value:
        depth, f = 0, caller
        while f is not None:
            depth, f = depth + 1, f.parent
        if depth > _MAX_INLINE_DEPTH:
            raise error(f"{fn.name}() calls itself without end: functions are inlined, so "
                        "recursion is not supported", node.span,
                        hint="write the repetition out, or use a list and sum()")
        frame = _Frame(scope, {}, node, fn, parent=caller)
        params = [p for p in fn.params if not p.rest]
        positional = [p for p in fn.params if not p.rest and not _after_rest(fn, p)]
        rest = next((p for p in fn.params if p.rest), None)
        args = list(node.args)
        for param, arg in zip(positional, args, strict=False):
            frame.locals[param.name] = self.eval(arg, caller)
            frame.arg_exprs[param.name] = arg
        if rest is not None:
            extra = args[len(positional):]
            frame.locals[rest.name] = tuple(self.eval(a, caller) for a in extra)
        for kw in node.kwargs:
            frame.locals[kw.name] = self.eval(kw.value, caller)
            frame.arg_exprs[kw.name] = kw.value
        for param in params:
            if param.name not in frame.locals:
                frame.locals[param.name] = self.eval(param.default, _Frame(scope, {}))
        try:
            for stmt in fn.body:
                frame.locals[stmt.name] = self.eval(stmt.value, frame)
            return self.eval(fn.result, frame)
        except MergeError as exc:
            raise _repoint(exc, node, fn) from None

    def _primitive(self, prim: Primitive, node: ast.Call, args: list, kwargs: dict,
                   frame: _Frame) -> Value:
        exprs: dict[str, ast.Expr] = {}
        values: dict[str, Value] = {}
        for param, value, expr in zip(prim.params, args, node.args, strict=False):
            values[param.name], exprs[param.name] = value, expr
        for kw in node.kwargs:
            values[kw.name], exprs[kw.name] = kwargs[kw.name], kw.value
        for param in prim.params:
            values.setdefault(param.name, param.default)
        first = prim.params[0]
        if prim.maps and first.kind == "tensor" and isinstance(values[first.name], tuple):
            items = values[first.name]
            calls = []
            for i, item in enumerate(items):
                one = dict(values)
                one[first.name] = item
                for p in prim.params[1:]:
                    if isinstance(values[p.name], tuple) and p.kind != "tensors":
                        if len(values[p.name]) != len(items):
                            raise error(f"{p.name} has {len(values[p.name])} values but "
                                            f"{first.name} has {len(items)}",
                                            self.user_span(exprs.get(p.name), node, frame),
                                            hint="give one value per element, or one "
                                            "value for all")
                        one[p.name] = values[p.name][i]
                calls.append(self._primitive_node(prim, one, exprs, node, frame, f"#{i}"))
            return tuple(calls)
        return self._primitive_node(prim, values, exprs, node, frame, "")

    def _primitive_node(self, prim: Primitive, values: dict, exprs: dict, node: ast.Call,
                        frame: _Frame, suffix: str) -> Node:
        args = []
        for param in prim.params:
            value = values[param.name]
            where = self.user_span(exprs.get(param.name), node, frame)
            args.append(self._check_argument(prim, param, value, where, frame))
        kind = TENSOR
        # random draws and reductions that may span the model are keyed by the call site
        keyed = prim.random or prim.reduction is not None
        site = self.call_site(node, frame) + suffix if keyed else None
        return Node.make("prim", tuple(args), (prim.name, site), kind, node.span)

    def _check_argument(self, prim: Primitive, param, value: Value, where: Span,
                        frame: _Frame) -> Node:
        def bad(what: str, hint: str | None = None) -> MergeError:
            caller = _user_facing_call(frame) or prim.name
            return error(f"{caller}(): {param.name} {what}, not {_describe(value)}",
                         where, hint=hint)
        if value is REQUIRED:
            raise bad("is required")
        if param.kind == "tensor":
            if not _is_tensor(value):
                raise bad("must be a tensor (a model expression)")
            return value
        if param.kind == "tensors":
            if not (isinstance(value, tuple) and value and all(_is_tensor(v) for v in value)):
                raise bad("must be a non-empty list of tensors")
            return Node.make("list", value, None, TENSOR)
        if param.kind == "number":
            if isinstance(value, Node) and value.kind == SCALAR:
                lo, hi = param.range or (None, None)
                return Node.make("check_range", (value,), (param.name, lo, hi), SCALAR, where)
            if not _is_number(value):
                raise bad("must be a number")
            if param.range and not param.range[0] <= value <= param.range[1]:
                lo, hi = param.range
                raise bad(f"must be in [{lo:g}, {hi:g}]",
                          hint=f"{param.name}={min(max(value, lo), hi):g} is the nearest value")
            return ir.const(float(value))
        if param.kind == "string":
            if not isinstance(value, str) or (param.choices and value not in param.choices):
                choices = ", ".join(f'"{c}"' for c in param.choices or ())
                raise bad(f"must be one of {choices}")
            return ir.const(value)
        raise AssertionError(param.kind)

    # built-ins

    def _builtin_model(self, node: ast.Call, frame: _Frame, path: Value) -> Value:
        if not isinstance(path, str):
            raise error(f"model() takes a path string, not {_describe(path)}", node.args[0].span,
                        hint='e.g. model("models/base")')
        source_path = node.span.source.path
        base = source_path.parent if source_path is not None else Path.cwd()
        key = str((base / path).resolve())
        self.models.setdefault(key, ModelRef(path, node.args[0].span))
        return Node.make("model", (), key, TENSOR, node.span)

    def _builtin_sum(self, node: ast.Call, frame: _Frame, xs: Value) -> Value:
        if not isinstance(xs, tuple) or not xs:
            raise error(f"sum() takes a non-empty list, not {_describe(xs)}",
                            self.user_span(node.args[0], node, frame))
        total = xs[0]
        for x in xs[1:]:
            total = _broadcast2(total, x, node,
                                lambda a, b: self._arithmetic("+", a, b, node.span))
        return total

    def _builtin_broadcast(self, node: ast.Call, frame: _Frame, x: Value, like: Value) -> Value:
        if not isinstance(like, tuple):
            raise error(f"broadcast(): `like` must be a list, not {_describe(like)}",
                            self.user_span(node.args[1], node, frame))
        if not isinstance(x, tuple):
            return (x,) * len(like)
        if len(x) != len(like):
            xname, likename = (self._arg_name(e, frame) for e in node.args[:2])
            raise error(f"{xname} has {len(x)} values but there are {len(like)} {likename}",
                            self.user_span(node.args[0], node, frame),
                            hint=f"give one value per element of {likename}, or a single value")
        return x

    def _builtin_len(self, node: ast.Call, frame: _Frame, xs: Value) -> Value:
        if not isinstance(xs, tuple):
            raise error(f"len() takes a list, not {_describe(xs)}",
                            self.user_span(node.args[0], node, frame))
        return len(xs)

    def _builtin_stack(self, node: ast.Call, frame: _Frame, *slices: Value) -> Value:
        for value, expr in zip(slices, node.args, strict=True):
            if not (_is_tensor(value) and _is_sliced(value)):
                raise error(f"stack() takes layer slices such as a.layers[0:8], not "
                            f"{_describe(value) if not _is_tensor(value) else 'a whole model'}",
                            self.user_span(expr, node, frame),
                            hint="slice every model you stack: a.layers[0:24]")
        return Node.make("stack", tuple(slices), None, TENSOR, node.span)

    def _builtin_gradient(self, node: ast.Call, frame: _Frame, values: Value) -> Value:
        if not (isinstance(values, tuple) and values and all(_is_number(v) for v in values)):
            raise error(f"gradient() takes a list of numbers, not {_describe(values)}",
                            self.user_span(node.args[0], node, frame),
                            hint="e.g. gradient([0, 0.5, 1])")
        depth = Node.make("ctx", (), "depth", SCALAR)
        return Node.make("gradient", (depth,), tuple(float(v) for v in values), SCALAR, node.span)

    # where errors point

    def user_span(self, expr: ast.Expr | None, node: ast.Call, frame: _Frame) -> Span:
        """The span in user code that best explains a value: follows a parameter name
        back through inlined calls to the argument that supplied it."""
        f: _Frame | None = frame
        while expr is not None and f is not None and f.fn is not None:
            if isinstance(expr, ast.Name) and expr.id in f.arg_exprs:
                expr = f.arg_exprs[expr.id]
                f = f.parent
            else:
                break
        span = expr.span if expr is not None else node.span
        return span

    def _arg_name(self, expr: ast.Expr, frame: _Frame) -> str:
        return f"`{expr.id}`" if isinstance(expr, ast.Name) else "the list"

    def call_site(self, node: ast.Call, frame: _Frame) -> str:
        """A stable identity for one call of a random primitive: the chain of calls
        (file name, line, column) that inlined it, outermost first."""
        spans = [node.span]
        f: _Frame | None = frame
        while f is not None:
            if f.call is not None:
                spans.append(f.call.span)
            f = f.parent
        return ">".join(f"{Path(s.file).name}:{s.line}:{s.col}" for s in reversed(spans))


def _repoint(exc: MergeError, call: ast.Call, fn: ast.FnDef) -> MergeError:
    """Errors inside the standard library are reported at the user's call that led
    there, with a note saying where in the library it happened."""
    if _is_stdlib(call.span):
        return exc
    diagnostics = [
        replace(d, span=call.span, notes=d.notes + (f"in {fn.name}() at {d.span}",))
        if d.span is not None and _is_stdlib(d.span) else d
        for d in exc.diagnostics
    ]
    return MergeError(diagnostics)


def _user_facing_call(frame: _Frame) -> str | None:
    """The function the user called that led to this frame (e.g. `ties` for a `trim`)."""
    name = None
    f: _Frame | None = frame
    while f is not None:
        if f.call is not None and not _is_stdlib(f.call.span):
            name = f.fn.name
        f = f.parent
    return name


def _is_sliced(node: Node) -> bool:
    """Every model in this tensor expression is seen through a layer slice."""
    if node.op in ("layers", "stack"):
        return True
    tensors = [a for a in node.args if a.kind == TENSOR]
    return bool(tensors) and node.op != "model" and all(_is_sliced(a) for a in tensors)


def _after_rest(fn: ast.FnDef, param: ast.Param) -> bool:
    seen_rest = False
    for p in fn.params:
        if p is param:
            return seen_rest
        seen_rest = seen_rest or p.rest
    return False


def _is_stdlib(span: Span) -> bool:
    return span.file.startswith("stdlib/")


def _is_number(v: Value) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_tensor(v: Value) -> bool:
    return isinstance(v, Node) and v.kind == TENSOR


def _as_node(v: Value) -> Node:
    return v if isinstance(v, Node) else ir.const(v)


def _map1(value: Value, fn) -> Value:
    if isinstance(value, tuple):
        return tuple(_map1(v, fn) for v in value)
    return fn(value)


def _broadcast2(a: Value, b: Value, node, fn, same_length: bool = False) -> Value:
    """Apply fn elementwise over lists: list-list pairs up, list-value repeats the value."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) != len(b):
            raise error(f"lists of different lengths: {len(a)} and {len(b)}", node.span,
                        hint="give lists with one entry per model")
        return tuple(_broadcast2(x, y, node, fn, same_length) for x, y in zip(a, b, strict=True))
    if same_length and (isinstance(a, tuple) or isinstance(b, tuple)):
        raise error("one branch of this `if` is a list and the other is not", node.span)
    if isinstance(a, tuple):
        return tuple(_broadcast2(x, b, node, fn) for x in a)
    if isinstance(b, tuple):
        return tuple(_broadcast2(a, y, node, fn) for y in b)
    return fn(a, b)


def _describe(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, str):
        return f'the string "{v}"'
    if _is_number(v):
        return f"the number {v:g}" if isinstance(v, float) else f"the number {v}"
    if isinstance(v, tuple):
        return f"a list of {len(v)}"
    if isinstance(v, Node):
        return "a tensor" if v.kind == TENSOR else "a per-tensor value"
    if v is REQUIRED:
        return "missing"
    return type(v).__name__
