"""Lower: the resolved program -> one IR expression for the output.

Lowering is evaluation at compile time. Numbers, strings, booleans and lists are
ordinary Python values and fold as they meet; functions are inlined by evaluating
their bodies with the arguments bound; whatever depends on tensors (or on the
per-tensor names `name`, `layer`, `depth`, ...) becomes an interned `ir.Node`.

Lists exist only here: `[1.0, 0.7] * [d1, d2]` becomes two products, `sum(...)` a
chain of additions, and a primitive given a list where it takes one tensor is applied
to each element. The IR that leaves this stage has tensors and per-tensor scalars only.

`lower` is the one way into the back end: scripts, the REPL, `evaluate` and
`expression` all call it and get the same complete `Lowered`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .. import ast
from ..builtins import DTYPES
from ..diagnostics import Span, error
from ..extraction.form import AdapterForm, lower_output
from ..io.sources import MODEL, split_key
from ..ir import TENSOR, Builder, Node, Op, nodes_of
from ..params import Override, bind
from ..resolve import Resolved
from ..vocab import VocabSettings, apply_setting
from .evaluate import Frame, Lowerer
from .values import ModelRef, Value, describe

__all__ = ["Lowered", "ModelRef", "Value", "lower"]


@dataclass
class Lowered:
    """What the back end needs: the output expression and the facts around it."""

    output: Node | None                 # the output when it is a model expression
    models: dict[str, ModelRef]         # model key (resolved path) -> how it was first named
    donor: str | None                   # model key whose config/tokenizer are copied
    builder: Builder                    # the program's nodes: plan makes its own with it
    seed: int = 0
    dtype: str = "float32"
    out_dtype: str | None = None
    value: Value = None                 # the output expression's value, whatever its kind
    output_span: Span | None = None
    params: frozenset[str] = frozenset()  # names given a value at each evaluation
    setting_spans: dict[str, Span] = field(default_factory=dict)
    script_params: dict[str, Value] = field(default_factory=dict)  # `param` name -> value
    vocab: VocabSettings = field(default_factory=VocabSettings)  # the `vocab*` settings
    form: AdapterForm | None = None     # `output extract_lora(...)`: written as an adapter


def lower(resolved: Resolved, inputs: Mapping[str, str] | None = None,
          params: Iterable[str] = (), *, session: bool = False,
          overrides: Iterable[Override] = (), builder: Builder | None = None) -> Lowered:
    """Evaluate the script at compile time. Raises MergeError.

    `inputs` names models the embedding program holds (name -> model key); `params`
    names numbers or strings it gives at each evaluation (they stay `param` nodes
    until plan). `overrides` replace the defaults of script parameters (`param NAME =
    literal`, set by `-D`): each is then a compile-time constant like any literal. A
    REPL `session` lowers every binding (so every model it names is known) and its output
    may be any value (the REPL shows numbers and per-tensor values too); a script's
    output must be a model expression. `builder`: the interning table to make nodes in
    (the REPL keeps one for its session, so equal values are equal nodes from line to
    line); by default a new one: a program's nodes are its own."""
    lowerer = Lowerer(resolved, builder if builder is not None else Builder())
    span = resolved.output.value.span if resolved.output is not None else None
    for name, key in (inputs or {}).items():
        lowerer.globals[name] = lowerer.model_node(key, name, span)
    params = frozenset(params)
    for name in params:
        lowerer.globals[name] = lowerer.b.make(Op.PARAM, (), name, span=span)
    script_params = bind(resolved.scope.bindings, overrides)
    lowerer.globals.update(script_params)
    top = Frame(resolved.scope, {})
    for name, stmt in resolved.scope.bindings.items() if session else ():
        lowerer.eval(ast.Name(stmt.span, name), top)
    value, form = lower_output(lowerer, resolved.output.value, top) \
        if resolved.output is not None else (None, None)
    is_model = isinstance(value, Node) and value.kind == TENSOR
    if resolved.output is not None and not (is_model or session):
        raise error(f"`output` must be a model expression, not {describe(value)}",
                    span, hint="e.g. `output base + ties(a - base, b - base)`")
    lowered = Lowered(value if is_model else None, lowerer.models, None, lowerer.b,
                      value=value, output_span=span, params=params,
                      script_params=script_params, form=form)
    for key, stmt in resolved.settings.items():
        _setting(lowered, key, stmt, lowerer.eval(stmt.value, top))
    if lowered.donor is None and isinstance(value, Node):  # a model, not an adapter
        lowered.donor = next((n.attr for n in nodes_of(value, Op.MODEL) if _plain(n.attr)),
                             None)
    if lowered.donor is None and lowerer.models:
        lowered.donor = next((key for key in lowerer.models if _plain(key)), None)
    return lowered


def _setting(lowered: Lowered, key: str, stmt: ast.Set, value: Value) -> None:
    lowered.setting_spans[key] = stmt.value.span
    if key in ("dtype", "out_dtype"):
        if value not in DTYPES:
            raise error(f"{key} must be one of {', '.join(DTYPES)}, not {describe(value)}",
                        stmt.value.span, hint=f'e.g. set {key} = "bfloat16"')
        setattr(lowered, key, value)
    elif key == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise error(f"seed must be a non-negative integer, not {describe(value)}",
                        stmt.value.span, hint="e.g. set seed = 42")
        lowered.seed = value
    elif key == "donor":
        if not (isinstance(value, Node) and value.op is Op.MODEL and _plain(value.attr)):
            what = f"{split_key(value.attr)[0]}(...), which has no config" \
                if isinstance(value, Node) and value.op is Op.MODEL else describe(value)
            raise error(f"donor must name a model, not {what}", stmt.value.span,
                        hint='e.g. base = model("models/base") then set donor = base')
        lowered.donor = value.attr
    elif key.startswith("vocab"):
        apply_setting(lowered.vocab, key, value, stmt.value.span)


def _plain(key: str) -> bool:
    """Whether an input is a model, not a change to one (an adapter): only a model has
    a config and tokenizer to copy."""
    return split_key(key)[0] == MODEL
