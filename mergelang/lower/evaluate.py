"""The evaluator at the heart of lowering: expressions, names, inlined calls, and where
errors point.

`Lowerer.eval` evaluates one AST expression to a compile-time value (see values.py).
Calls go to an inlined `fn`, a primitive (calls.py checks and maps its arguments) or a
built-in (calls.py). Every node is made by the program's `ir.Builder`.

The evaluation does not recurse in Python: a method that needs a sub-expression's value
is a generator that yields `(expression, frame)` and is sent the value back, and `eval`
runs them on a stack of its own. A sum of 400 models, 400 bindings each using the one
before, or 500 nested operators are then as easy as 5; beyond MAX_DEPTH levels the
expression is a located diagnostic, never Python's RecursionError.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import GeneratorType

from .. import ast, matching
from ..builtins import CONTEXT_NAMES
from ..diagnostics import MergeError, Span, error, in_stdlib, move_to_script
from ..ir import SCALAR, TENSOR, Builder, Node, Op
from ..ops import PRIMITIVES
from ..resolve import Resolved, Scope
from . import calls
from .inline import CallSites, depth, value_key
from .values import ModelRef, Value, broadcast2, describe, is_number, is_tensor, map1

_MAX_INLINE_DEPTH = 64
_UNSEEN = object()
MAX_DEPTH = 20_000
"""The deepest evaluation (sub-expressions, bindings and inlined calls, each a level)."""
_ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_ARITHMETIC_OPS = {"+": Op.ADD, "-": Op.SUB, "*": Op.MUL, "/": Op.DIV}
_UNARY = {ast.NEGATE: "_negate", ast.NOT: "_not"}
_LOGICAL = {"and": Op.AND, "or": Op.OR}
_DECIDES = {"and": False, "or": True}  # a left operand equal to this decides alone
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}


@dataclass
class Frame:
    """One inlined call: its locals, its lexical scope, and where it was called from."""

    scope: Scope
    locals: dict[str, Value]
    call: ast.Call | None = None
    fn: ast.FnDef | None = None
    arg_exprs: dict[str, ast.Expr] = field(default_factory=dict)
    parent: Frame | None = None


class Lowerer:
    def __init__(self, resolved: Resolved, builder: Builder):
        self.resolved = resolved
        self.b = builder
        self.globals: dict[str, Value] = {}
        self.in_progress: list[str] = []
        self.models: dict[str, ModelRef] = {}
        self.inlined: dict[tuple, Value] = {}  # (function, scope, arguments) -> result
        self.call_sites = CallSites()

    def model_node(self, key: str, written: str, span: Span | None) -> Node:
        if span is not None:
            self.models.setdefault(key, ModelRef(written, span))
        return self.b.make(Op.MODEL, (), key, TENSOR, span)

    def as_node(self, v: Value) -> Node:
        return v if isinstance(v, Node) else self.b.const(v)

    # expressions

    def eval(self, node: ast.Expr, frame: Frame) -> Value:
        """The value of `node`; the evaluation's own stack stands in for recursion."""
        result = getattr(self, "_" + type(node).__name__)(node, frame)
        if not isinstance(result, GeneratorType):
            return result
        stack = [result]
        sent: Value = None
        failed: Exception | None = None
        while stack:
            try:
                if failed is not None:
                    request = stack[-1].throw(failed)  # into the caller, as recursion would
                    failed = None
                else:
                    request = stack[-1].send(sent)
            except StopIteration as done:
                stack.pop()
                sent = done.value
                continue
            except Exception as exc:  # noqa: BLE001 - handed to the caller below
                stack.pop()
                if not stack:
                    raise
                failed = exc
                continue
            expr, where = request
            try:
                result = getattr(self, "_" + type(expr).__name__)(expr, where)
            except Exception as exc:  # noqa: BLE001 - thrown into the generator that asked
                failed = exc
                continue
            if not isinstance(result, GeneratorType):
                sent = result
            elif len(stack) >= MAX_DEPTH:
                result.close()
                failed = error(f"expression nested too deeply ({len(stack) + depth(expr)} "
                               f"levels; the limit is {MAX_DEPTH})", expr.span,
                               hint="name the inner parts (x = ...), or sum a list with "
                                    "sum([...])")
            else:
                stack.append(result)
                sent = None
        return sent

    def _Number(self, node: ast.Number, frame: Frame) -> Value:
        return node.value

    def _String(self, node: ast.String, frame: Frame) -> Value:
        return node.value

    def _Bool(self, node: ast.Bool, frame: Frame) -> Value:
        return node.value

    def _NoneLit(self, node: ast.NoneLit, frame: Frame) -> Value:
        return None

    def _ListExpr(self, node: ast.ListExpr, frame: Frame) -> Value:
        items = []
        for item in node.items:
            items.append((yield item, frame))
        return tuple(items)

    def _Name(self, node: ast.Name, frame: Frame) -> Value:
        if node.id in frame.locals:
            return frame.locals[node.id]
        if node.id in CONTEXT_NAMES:
            return self.b.make(Op.CTX, (), node.id, SCALAR, node.span)
        if node.id in self.globals:
            return self.globals[node.id]
        return self._global(node, frame.scope)

    def _global(self, node: ast.Name, scope: Scope) -> Value:
        owner: Scope | None = scope
        while owner is not None and node.id not in owner.bindings:
            owner = owner.parent
        if owner is None:  # resolve guarantees this cannot happen
            raise error(f'unknown name "{node.id}"', node.span)
        if node.id in self.in_progress:
            cycle = " -> ".join(self.in_progress[self.in_progress.index(node.id):] + [node.id])
            raise error(f"definition refers to itself: {cycle}", node.span)
        self.in_progress.append(node.id)
        value = yield owner.bindings[node.id].value, Frame(owner, {})
        self.in_progress.pop()
        self.globals[node.id] = value
        return value

    def _Unary(self, node: ast.Unary, frame: Frame) -> Value:
        value = yield node.operand, frame
        apply = getattr(self, _UNARY[node.op])
        return map1(value, lambda v: apply(v, node))

    def _negate(self, v: Value, node: ast.Unary) -> Value:
        if is_number(v):
            return _in_int64(-v, node.span)
        if isinstance(v, Node):
            return self.b.make(Op.NEG, (v,), None, v.kind, node.span)
        raise error(f"cannot negate {describe(v)}", node.span)

    def _not(self, v: Value, node: ast.Unary) -> Value:
        if isinstance(v, bool):
            return not v
        if isinstance(v, Node) and v.kind == SCALAR:
            return self.b.make(Op.NOT, (v,), None, SCALAR, node.span)
        raise error(f"`not` needs true or false, not {describe(v)}", node.span)

    def _Binary(self, node: ast.Binary, frame: Frame) -> Value:
        left = yield node.left, frame
        if node.op in _LOGICAL and isinstance(left, bool):
            if left == _DECIDES[node.op]:
                return left
            right = yield node.right, frame
            return self._logical(node, left, right)
        right = yield node.right, frame
        return broadcast2(left, right, node, lambda a, b: self._binary(node, a, b))

    def _binary(self, node: ast.Binary, a: Value, b: Value) -> Value:
        op = node.op
        if op in _LOGICAL:
            return self._logical(node, a, b)
        if op in _SPECIAL:
            return _SPECIAL[op](self, node, a, b)
        if op in _COMPARE:
            if isinstance(a, Node) or isinstance(b, Node):
                if is_tensor(a) or is_tensor(b):
                    raise error("comparisons work on numbers and names, not tensors",
                                node.span, hint="compare `layer`, `depth`, `name` or numbers")
                return self.b.make(Op.COMPARE, (self.as_node(a), self.as_node(b)), op, SCALAR,
                                   node.span)
            try:
                return _COMPARE[op](a, b)
            except TypeError:
                raise error(f"cannot compare {describe(a)} with {describe(b)}",
                            node.span) from None
        return self.arithmetic(op, a, b, node.span)

    def _fallback(self, node: ast.Binary, a: Value, b: Value) -> Value:
        if is_tensor(a) and is_tensor(b):
            return self.b.make(Op.FALLBACK, (a, b), None, TENSOR, node.span)
        raise error(f"`|` chooses between models, not {describe(a)} and {describe(b)}",
                    node.span, hint="`a | b` is a's tensor where a has it, else b's")

    def _match(self, node: ast.Binary, a: Value, b: Value) -> Value:
        if not isinstance(b, str):
            raise error(f"the right side of `~` must be a regular expression string, "
                        f"not {describe(b)}", node.right.span)
        try:
            re.compile(b)
        except re.error as exc:
            raise error(f"bad regular expression: {exc}", node.right.span) from None
        if isinstance(a, str):
            return matching.search(b, a, node.span)
        if isinstance(a, Node) and a.kind == SCALAR:
            return self.b.make(Op.MATCH, (a, self.b.const(b)), None, SCALAR, node.span)
        raise error(f"`~` matches a string such as `name`, not {describe(a)}", node.span)

    def arithmetic(self, op: str, a: Value, b: Value, span: Span) -> Value:
        kind = _ARITHMETIC_OPS[op]
        if kind is Op.DIV and is_number(b) and b == 0:
            raise error("division by zero", span, hint="weights that sum to zero cannot be "
                        "normalized; pass normalize=false or change the weights")
        if is_number(a) and is_number(b):
            return _in_int64(_ARITHMETIC[op](a, b), span)
        if kind is Op.ADD and isinstance(a, str) and isinstance(b, str):
            return a + b
        for v in (a, b):
            if not (is_number(v) or isinstance(v, Node)):
                raise error(f"cannot use {describe(v)} in arithmetic (`{op}`)", span)
        return self.b.make(kind, (self.as_node(a), self.as_node(b)), span=span)

    def _logical(self, node: ast.Binary, a: Value, b: Value) -> Value:
        for v in (a, b):
            if not (isinstance(v, bool) or (isinstance(v, Node) and v.kind == SCALAR)):
                raise error(f"`{node.op}` needs true or false, not {describe(v)}", node.span)
        if isinstance(a, bool) and isinstance(b, bool):
            return (a and b) if _LOGICAL[node.op] is Op.AND else (a or b)
        if isinstance(a, bool):  # a did not decide it (see _Binary), so b does
            return b
        return self.b.make(_LOGICAL[node.op], (a, self.as_node(b)), None, SCALAR, node.span)

    def _Cond(self, node: ast.Cond, frame: Frame) -> Value:
        test = yield node.test, frame
        if isinstance(test, bool):
            return (yield node.then if test else node.orelse, frame)
        if not (isinstance(test, Node) and test.kind == SCALAR):
            raise error(f"an `if` condition must be true or false, not {describe(test)}",
                        node.test.span, hint="conditions may use `name`, `layer`, `depth`, "
                        "numbers and settings; they are decided before tensors are loaded")
        then = yield node.then, frame
        orelse = yield node.orelse, frame
        return broadcast2(then, orelse, node,
                          lambda a, b: self._cond_node(test, a, b, node), same_length=True)

    def _cond_node(self, test: Node, a: Value, b: Value, node: ast.Cond) -> Value:
        if not ((is_number(a) or isinstance(a, (Node, str, bool)) or a is None)
                and (is_number(b) or isinstance(b, (Node, str, bool)) or b is None)):
            raise error("`if` branches must be values", node.span)
        if (is_tensor(a) or is_tensor(b)) and not (is_tensor(a) and is_tensor(b)):
            raise error("one branch of this `if` is a model and the other is not", node.span,
                        hint="both branches must give a model (e.g. `if ... then a else b`)")
        return self.b.make(Op.COND, (test, self.as_node(a), self.as_node(b)), span=node.span)

    def _Attr(self, node: ast.Attr, frame: Frame) -> Value:
        """`x.layers`: all of x's layers, as a slice (resolve allows no other attribute)."""
        value = yield node.value, frame
        if not is_tensor(value):
            raise error(f"`.layers` is a model's, not {describe(value)}'s", node.span)
        return self.b.make(Op.LAYERS, (value,), (0, None), TENSOR, node.span)

    def _Index(self, node: ast.Index, frame: Frame) -> Value:
        """`x.layers[i]`: one layer."""
        index = yield from self._layer_bound(node.index, frame)
        return (yield from self._layers(node, frame, index, index + 1))

    def _Slice(self, node: ast.Slice, frame: Frame) -> Value:
        """`x.layers[i:j]`: layers i to j - 1 (j omitted: to the last)."""
        start = (yield from self._layer_bound(node.start, frame)) if node.start is not None \
            else 0
        stop = (yield from self._layer_bound(node.stop, frame)) if node.stop is not None \
            else None
        if stop is not None and stop <= start:
            raise error(f"the layer range {start}:{stop} is empty", node.span,
                        hint="write a.layers[start:stop] with start < stop")
        return (yield from self._layers(node, frame, start, stop))

    def _layers(self, node, frame: Frame, start: int, stop: int | None) -> Node:
        model = yield node.value, frame  # a `layers` node, from _Attr
        return self.b.make(Op.LAYERS, model.args, (start, stop), TENSOR, node.span)

    def _layer_bound(self, expr: ast.Expr, frame: Frame) -> int:
        value = yield expr, frame
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise error(f"a layer index is a whole number >= 0, not {describe(value)}",
                        expr.span)
        return value

    # calls

    def _Call(self, node: ast.Call, frame: Frame) -> Value:
        assert isinstance(node.func, ast.Name)
        name = node.func.id
        found = frame.scope.lookup_function(name)
        if found is not None:
            return (yield from self._inline(found[0], found[1], node, frame))
        args = []
        for a in node.args:
            args.append((yield a, frame))
        kwargs = {}
        for kw in node.kwargs:
            kwargs[kw.name] = yield kw.value, frame
        if name in PRIMITIVES:
            return calls.primitive(self, PRIMITIVES[name], node, args, kwargs, frame)
        return calls.BUILTINS[name](self, node, frame, *args, **kwargs)

    def _inline(self, fn: ast.FnDef, scope: Scope, node: ast.Call, caller: Frame) -> Value:
        depth, f = 0, caller
        while f is not None:
            depth, f = depth + 1, f.parent
        if depth > _MAX_INLINE_DEPTH:
            raise error(f"{fn.name}() calls itself without end: functions are inlined, so "
                        "recursion is not supported", node.span,
                        hint="write the repetition out, or use a list and sum()")
        frame = Frame(scope, {}, node, fn, parent=caller)
        params = [p for p in fn.params if not p.rest]
        positional = [p for p in fn.params if not p.rest and not _after_rest(fn, p)]
        rest = next((p for p in fn.params if p.rest), None)
        args = list(node.args)
        for param, arg in zip(positional, args, strict=False):
            frame.locals[param.name] = yield arg, caller
            frame.arg_exprs[param.name] = arg
        if rest is not None:
            extra = []
            for a in args[len(positional):]:
                extra.append((yield a, caller))
            frame.locals[rest.name] = tuple(extra)
        for kw in node.kwargs:
            frame.locals[kw.name] = yield kw.value, caller
            frame.arg_exprs[kw.name] = kw.value
        for param in params:
            if param.name not in frame.locals:
                frame.locals[param.name] = yield param.default, Frame(scope, {})
        # equal arguments give an equal result: made once, unless the result depends on
        # the call site (a random draw or a reduction inside; see inline.py)
        key = None if self.call_sites.keyed(fn, scope) else (
            id(fn), id(scope), tuple((n, value_key(v)) for n, v in frame.locals.items()))
        if key is not None and self.inlined.get(key, _UNSEEN) is not _UNSEEN:
            return self.inlined[key]
        try:
            for stmt in fn.body:
                frame.locals[stmt.name] = yield stmt.value, frame
            result = yield fn.result, frame
        except MergeError as exc:
            if in_stdlib(node.span):
                raise
            raise MergeError(move_to_script(exc.diagnostics, node.span,
                                            f"in {fn.name}()")) from None
        if key is not None:
            self.inlined[key] = result
        return result

    # where errors point

    def user_span(self, expr: ast.Expr | None, node: ast.Call, frame: Frame) -> Span:
        """The span in user code that best explains a value: follows a parameter name
        back through inlined calls to the argument that supplied it."""
        f: Frame | None = frame
        while expr is not None and f is not None and f.fn is not None:
            if isinstance(expr, ast.Name) and expr.id in f.arg_exprs:
                expr = f.arg_exprs[expr.id]
                f = f.parent
            else:
                break
        return expr.span if expr is not None else node.span

    def call_site(self, node: ast.Call, frame: Frame) -> str:
        """A stable identity for one call of a random primitive: the chain of calls
        (file name, line, column) that inlined it, outermost first."""
        spans = [node.span]
        f: Frame | None = frame
        while f is not None:
            if f.call is not None:
                spans.append(f.call.span)
            f = f.parent
        return ">".join(f"{Path(s.file).name}:{s.line}:{s.col}" for s in reversed(spans))


# binary operators that are neither logic, comparison nor arithmetic
_SPECIAL = {"|": Lowerer._fallback, "~": Lowerer._match}


def _in_int64(value: Value, span: Span) -> Value:
    """A folded number; an integer beyond 64 bits is refused here, as in a literal (no
    tensor operation can take it, and a float says what is meant)."""
    if isinstance(value, int) and not -2**63 <= value <= 2**63 - 1:
        digits = str(abs(value))
        shown = ("-" if value < 0 else "") + (digits if len(digits) <= 24
                                              else f"{digits[:12]}...({len(digits)} digits)")
        raise error(f"the integer {shown} made here is too large (at most {2**63 - 1} "
                    "in magnitude)", span,
                    hint=f"write a number as a float (e.g. {float(2**32):.1f}) to compute "
                         "in floating point")
    return value


def _after_rest(fn: ast.FnDef, param: ast.Param) -> bool:
    seen_rest = False
    for p in fn.params:
        if p is param:
            return seen_rest
        seen_rest = seen_rest or p.rest
    return False
