"""`extract_lora(x, rank=..., energy=..., keep=[...], base=..., svd=...)`: what it means.

The call is allowed only as the whole `output` expression: it says what to write (an
adapter of the delta `x`), not a value other expressions could use. Lowering records it
as the output's `AdapterForm` and lowers `x` as the output; once the plan knows the
tensors' shapes (from the headers, nothing loaded), `layout` decides each tensor's
role and checks the rank against it, so a rank the tensors cannot hold is found before
any tensor is read.

Roles match mergekit-extract-lora's defaults: 2-D `.weight` tensors of linear layers
become LoRA pairs; embeddings and the LM head (found by name), and every tensor that is
not 2-D (norms, biases of modules not factorised), are kept whole in PEFT's
`modules_to_save` as base + x; `keep` names more (regular expressions searched in the
tensor names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import ast
from ..diagnostics import Span, error
from ..ir import TENSOR, Node, Op, walk
from .svd import METHODS

if TYPE_CHECKING:
    from ..lower.evaluate import Frame, Lowerer
    from ..plan import Plan

NAME = "extract_lora"
EMBEDDINGS = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_out|lm_head|wte|wpe|"
                        r"word_embeddings|embeddings)(\.|$)")
LORA, BIAS, KEEP, SKIP = "lora", "bias", "keep", "skip"
# Model types whose linear layers are transformers' Conv1D, weights stored [in, out]
# (every 2-D weight a LoRA pair can target; their embeddings and head are kept whole).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt"})


def stores_transposed(config: dict | None) -> bool:
    """Whether the base's linear weights are stored [in, out] (Conv1D): PEFT then
    builds A as [r, in] and B as [out, r] and adds (B A)^T (fan_in_fan_out)."""
    return bool(config) and config.get("model_type") in CONV1D_MODEL_TYPES


def module_of(name: str) -> str | None:
    """The module a tensor belongs to (`...q_proj.weight` -> `...q_proj`); None for a
    tensor that is no module's weight or bias, which an adapter cannot hold."""
    module, _, last = name.rpartition(".")
    return module if module and last in ("weight", "bias") else None


@dataclass(frozen=True)
class AdapterForm:
    """The options of an `output extract_lora(...)`: the output is written as an adapter."""

    rank: int | None            # the rank, or the largest one with `energy`
    energy: float | None        # keep this share of each delta's squared Frobenius norm
    keep: tuple[str, ...]       # regexes: tensors kept whole (modules_to_save)
    base: str                   # model key of the base the adapter goes onto
    svd: str                    # "auto", "exact" or "randomised"
    span: Span                  # the call
    rank_span: Span


def lower_output(lo: Lowerer, expr: ast.Expr, frame: Frame) -> tuple[object, AdapterForm | None]:
    """The output expression's value, and its adapter form when it is `extract_lora(...)`."""
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)
            and expr.func.id == NAME and frame.scope.lookup_function(NAME) is None):
        return lo.eval(expr, frame), None
    given = dict(zip(("x", "rank", "energy", "keep", "base", "svd"), expr.args, strict=False))
    given.update({kw.name: kw.value for kw in expr.kwargs})
    values = {name: lo.eval(e, frame) for name, e in given.items()}
    x = values["x"]
    if not (isinstance(x, Node) and x.kind == TENSOR):
        raise error(f"{NAME}(): x must be a delta (a model expression), not "
                    f"{_describe(x)}", given["x"].span,
                    hint="e.g. extract_lora(model(\"ft\") - model(\"base\"), rank=16)")
    rank, energy = values.get("rank"), values.get("energy")
    if rank is None and energy is None:
        raise error(f"{NAME}() needs a rank or an energy", expr.span,
                    hint="e.g. rank=16, or energy=0.9 to pick each tensor's rank")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise error(f"{NAME}(): rank must be a whole number > 0, not {_describe(rank)}",
                    given["rank"].span, hint="e.g. rank=16")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise error(f"{NAME}(): energy must be a number in (0, 1], not {_describe(energy)}",
                    given["energy"].span, hint="e.g. energy=0.9 keeps 90% of each delta's "
                    "squared Frobenius norm")
    method = values.get("svd", "auto")
    if method not in METHODS:
        raise error(f"{NAME}(): svd must be one of {', '.join(map(repr, METHODS))}, not "
                    f"{_describe(method)}", given["svd"].span, hint='e.g. svd="exact"')
    return x, AdapterForm(rank, None if energy is None else float(energy),
                          _keep(values.get("keep", ()), given.get("keep")),
                          _base(lo, x, values.get("base"), given.get("base"), expr),
                          method, expr.span, given.get("rank", expr).span)


def elsewhere(lo: Lowerer, node: ast.Call, frame: Frame, *args: object, **kwargs: object):
    """`extract_lora` anywhere but as the whole output: an error (the built-in's body)."""
    raise error(f"{NAME}() must be the whole `output` expression", node.span,
                hint=f"write `output {NAME}(...)`; the delta inside it may be any expression")


def _keep(value: object, expr: ast.Expr | None) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else value
    if not (isinstance(patterns, tuple) and all(isinstance(p, str) for p in patterns)):
        raise error(f"{NAME}(): keep must be a list of regular expressions, not "
                    f"{_describe(value)}", expr.span, hint='e.g. keep=["lm_head"]')
    for p in patterns:
        try:
            re.compile(p)
        except re.error as exc:
            raise error(f"{NAME}(): bad regular expression {p!r} in keep: {exc}",
                        expr.span) from None
    return patterns


def _base(lo: Lowerer, x: Node, value: object, expr: ast.Expr | None, call: ast.Call) -> str:
    """The model the adapter goes onto: `base=`, else the one model every model
    subtracted in x is (`ft - base`, `ties(a - base, b - base)`)."""
    if value is not None:
        if not (isinstance(value, Node) and value.op is Op.MODEL):
            raise error(f"{NAME}(): base must be a model, not {_describe(value)}", expr.span,
                        hint='e.g. base=model("base")')
        return value.attr
    subtracted = {n.args[1].attr for n in walk(x) if n.op is Op.SUB and n.args[1].op is Op.MODEL}
    if len(subtracted) != 1:
        found = "no model is subtracted" if not subtracted else \
            f"{len(subtracted)} different models are subtracted"
        raise error(f"{NAME}(): cannot tell which model the adapter goes onto: {found} in "
                    "the delta", call.span, hint='name it: base=model("base")')
    return next(iter(subtracted))


def _describe(value: object) -> str:
    from ..lower.values import describe
    return describe(value)


def keepable(roles: dict[str, str]) -> list[str]:
    """The dropped tensors `keep=` could carry: biases of factorised modules, dropped
    because not every factorised module has one (PEFT's lora_bias is all or nothing).
    The other dropped tensors (integer buffers, loose parameters) no adapter holds."""
    return sorted(n for n, r in roles.items() if r == SKIP and n.endswith(".bias")
                  and roles.get(str(module_of(n)) + ".weight") == LORA)


def layout(form: AdapterForm, p: Plan) -> dict[str, str]:
    """Each output tensor's role (LORA, KEEP or SKIP), checking the rank against the
    shapes of the tensors it factorises. Raises MergeError at the rank."""
    _check_rows(form, p.bound.models[form.base].source)
    base = p.bound.models[form.base].source.tensors
    keep = [re.compile(k) for k in form.keep]
    roles: dict[str, str] = {}
    for t in p.tensors:
        if t.copy_only or not t.out_dtype.is_floating_point or module_of(t.name) is None:
            roles[t.name] = SKIP  # integer buffers, loose parameters: no adapter holds them
        elif (len(t.shape) == 2 and t.name.endswith(".weight")
              and not EMBEDDINGS.search(t.name) and not any(k.search(t.name) for k in keep)):
            roles[t.name] = LORA
        else:
            roles[t.name] = KEEP
    # a factorised module's bias: its delta in lora_B's bias, which PEFT allows only when
    # every factorised module has one (lora_bias is all or nothing); else it is dropped
    biases = [t.name for t in p.tensors if t.name.endswith(".bias")
              and roles.get(module_of(t.name) + ".weight") == LORA]
    every = len(biases) == sum(r == LORA for r in roles.values())
    roles.update((name, BIAS if every else SKIP) for name in biases)
    for t in p.tensors:
        if roles[t.name] == KEEP and t.name not in base:
            raise error(f'tensor "{t.name}" is kept whole (base + delta), but the base model '
                        "has no such tensor", form.span,
                        hint="name a base that has every tensor: base=model(\"...\")")
    targets = [t for t in p.tensors if roles[t.name] == LORA]
    if form.rank is not None and targets:
        smallest = min(targets, key=lambda t: min(t.shape))
        if form.rank > min(smallest.shape):
            rows, cols = smallest.shape
            raise error(f"rank {form.rank} is more than tensor \"{smallest.name}\" ({rows} x "
                        f"{cols}) can hold: at most {min(rows, cols)}", form.rank_span,
                        hint=f"use rank={min(rows, cols)} or less, or keep that tensor whole "
                        "with keep=[...]")
    return roles


def _check_rows(form: AdapterForm, source: Any) -> None:
    """An adapter goes onto its base as the base is on disk: `set vocab` may not give
    the base's embedding or head other rows (more, or in another order), which the
    adapter's saved copy of them would have and PEFT would refuse."""
    inner = getattr(source, "inner", None)  # io/aligned.AlignedSource
    for name in sorted(getattr(source, "aligned", ()) if inner is not None else ()):
        rows = inner.tensors[name].shape[0]
        if source.rows != rows or source.row_map.tolist() != list(range(rows)):
            raise error(f'`set vocab` gives "{name}" {source.rows} rows in another order '
                        f"or number than the {rows} of the base the adapter goes onto, "
                        "which an adapter cannot hold", form.span,
                        hint="extract against a base with the output's vocabulary, or use "
                             '`set vocab = "base"` with the adapter\'s base as the donor')


def refuse_outside_scripts(form: AdapterForm | None, where: str) -> None:
    """An adapter is a file a script's run writes; an expression evaluated in memory or
    a REPL line has no such output, so there `extract_lora` is an error, not ignored."""
    if form is not None:
        raise error(f"{NAME}() writes an adapter folder, which {where} cannot", form.span,
                    hint=f"put `output {NAME}(...)` in a script and run it with `mergelang "
                    "run`, or use `mergelang extract`")
