"""A merge expression compiled once and evaluated many times, on tensors in memory.

This is what a training loop, an online-merging optimizer or a search embeds: the text
is parsed and resolved once; it is lowered once per way of calling it (which inputs are
models, which are values) and planned once per set of input shapes and values. A call
that matches an earlier one binds the new tensors to the cached plan and executes it:
nothing is parsed, lowered or specialised again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import ast
from .bind import Bound, BoundModel, InMemoryModel, bind
from .builtins import CONTEXT_NAMES, DTYPES
from .devices import parse_devices
from .diagnostics import MergeError, error, move_to_script
from .execute import Collector, execute
from .extraction.form import refuse_outside_scripts
from .lower import Lowered, lower
from .plan import Plan, plan
from .resolve import resolve
from .schedule import Kernel, schedule
from .sparse import Difference, Sparse
from .syntax import parse_expression

_BARE = "tensor"  # the one name of a model given as a bare tensor
_RESERVED = ("seed", "device", "dtype")
_MAX_PLANS = 64  # plans kept per expression


class Expression:
    """`expression(text)`: call it with one keyword per free name of the text (others
    are ignored, so one set of inputs can serve several expressions)."""

    def __init__(self, text: str, library: str | os.PathLike | None = None):
        self.module = parse_expression(text)
        output = self.module.statements[0]
        if library is not None:  # a .merge file of `fn`s it may call, imported as by a script
            path = str(Path(library).resolve())
            self.module = ast.Module(self.module.source, (ast.Import(output.span, path), output))
        self.span = output.span
        self.names = frozenset(_free_names(output.value))
        reserved = self.names & set(_RESERVED)
        if reserved:
            raise error(f"`{sorted(reserved)[0]}` is a reserved keyword of evaluate(); "
                        "rename it in the expression", self.span)
        self.resolved = resolve(self.module, externals=self.names)
        self._lowered: dict[frozenset[str], Lowered] = {}
        self._plans: dict[tuple, tuple[Plan, list[Kernel]]] = {}

    def __call__(self, *, seed: int = 0, device: str = "cpu", dtype: str = "float32",
                 **inputs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        """The merge of these inputs. Runs without autograd: the inputs may be
        parameters that require grad (a merge is not differentiated)."""
        return self._call(inputs, seed, device, dtype, sparse=False)

    def sparse(self, *, seed: int = 0, device: str = "cpu", dtype: str = "float32",
               **inputs: Any) -> torch.Tensor | Sparse | dict[str, torch.Tensor | Sparse]:
        """As a call, but a result that the expression computed as a Sparse (the rules that
        keep a few entries: keep_random, top_fraction, and what is computed from them and
        other Sparse inputs) is returned as one, not made dense: an optimizer adds its
        few entries where they are."""
        return self._call(inputs, seed, device, dtype, sparse=True)

    @torch.no_grad()
    def _call(self, inputs: dict[str, Any], seed: int, device: str, dtype: str,
              sparse: bool) -> Any:
        missing = sorted(self.names - inputs.keys())
        if missing:
            raise TypeError(f"this expression takes {', '.join(sorted(self.names))}; "
                            f"missing {', '.join(missing)}")
        inputs = {k: v for k, v in inputs.items() if k in self.names}
        models = {k: v for k, v in inputs.items()
                  if isinstance(v, (torch.Tensor, Sparse, Difference, dict))}
        values = {k: v for k, v in inputs.items() if k not in models}
        bare = {k for k, v in models.items()
                if isinstance(v, (torch.Tensor, Sparse, Difference))}
        if bare and len(bare) != len(models):
            raise TypeError("give all model inputs as tensors or all as state dicts")
        states = {k: {_BARE: v} if k in bare else dict(v) for k, v in models.items()}
        parse_devices(device)
        if dtype not in DTYPES:
            raise error(f'unknown dtype "{dtype}"', None, hint=f"use one of {', '.join(DTYPES)}")
        try:
            p, kernels = self._plan(states, values, seed, dtype)
            with p:
                results = Collector(p.tensors)
                # a call returns tensors, not warnings: no pass over each result to count
                # NaNs that nobody would be told of
                execute(p, results.sink, device, kernels=kernels, check_finite=False,
                        sparse_results=sparse)
        except MergeError as exc:
            raise MergeError(move_to_script(exc.diagnostics, self.span)) from None
        return results.tensors[_BARE] if bare else results.tensors

    def _plan(self, states: dict[str, dict], values: dict[str, Any], seed: int,
              dtype: str) -> tuple[Plan, list[Kernel]]:
        """The plan and its schedule for these inputs, bound to their tensors: made on
        the first call with inputs of these names, shapes, dtypes and values; reused
        after."""
        # the seed is not planned on (random draws read it when they run): one plan serves
        # every seed, as an optimizer calling with seed + step needs
        signature = (dtype, tuple(sorted((k, _value_key(v)) for k, v in values.items())),
                     tuple((k, tuple(_headers(s))) for k, s in sorted(states.items())))
        lowered = self._lower(frozenset(states), frozenset(values))
        lowered = dataclasses.replace(lowered, seed=seed, dtype=dtype)
        held = {_key(k): s for k, s in states.items()}
        cached = self._plans.get(signature)
        if cached is None or any(k not in held for k in cached[0].bound.models):
            bound = bind(lowered, {k: InMemoryModel(s) for k, s in held.items()
                                   if k in lowered.models})
            made = plan(bound, values)
            if len(self._plans) >= _MAX_PLANS:  # the oldest goes (a sweep over many values)
                del self._plans[next(iter(self._plans))]
            kept = {k: BoundModel(k, m.ref, _Held({}, m.source.tensors), m.num_layers)
                    if isinstance(m.source, InMemoryModel) else m
                    for k, m in bound.models.items()}  # the caller's tensors are not kept
            self._plans[signature] = (dataclasses.replace(
                made, bound=Bound(lowered, kept, _donor(bound, kept))), schedule(made))
            return made, self._plans[signature][1]
        template, kernels = cached
        # the same names, shapes and dtypes as the plan's: bind's checks and layer count
        # hold, so the new tensors take the old ones' place, headers and all
        models = {k: BoundModel(k, m.ref, _Held(held[k], m.source.tensors), m.num_layers)
                  for k, m in template.bound.models.items()}
        bound = Bound(lowered, models, _donor(template.bound, models))
        return dataclasses.replace(template, bound=bound, seed=seed), kernels

    def _lower(self, models: frozenset[str], values: frozenset[str]) -> Lowered:
        key = models
        if key not in self._lowered:
            self._lowered[key] = lower(self.resolved, {k: _key(k) for k in models}, values)
            refuse_outside_scripts(self._lowered[key].form, "an expression")
        return self._lowered[key]

    @property
    def cached_plans(self) -> int:
        """How many plans this expression has made (one per distinct way of calling it)."""
        return len(self._plans)


def _donor(bound: Bound, models: dict[str, BoundModel]) -> BoundModel | None:
    """The donor among `models`, which replace those of `bound`."""
    return models[bound.donor.key] if bound.donor is not None else None


class _Held(InMemoryModel):
    """An in-memory model whose headers are already known (a call like an earlier one)."""

    def __init__(self, state: dict[str, torch.Tensor], tensors: dict):
        self.state, self.tensors, self.config, self.folder = state, tensors, None, None


def _key(name: str) -> str:
    return f"<memory>/{name}"


def _value_key(value: Any) -> tuple:
    return (type(value).__name__, value)


def _headers(state: dict[str, torch.Tensor]) -> Iterator[tuple]:
    for name, tensor in state.items():
        yield name, tuple(tensor.shape), tensor.dtype


def _free_names(expr: ast.Expr) -> Iterator[str]:
    """The names an expression uses that nothing defines: its inputs. (An expression
    defines no names, and the standard library defines only functions.)"""
    if isinstance(expr, ast.Name):
        if expr.id not in CONTEXT_NAMES:
            yield expr.id
        return
    for field in dataclasses.fields(expr):
        if field.name in ("span", "func"):
            continue
        value = getattr(expr, field.name)
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, ast.Keyword):
                item = item.value
            if isinstance(item, ast.Expr):
                yield from _free_names(item)
