"""Per-tensor parameter values as expressions: filters, gradients and slice gradients.

A constant is a literal. Anything more is bound to a name (`weight_math`, `t_2`), with a
comment saying which mergekit rule it spells out, so the `output` line stays readable:

- a filter chain is `if name ~ "<escaped filter>" then ... else ...` (mergekit's filters
  are substring tests);
- a gradient over a whole model is `gradient([...])`, but mergekit gives the tensors
  outside the layers the first value where mergelang's `gradient` gives the final norm
  and head the last: `if layer == none then v0 else gradient([...])`;
- a gradient inside one slice of several runs over that slice's layers only: a
  piecewise-linear expression in `layer`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .. import ast
from .dtypes import rounded
from .emit import Make, Script
from .methods import MkParam
from .params import Const, Grad, Value, When

FILTERS = "mergekit's filters are substring matches on the tensor name"
OUTSIDE = ("mergekit gives tensors outside the layers (embeddings, final norm, lm_head) a "
           "gradient's first value")


@dataclass(frozen=True)
class Layers:
    """Where a slice's layers sit in the output: mergekit's gradients run over them."""

    offset: int
    length: int
    whole: bool   # the slice is all of the output's layers: `gradient` (over depth) fits


class Values:
    """Writes parameter values for one script, binding names in it."""

    def __init__(self, script: Script):
        self.script = script
        self.round_to: str | None = None   # the compute dtype mergekit's weights are built in
        self.rounded: dict[float, float] = {}   # each weight rounded, for the comment
        self.num_layers: int | None = None   # the models' layer count, when known
        self.per_layer = False            # a weight gradient was written one value a layer
        self.unrounded_gradient = False   # a weight gradient was left as written

    def expr(self, value: Value, param: MkParam, layers: Layers, hint: str | None,
             make: Make) -> ast.Expr:
        """`value` as an expression; anything beyond a literal is bound to a name made
        from `hint` (which may be None only for a `Const`)."""
        if isinstance(value, Const):
            return self._literal(value, param, make)
        assert hint is not None
        if param.in_dtype and self.round_to is not None:
            value = self._held(value, layers)
            if isinstance(value, Const):
                return self._literal(value, param, make)
        if isinstance(value, Grad):
            if not layers.whole:
                return self._slice_gradient(value, layers, hint, make)
            v = value.values
            if v[0] == v[-1]:
                return self.script.bind(hint, _gradient_call(v, make))
            return self.script.bind(hint, self._gradient(value, layers, hint, make), OUTSIDE)
        branches = []
        while isinstance(value, When):
            branches.append((value.filter, self._branch(value.then, param, layers, hint, make)))
            value = value.orelse
        out = self._branch(value, param, layers, hint, make)
        for filt, then in reversed(branches):
            test = make.op(make.name("name"), "~", make.lit(re.escape(filt)))
            out = make.cond(test, then, out)
        return self.script.bind(hint, out, FILTERS)

    def _held(self, value: Value, layers: Layers) -> Value:
        """A weight gradient as mergekit uses it in a reduced dtype: each layer's value
        interpolated, then rounded (one value a layer, so a script can spell it); left
        as written, with a warning, where the layer count is not known."""
        if isinstance(value, When):
            return When(value.filter, self._held(value.then, layers),
                        self._held(value.orelse, layers))
        if not isinstance(value, Grad):
            return value
        n = self.num_layers
        if not layers.whole or n is None:
            self.unrounded_gradient = True
            return value
        assert self.round_to is not None
        per = tuple(rounded(_interpolate(value.values, i / (n - 1) if n > 1 else 1.0),
                            self.round_to) for i in range(n))
        self.per_layer = True
        return Grad(per) if len(set(per)) > 1 else Const(per[0])

    def _literal(self, value: Const, param: MkParam, make: Make) -> ast.Expr:
        x = param.transform(value.value) if param.transform else value.value
        if param.in_dtype and self.round_to is not None and isinstance(x, int | float) \
                and not isinstance(x, bool):
            held = rounded(float(x), self.round_to)
            if held != x:
                self.rounded[x] = held
                x = held
        return make.lit(x)

    def _branch(self, value: Const | Grad, param: MkParam, layers: Layers, hint: str,
                make: Make) -> ast.Expr:
        if isinstance(value, Const):
            return self._literal(value, param, make)
        return self._gradient(value, layers, hint, make)

    def _gradient(self, value: Grad, layers: Layers, hint: str, make: Make) -> ast.Expr:
        """A gradient inside a larger expression (no name of its own over a whole model)."""
        v = value.values
        if not layers.whole:
            return self._slice_gradient(value, layers, hint, make)
        if v[0] == v[-1]:
            return _gradient_call(v, make)
        return make.cond(_outside(make), make.lit(v[0]), _gradient_call(v, make))

    def _slice_gradient(self, value: Grad, layers: Layers, hint: str, make: Make) -> ast.Expr:
        """mergekit's gradient over one slice of several: t = (layer - offset) / (n - 1)
        over the slice's own layers; tensors outside the layers get the first value."""
        v = value.values
        first, last = layers.offset, layers.offset + layers.length - 1
        comment = (f"the gradient {_text(v)} over this slice's layers (output layers "
                   f"{first}-{last}), as mergekit spreads it; the first value outside the "
                   f"layers")
        if layers.length == 1:   # mergekit: t = 1 for a one-layer slice
            return self.script.bind(hint, make.cond(_outside(make), v[0], v[-1]), comment)
        k = len(v) - 1
        pos: ast.Expr = make.name("layer")
        if first:
            pos = make.op(pos, "-", first)
        if layers.length > 2:
            pos = make.op(pos, "/", layers.length - 1)
        if k > 1:
            pos = make.op(pos, "*", k)
        pos = self.script.bind(f"{hint}_pos", pos,
                               "the position in the gradient's list: 0 at the slice's first "
                               "layer")
        out: ast.Expr | None = None
        for j in reversed(range(k)):
            frac = pos if j == 0 else make.op(pos, "-", j)
            segment = make.op(make.op(make.op(1, "-", frac), "*", v[j]), "+",
                              make.op(frac, "*", v[j + 1]))
            out = segment if out is None else make.cond(make.op(pos, "<", j + 1), segment, out)
        return self.script.bind(hint, make.cond(_outside(make), v[0], out), comment)


def _interpolate(values: tuple, t: float) -> float:
    """mergekit's value of a gradient at t (config.evaluate_setting)."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _gradient_call(values: tuple, make: Make) -> ast.Call:
    return make.call("gradient", (make.lit(list(values)),))


def _outside(make: Make) -> ast.Expr:
    """`layer == none`: a tensor outside the repeated blocks."""
    return make.op(make.name("layer"), "==", make.lit(None))


def _text(values: Any) -> str:
    return "[" + ", ".join(repr(v) for v in values) + "]"
