"""OnlineMerging: any torch optimizer, its update replaced by a merge rule written in the
language.

At each merging step the wrapped optimizer steps as usual; its update, update = θ_after -
θ_before, is then merged by the rule, a mergelang expression compiled once
(mergelang.expression): θ ← θ_before + rule(update, ref, before). The inputs are state dicts
keyed by parameter name:

- `update`: the inner optimizer's update (with every=k, the sum of its k updates);
- `ref`: the reference task vector tau = reference - base as the rule keeps it, made once
  by the `prepare` expression of `tau` (for the standard rules, `ondare_ref`/`onties_ref`
  with the rule's own keep, clip, small and rescale), held sparse between steps and given
  to the rule as a mergelang.sparse.Sparse;
- `before`: the parameters before the step (θ_before; `param` is a keyword of the
  language, so that name cannot be read).

The rule is evaluated on batches of parameters (`batch` entries at a time: one call, many
tensors), so the per-call cost of the compiled expression is paid a few times per step,
not once per parameter. Randomness is keyed by (seed + step, parameter name, call site in
the rule). The standard rules keep a few entries of the update (`keep_random`,
`top_fraction`): the executor computes them, and what follows from them and the sparse
`ref`, at those entries only (mergelang.sparse), and the merged entries are added where
they are; a rule that is dense somewhere is computed densely there, with the same values.

Wrapping costs memory the built-in classes do not spend: the parameters before the step
(one copy of the parameters being trained, kept from step to step so that no memory is
asked for at each step). The update is computed in the parameters' own memory, which the
merged values then overwrite.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import syntax
from ..ast import Call, Name
from ..compiled import Expression
from ..resolve import stdlib_scope
from ..sparse import Difference, Sparse, densify
from .adamw import _names_of, begin_step
from .monitor import Monitor, StepStats, Tally
from .sources import Source, kept_task_vector, store, task_vectors

INPUTS = frozenset({"update", "ref", "before"})
# the standard rules and the keywords their preparation shares with them
PREPARES = {"ondare": ("ondare_ref", ("keep", "clip", "rescale")),
            "onties": ("onties_ref", ("keep", "small", "rescale"))}


class OnlineMerging(torch.optim.Optimizer):
    """Wrap `optimizer` so that its update is replaced by `rule` every `every` steps.

    rule: an expression of `update`, `ref` and `before`, e.g.
        "ondare(update, ref, keep=0.01, alpha=1e-7)" or "onties(update, ref, keep=0.1)";
        or a call of a function of your own, defined in the .merge file `library`.
    reference, base: as for OnDAREAdamW (paths, state dicts or modules); needed when the
        rule reads `ref`.
    library: a .merge file of `fn` definitions that rule and prepare may call.
    prepare: the expression of `tau` that makes `ref`, evaluated once (seed `seed`);
        default: the standard rule's own (`ondare_ref(tau, keep=...)`, ...). A rule of
        your own that reads `ref` must say it ("tau" keeps tau dense and whole).
    names: (name, parameter) pairs when the inner optimizer was not given
        model.named_parameters().
    batch: how many entries the rule is evaluated on at once (default 2**24).
    device, dtype: where and in what the rule computes (default: the parameters' device,
        float32).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, rule: str, *,
                 reference: Source | None = None, base: Source | None = None,
                 prepare: str | None = None, library: str | os.PathLike | None = None,
                 every: int = 1, seed: int = 0,
                 names: Iterable[tuple[str, torch.Tensor]] | Mapping | None = None,
                 batch: int = 1 << 24, device: str | None = None, dtype: str = "float32",
                 callback: Callable[[StepStats], None] | None = None, stats: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, not "
                            f"{type(optimizer).__name__}")
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a whole number >= 1, not {every!r}")
        self.rule = Expression(rule, library)
        unknown = self.rule.names - INPUTS
        if unknown:
            raise TypeError(f"the rule reads {', '.join(sorted(unknown))}: its inputs are "
                            "update, ref and before")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups  # one list: a scheduler's lr reaches it
        self.defaults = optimizer.defaults
        self.text, self.every, self.seed, self.batch = rule, every, seed, batch
        self.device, self.dtype = device, dtype
        self.count = 0
        self.window: set[int] = set()
        self.monitor = Monitor(callback, stats)
        self.names = _names_of(self.param_groups, names)
        nameless = [p for p in params if self.names[id(p)] is None]
        if nameless:
            raise TypeError(f"{len(nameless)} parameters have no name: give the inner "
                            "optimizer model.named_parameters(), or pass names=")
        if "ref" in self.rule.names:
            if reference is None or base is None:
                raise TypeError("the rule reads `ref`: give reference= and base=")
            prepare = prepare if prepare is not None else default_prepare(rule)
            self.prepare = prepare
            self._load(Expression(prepare, library), reference, base)
        elif reference is not None or base is not None:
            raise TypeError("the rule does not read `ref`: reference= and base= are unused")

    def _load(self, prepare: Expression, reference: Source, base: Source) -> None:
        if not prepare.names <= {"tau"}:
            raise TypeError(f"prepare reads {', '.join(sorted(prepare.names - {'tau'}))}: "
                            "its one input is tau")
        params = {self.names[id(p)]: p for g in self.param_groups for p in g["params"]}
        with torch.no_grad():
            for batch in self._batches(list(params.values())):
                named = [(self.names[id(p)], p) for p in batch]
                taus = dict(task_vectors(named, reference, base))
                kept = prepare(tau=taus, seed=self.seed, device=self._device(batch),
                               dtype=self.dtype) if prepare.names else taus
                for name, p in named:
                    self.state[p].update(store(kept[name], p))

    def _device(self, params: list[torch.Tensor]) -> str:
        return self.device or str(params[0].device)

    def _batches(self, params: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
        batch: list[torch.Tensor] = []
        size = 0
        for p in params:
            if batch and size + p.numel() > self.batch:
                yield batch
                batch, size = [], 0
            batch.append(p)
            size += p.numel()
        if batch:
            yield batch

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, stepping = begin_step(self.param_groups, closure)
        self.count += 1
        if (self.count - 1) % self.every == 0:
            self.window = set()  # the parameters the inner optimizer moves in this window
        for _, p in stepping:
            if id(p) not in self.window:
                anchor = self.state[p].get("anchor")
                if anchor is None:
                    anchor = self.state[p]["anchor"] = torch.empty_like(p)
                anchor.copy_(p)
                self.window.add(id(p))
        inner = self.optimizer.step()
        loss = inner if loss is None else loss
        if self.count % self.every == 0:
            self._merge([p for p in self.params() if id(p) in self.window])
        return loss

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _merge(self, params: list[torch.Tensor]) -> None:
        tally = self.monitor.tally()
        reads = self.rule.names
        for batch in self._batches(params):
            names = [self.names[id(p)] for p in batch]
            inputs: dict[str, dict[str, Any]] = {"update": {}, "ref": {}, "before": {}}
            updates: list[Difference] = []
            for name, p in zip(names, batch, strict=True):
                anchor = self.state[p]["anchor"]
                # the update, computed where the rule reads it: at the entries it keeps, or
                # whole in the parameter's own memory (written over at the end)
                updates.append(Difference(p, anchor, in_place=True))
                inputs["update"][name] = updates[-1]
                inputs["before"][name] = anchor
                if "ref" in reads:
                    inputs["ref"][name] = kept_task_vector(self.state[p], p)
            call = {"seed": self.seed + self.count, "device": self._device(batch),
                    "dtype": self.dtype, **{k: v for k, v in inputs.items() if k in reads}}
            try:  # every result is found (and moved) before any parameter is written
                merged = self.rule.sparse(**call)
                outs = [_result_for(merged, name, p) for name, p in zip(names, batch, strict=True)]
            except BaseException:  # back to where the inner optimizer left them (to rounding)
                for p, update in zip(batch, updates, strict=True):
                    if update.computed:
                        p.add_(self.state[p]["anchor"])
                raise
            for p, update, out in zip(batch, updates, outs, strict=True):
                if tally is not None:
                    self._tally(tally, update.dense(), out, self.state[p])
                add_into(p, self.state[p]["anchor"], out)
            del inputs, merged, outs
        self.monitor.emit(tally, self.count, True)

    @staticmethod
    def _tally(tally: Tally, update: torch.Tensor, merged: torch.Tensor | Sparse,
               state: dict) -> None:
        tally.update(update)
        tally.merged(merged)
        if "ref_values" in state:
            index = state.get("ref_index")
            flat = update.reshape(-1)
            tally.signs(flat if index is None else flat[index], state["ref_values"].reshape(-1))

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict, and this wrapper's: its step count, seed, and
        each parameter's kept task vector (and, inside a k-step window, its anchor)."""
        own = {}
        inside = self.count % self.every != 0  # anchors matter inside a k-step window only
        for p in self.params():
            state = {k: v for k, v in self.state[p].items() if k != "anchor" or inside}
            if state:
                own[self.names[id(p)]] = state
        window = [self.names[id(p)] for p in self.params() if id(p) in self.window and inside]
        return {"inner": self.optimizer.state_dict(),
                "online": {"rule": self.text, "count": self.count, "seed": self.seed,
                           "every": self.every, "params": own, "window": window}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["inner"])
        online = state_dict["online"]
        self.count, self.seed, self.every = online["count"], online["seed"], online["every"]
        by_name = {self.names[id(p)]: p for p in self.params()}
        for name, state in online["params"].items():
            p = by_name[name]
            self.state[p] = {k: v.to(p.device) for k, v in state.items()}
        self.window = {id(by_name[name]) for name in online.get("window", [])}

    def memory(self) -> dict[str, int]:
        """Bytes this wrapper holds beyond the inner optimizer: the kept task vectors
        ("reference") and the parameters before the step ("anchor")."""
        out = {"reference": 0, "anchor": 0}
        for state in self.state.values():
            for key, value in state.items():
                where = "anchor" if key == "anchor" else "reference"
                out[where] += value.numel() * value.element_size()
        return out

    def __repr__(self) -> str:
        return f"OnlineMerging({self.optimizer!r}, rule={self.text!r})"


def _result_for(merged: Mapping[str, Any], name: str, p: torch.Tensor
                ) -> torch.Tensor | Sparse:
    """The rule's result for parameter `name`, on p's device."""
    if name not in merged:
        raise KeyError(f"the rule gives no value for parameter {name!r}")
    return merged[name].to(device=p.device)


def add_into(p: torch.Tensor, before: torch.Tensor, merged: torch.Tensor | Sparse) -> None:
    """p = before + merged, rounded into p's dtype. A Sparse `merged` (zero elsewhere) is
    added at its entries only: p takes `before`, and the sums where merged has values."""
    if isinstance(merged, Sparse) and not bool(merged.fill != 0) and p.is_contiguous():
        p.copy_(before)
        at = merged.support.index
        if merged.dtype == p.dtype:  # one add at each (distinct) position: before + merged
            p.view(-1).scatter_add_(0, at, merged.values)  # (faster than index_add_ here)
            return
        summed = torch.index_select(before.view(-1), 0, at) + merged.values
        p.view(-1).index_copy_(0, at, summed.to(p.dtype))
    else:
        torch.add(before, densify(merged), out=p)


def default_prepare(rule: str) -> str:
    """The preparation of tau that a standard rule implies: `ondare(update, ref, keep=0.1,
    clip=1)` -> `ondare_ref(tau, keep=0.1, clip=1)` (and `onties` -> `onties_ref`)."""
    call = syntax.parse_expression(rule).statements[0].value
    if not (isinstance(call, Call) and isinstance(call.func, Name) and call.func.id in PREPARES):
        raise TypeError("the rule reads `ref`: give prepare=, the expression of `tau` that "
                        'makes it once (e.g. prepare="onties_ref(tau, keep=0.1)", or "tau")')
    target, shared = PREPARES[call.func.id]
    params = [p.name for p in stdlib_scope().functions[call.func.id].params]
    given = {params[i]: arg for i, arg in enumerate(call.args)}
    given.update({kw.name: kw.value for kw in call.kwargs})
    lines = rule.splitlines()
    parts = [f"{name}={_text(lines, given[name])}" for name in shared if name in given]
    return f"{target}({', '.join(['tau', *parts])})"


def _text(lines: list[str], expr: Any) -> str:
    s = expr.span
    if s.line == s.end_line:
        return lines[s.line - 1][s.col - 1:s.end_col - 1]
    return "\n".join([lines[s.line - 1][s.col - 1:], *lines[s.line:s.end_line - 1],
                      lines[s.end_line - 1][:s.end_col - 1]])
