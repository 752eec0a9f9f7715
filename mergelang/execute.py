"""Execute: walk the plan one output tensor at a time, load on demand, release early.

Each output tensor's expression is evaluated in dependency order; a value is dropped
as soon as its last user has run (use counts are fixed by the plan), so the working
set is a few tensors of the size being merged, never the model. Results are cast once
to the output dtype and handed to a sink (the shard writer, or a dict in memory).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from . import ir
from .diagnostics import Diagnostic, MergeError, error
from .ir import Node
from .ops import BINARY, PRIMITIVES, generator_for
from .plan import Plan, TensorPlan

Sink = Callable[[str, torch.Tensor], None]


def execute(plan: Plan, sink: Sink, device: str = "cpu", strict: bool = False,
            progress: Callable[[TensorPlan], None] | None = None) -> list[Diagnostic]:
    """Compute every output tensor and pass it to `sink`. Returns warnings (NaN/Inf).

    With strict=True a non-finite result is an error instead of a warning.
    """
    warnings: list[Diagnostic] = []
    for t in plan.tensors:
        result = run_tensor(plan, t, device)
        if t.out_dtype.is_floating_point and not bool(torch.isfinite(result).all()):
            bad = int((~torch.isfinite(result)).sum())
            diagnostic = Diagnostic(
                f'tensor "{t.name}" has {bad} NaN or infinite value{"s" if bad > 1 else ""} '
                "in the result", plan.bound.lowered.output.span,
                hint="check the weights and divisors of the merge"
                     + ("" if strict else "; pass --strict to make this an error"),
                severity="error" if strict else "warning")
            if strict:
                raise MergeError(diagnostic)
            warnings.append(diagnostic)
        sink(t.name, result)
        del result
        if progress is not None:
            progress(t)
    return warnings


def run_tensor(plan: Plan, t: TensorPlan, device: str = "cpu") -> torch.Tensor:
    """Evaluate one output tensor; returns it on the CPU in its output dtype."""
    order = [n for n in ir.walk(t.root) if n.op != "const"]
    uses: dict[Node, int] = defaultdict(int)
    for node in order:
        for arg in node.args:
            uses[arg] += 1
    values: dict[Node, Any] = {}
    for node in order:
        values[node] = _evaluate(plan, t, node, values, device)
        for arg in node.args:
            uses[arg] -= 1
            if uses[arg] == 0:
                values.pop(arg, None)
    return values.pop(t.root).to(t.out_dtype).cpu()


def _arg(node: Node, values: dict) -> Any:
    return node.attr if node.op == "const" else values[node]


def _evaluate(plan: Plan, t: TensorPlan, node: Node, values: dict, device: str) -> Any:
    op = node.op
    if op == "load":
        key, name = node.attr
        tensor = plan.bound.models[key].source.load(name)
        if t.copy_only:
            return tensor
        return tensor.to(device=device, dtype=plan.compute_dtype)
    if op == "list":
        return [values[a] for a in node.args]
    if op == "neg":
        return -values[node.args[0]]
    if op in BINARY:
        return BINARY[op](_arg(node.args[0], values), _arg(node.args[1], values))
    if op == "prim":
        name, site = node.attr
        args = [_arg(a, values) for a in node.args]
        if site is None:
            return PRIMITIVES[name].fn(*args)
        generator = generator_for(plan.seed, t.name, site)
        return PRIMITIVES[name].fn(*args, generator=generator)
    if op == "copy_agreeing":
        first = values[node.args[0]]
        for other in node.args[1:]:
            if not torch.equal(first, values[other]):
                raise error(f'tensor "{t.name}" ({first.dtype}) is not a float tensor and '
                            "differs between the models; it cannot be merged", node.span,
                            hint="take it from one model with `a | b` or a condition on `name`")
        return first
    raise AssertionError(f"no executor for {op}")
