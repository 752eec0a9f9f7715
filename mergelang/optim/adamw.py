"""The AdamW that the built-in online merging optimizers share: Adam's update computed as a
tensor of its own (the update Δ the merge rule replaces), k-step merging, the reference task
vector loaded and kept sparse, and a state dict that resumes bit-exactly.

Two arithmetics, chosen by `variant` (or `arithmetic=`):

- "torch" (variant="paper"): torch.optim.AdamW's, operation for operation: decoupled
  weight decay p *= 1 - lr * wd before the update, m.lerp_(g, 1 - beta1), the bias
  corrections folded into the denominator, eps added after dividing by sqrt(bc2). With
  alpha=0 and keep=1 a step gives the same bits as torch.optim.AdamW.
- "hf" (variant="reference"): Hugging Face's old AdamW, as the reference code uses it:
  eps added to sqrt(v), both bias corrections folded into the step size, and the decay
  p += -lr * wd * p applied after the (merged) update.

Randomness is a pure function of (seed + step, parameter name, rule), so a run that
resumes from a state dict draws what the uninterrupted run would have drawn: there is no
generator state to save.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .monitor import Monitor, StepStats, Tally
from .sources import Source, ref_bytes, store, task_vectors

VARIANTS = {
    "paper": {"arithmetic": "torch", "eps": 1e-8, "weight_decay": 1e-2},
    "reference": {"arithmetic": "hf", "eps": 1e-6, "weight_decay": 0.0},
}


def advance_moments(grad: torch.Tensor, state: dict, betas: tuple[float, float],
                    arithmetic: str) -> None:
    """Adam's moments, advanced by `grad` in place (torch's lerp, or the old AdamW's
    mul-add)."""
    beta1, beta2 = betas
    if arithmetic == "torch":
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)


def update_of(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, lr: float,
              betas: tuple[float, float], eps: float, arithmetic: str, correct_bias: bool
              ) -> torch.Tensor:
    """Adam's update from the moments (what AdamW adds to the parameter, before weight
    decay), in a new tensor: the one temporary torch.optim.AdamW also makes. Elementwise,
    so the moments may be all of a parameter's or a gathered few. With the "torch"
    arithmetic a bfloat16 or float16 parameter's update is float32 (torch rounds p + update
    once); the "hf" arithmetic stays in the parameter's dtype, as the reference code does."""
    beta1, beta2 = betas
    if arithmetic == "torch":
        denom = exp_avg_sq.sqrt()
        denom.div_((1 - beta2**step) ** 0.5).add_(eps)
        size = -(lr / (1 - beta1**step))
        # p.addcdiv_(m, denom, value=-s) is p + (-s * m) / denom, in float32 at least and
        # rounded once: the update is that tensor, so that adding it to p gives those bits
        if denom.dtype in (torch.float16, torch.bfloat16):
            return exp_avg.float().mul_(size).div_(denom.float())
        zero = torch.zeros((), dtype=denom.dtype, device=denom.device)
        return torch.addcdiv(zero, exp_avg, denom, value=size, out=denom)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
    return torch.div(exp_avg, denom, out=denom).mul_(-step_size)


def adam_update(grad: torch.Tensor, state: dict, lr: float, betas: tuple[float, float],
                eps: float, arithmetic: str, correct_bias: bool) -> torch.Tensor:
    """Advance the moments by `grad` and return Adam's update (see update_of)."""
    advance_moments(grad, state, betas, arithmetic)
    return update_of(state["exp_avg"], state["exp_avg_sq"], state["step"], lr, betas, eps,
                     arithmetic, correct_bias)


class OnlineAdamW(torch.optim.Optimizer):
    """AdamW whose update is replaced by a merge rule (`_prepare`, `_apply`) at every step,
    or every `every` steps. The base of OnDAREAdamW and OnTIESAdamW; see their docstrings
    and docs/online.md for the arguments."""

    rule = ""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                 weight_decay: float | None = None, *, reference: Source | None = None,
                 base: Source | None = None, keep: float = 0.01, alpha: float = 1e-7,
                 every: int = 1, seed: int = 0, variant: str = "paper",
                 arithmetic: str | None = None, correct_bias: bool = True,
                 names: Iterable[tuple[str, torch.Tensor]] | Mapping | None = None,
                 callback: Callable[[StepStats], None] | None = None, stats: bool = False,
                 options: dict[str, Any] | None = None):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))}, "
                             f"not {variant!r}")
        chosen = VARIANTS[variant]
        eps = chosen["eps"] if eps is None else eps
        weight_decay = chosen["weight_decay"] if weight_decay is None else weight_decay
        arithmetic = chosen["arithmetic"] if arithmetic is None else arithmetic
        if arithmetic not in ("torch", "hf"):
            raise ValueError(f'arithmetic must be "torch" or "hf", not {arithmetic!r}')
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError("need lr >= 0, eps >= 0, weight_decay >= 0 and betas in [0, 1)")
        _check_merge(keep, alpha)
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be a whole number >= 1, not {every!r}")
        if (reference is None) != (base is None):
            raise TypeError("give both reference= and base= (tau = reference - base), or "
                            "neither (no task vector: the update is only sparsified)")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias, "keep": keep, "alpha": alpha, "merge": True}
        super().__init__(params, defaults)
        self.every, self.seed, self.variant, self.arithmetic = every, seed, variant, arithmetic
        self.options = dict(options or {})
        self.monitor = Monitor(callback, stats)
        self.names = _names_of(self.param_groups, names)
        if reference is not None:
            self._load(reference, base)

    # --- the rule: subclasses -------------------------------------------------------------

    def _prepare(self, tau: torch.Tensor, name: str, group: dict) -> torch.Tensor:
        """tau as the rule keeps it (sparsified once, at the start)."""
        raise NotImplementedError

    def _apply(self, p: torch.Tensor, delta: torch.Tensor, state: dict, name: str,
               group: dict, step: int, tally: Tally | None) -> None:
        """Add the merge of `delta` (which the rule may overwrite) with the kept task vector
        to p."""
        raise NotImplementedError

    # --- loading --------------------------------------------------------------------------

    def _load(self, reference: Source, base: Source) -> None:
        groups = {id(p): g for g in self.param_groups for p in g["params"]}
        named = [(self.names[id(p)], p) for g in self.param_groups if g["merge"]
                 for p in g["params"]]
        missing = [p for name, p in named if name is None]
        if missing:
            raise TypeError(f"{len(missing)} parameters have no name: pass "
                            "model.named_parameters() (or names=) so that each can be "
                            "matched with its tensor in the reference and base models")
        params = {name: p for name, p in named}
        with torch.no_grad():
            for name, tau in task_vectors(named, reference, base):
                p = params[name]
                kept = self._prepare(tau, name, groups[id(p)])
                self.state[p].update(store(kept, p))

    # --- the step -------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, stepping = begin_step(self.param_groups, closure)
        tally = self.monitor.tally()
        last, merged = 0, False
        for group, p in stepping:
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if self.every > 1:
                    state["cached"] = torch.zeros_like(p, dtype=self._update_dtype(p))
            state["step"] += 1
            last = state["step"]
            merged |= self._step_one(p, state, group, tally)
        self.monitor.emit(tally, last, merged)
        return loss

    def _update_dtype(self, p: torch.Tensor) -> torch.dtype:
        reduced = p.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if reduced and self.arithmetic == "torch" else p.dtype

    def _step_one(self, p: torch.Tensor, state: dict, group: dict, tally: Tally | None
                  ) -> bool:
        """One parameter's step; True when it merged."""
        lr, decay = group["lr"], group["weight_decay"]
        before = self.arithmetic == "torch"
        if before and decay:
            p.mul_(1 - lr * decay)
        step = state["step"]
        merging = group["merge"] and step % self.every == 0
        advance_moments(p.grad, state, group["betas"], self.arithmetic)
        if merging and self.every == 1 and tally is None and \
                self._apply_sparse(p, state, self.names[id(p)] or "", group, step):
            pass  # the rule needed the update at a few entries only, and has applied it
        else:
            delta = update_of(state["exp_avg"], state["exp_avg_sq"], step, lr, group["betas"],
                              group["eps"], self.arithmetic, group["correct_bias"])
            self._apply_dense(p, delta, state, group, step, merging, tally)
        if not before and decay:
            p.add_(p, alpha=-lr * decay)
            if self.every > 1 and not merging and group["merge"]:
                state["cached"].add_(state["cached"], alpha=-lr * decay)
        return merging

    def _apply_sparse(self, p: torch.Tensor, state: dict, name: str, group: dict,
                      step: int) -> bool:
        """Apply the merged update from Adam's moments when the rule needs the update at a
        few entries only (OnDARE's kept entries); False when it needs all of it."""
        return False

    def _apply_dense(self, p: torch.Tensor, delta: torch.Tensor, state: dict, group: dict,
                     step: int, merging: bool, tally: Tally | None) -> None:
        lr, decay = group["lr"], group["weight_decay"]
        before = self.arithmetic == "torch"
        if not group["merge"]:
            p.add_(delta)
        elif self.every > 1:
            cached = state["cached"]
            if before and decay:
                cached.mul_(1 - lr * decay)  # the part of p that the updates made decays too
            if merging:  # back to where the updates started; merge them all at once
                p.sub_(cached)
                delta.add_(cached)
                cached.zero_()
            else:
                p.add_(delta)
                cached.add_(delta)
        if tally is not None:
            tally.update(delta)
        if merging:
            self._apply(p, delta, state, self.names[id(p)] or "", group, step, tally)

    # --- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (per-parameter moments, kept task vectors and k-step sums;
        the groups' hyperparameters) plus the settings that make the draws: resuming from it
        continues bit-exactly."""
        saved = super().state_dict()
        saved["online"] = {"rule": self.rule, "seed": self.seed, "every": self.every,
                           "variant": self.variant, "arithmetic": self.arithmetic,
                           "options": dict(self.options)}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        online = state_dict.pop("online", None)
        if online is not None and online["rule"] != self.rule:
            raise ValueError(f"this state dict is of a {online['rule']} optimizer, not "
                             f"{self.rule}")
        # torch casts every tensor of a parameter's state to the parameter's dtype: keep the
        # kept task vector's int32 positions out of its way
        state = {k: dict(v) for k, v in state_dict["state"].items()}
        positions = {k: v.pop("ref_index") for k, v in state.items() if "ref_index" in v}
        state_dict["state"] = state
        super().load_state_dict(state_dict)
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for key, index in positions.items():
            p = params[saved.index(key)]
            self.state[p]["ref_index"] = index.to(p.device)
        if online is not None:
            self.seed, self.every = online["seed"], online["every"]
            self.variant, self.arithmetic = online["variant"], online["arithmetic"]
            self.options = dict(online["options"])

    def memory(self) -> dict[str, int]:
        """Bytes of optimizer state: Adam's moments ("adam", what AdamW holds too), the kept
        task vectors ("reference") and the k-step sums ("cached")."""
        out = {"adam": 0, "reference": 0, "cached": 0}
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out["adam"] += state[key].numel() * state[key].element_size()
            out["reference"] += ref_bytes(state)
            if "cached" in state:
                out["cached"] += state["cached"].numel() * state["cached"].element_size()
        return out


def begin_step(groups: list[dict], closure: Callable[[], Any] | None
               ) -> tuple[Any, list[tuple[dict, torch.Tensor]]]:
    """What every online step starts with (the built-in classes' and OnlineMerging's):
    the closure's loss, computed with autograd on (step() runs without), and the
    parameters that have a gradient after it, with their groups."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    return loss, [(g, p) for g in groups for p in g["params"] if p.grad is not None]


def _check_merge(keep: float, alpha: float) -> None:
    if not 0 <= keep <= 1:
        raise ValueError(f"keep must be in [0, 1], not {keep!r}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], not {alpha!r}")


def _names_of(groups: list[dict], names: Iterable | Mapping | None) -> dict[int, str | None]:
    """Each parameter's name, by id: from the groups (torch keeps the names of parameters
    given as model.named_parameters()), or from `names` (pairs of name and parameter)."""
    given: dict[int, str] = {}
    if names is not None:
        pairs = names.items() if isinstance(names, Mapping) else names
        given = {id(p): n for n, p in pairs}
    out: dict[int, str | None] = {}
    for group in groups:
        for i, p in enumerate(group["params"]):
            in_group = group.get("param_names")
            out[id(p)] = given.get(id(p)) or (in_group[i] if in_group else None)
    return out

