"""OnDAREAdamW and OnTIESAdamW: the merge rules of stdlib/online.merge, applied inside AdamW
without the compiler, on the sparse task vector.

Each computes what the language rule computes (`ondare(update, ref, ...)`,
`onties(update, ref, ...)`), entry for entry, but touches the dense update only where it
must: OnDARE gathers the kept entries of the update and scatters them back, and adds
alpha * tau at tau's kept positions only; OnTIES trims the update in place, in blocks, and
elects signs only at tau's kept positions (elsewhere tau is zero, so the update's own sign
wins and the update is kept). See docs/online.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..ops.online import keep_random, kept_positions, random_key, top_fraction_
from ..reduce import Chunk, RandomStream
from .adamw import OnlineAdamW, update_of
from .monitor import Tally

_DEFAULT: Any = object()


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, not {value!r}")
    return value


def _l1_ratio(before: torch.Tensor, after: torch.Tensor, variant: str, eps: float
              ) -> float | None:
    """The L1 rescale after a mask. "paper": ‖before‖₁ / ‖after‖₁ in float64, none when
    either is below 1e-7 (stdlib's match_norm). "reference": the reference code's
    ‖before‖₁ / (‖after‖₁ + eps) in the tensor's dtype, none when ‖before‖₁ < 1e-8."""
    if variant == "reference":
        org, new = before, after.abs().sum()
        return float(org / (new + eps)) if float(org) >= 1e-8 else None
    org, new = float(before), float(after.abs().sum(dtype=torch.float64))
    return org / new if org >= 1e-7 and new >= 1e-7 else None


def _norm1(x: torch.Tensor, variant: str) -> torch.Tensor:
    return x.abs().sum() if variant == "reference" else x.abs().sum(dtype=torch.float64)


def _ref_at(state: dict, flat: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the kept task vector's positions or None when it is dense, its values), or
    (None, None) without a task vector."""
    if "ref_values" not in state:
        return None, None
    index = state.get("ref_index")
    values = state["ref_values"].reshape(-1).to(flat.dtype)  # float32 updates of bf16 params
    return index, values


def _add_at(flat: torch.Tensor, at: torch.Tensor, values: torch.Tensor) -> None:
    """flat[at] += values (distinct positions), rounded once into flat's dtype (a float32
    update of a bfloat16 parameter is added in float32, as the dense p.add_ does)."""
    if values.dtype == flat.dtype:
        flat.index_add_(0, at, values)
    else:
        flat[at] = (flat[at].to(values.dtype) + values).to(flat.dtype)


class OnDAREAdamW(OnlineAdamW):
    """AdamW with online DARE merging (Lu et al. 2024; the reference code's ODAdamW):

        θ ← θ + (1 - α) · F(Δ) + α · F(τ),    τ = reference - base,

    Δ the step's AdamW update, F a random mask keeping each entry with probability `keep`
    and dividing it by keep, drawn afresh for Δ at every step (seed + step) and once for τ,
    when the optimizer starts (only F(τ)'s entries are kept in memory).

    Arguments beyond torch.optim.AdamW's (lr, betas, eps, weight_decay):
      reference, base: the SFT and pretrained models (Hugging Face folders, .safetensors
          files, state dicts or modules); none: no τ, the update is only sparsified.
      keep (0.01), alpha (1e-7): per parameter group too.
      every (1): merge every k steps, the k updates summed (k-step merging).
      seed (0); variant ("paper" | "reference"); rescale ("density" | "l1" | "none");
      clip (None; 1.0 with variant="reference"): clamp F(τ), and an l1-rescaled update,
          to [-clip, clip].
    Parameters must be given with names (model.named_parameters(), or names=).
    """

    rule = "ondare"

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                 weight_decay: float | None = None, *, rescale: str = "density",
                 clip: float | None = _DEFAULT, variant: str = "paper", **kwargs: Any):
        _choice("rescale", rescale, ("density", "l1", "none"))
        if clip is _DEFAULT:
            clip = 1.0 if variant == "reference" else None
        if clip is not None and clip < 0:
            raise ValueError(f"clip must be >= 0, not {clip!r}")
        super().__init__(params, lr, betas, eps, weight_decay, variant=variant,
                         options={"rescale": rescale, "clip": clip}, **kwargs)

    def _prepare(self, tau: torch.Tensor, name: str, group: dict) -> torch.Tensor:
        mode = "none" if self.options["rescale"] == "none" else "density"
        chunk = Chunk.whole(tau, RandomStream(self.seed, name, "ondare.ref"))
        kept = keep_random(tau, group["keep"], mode, chunk=chunk)
        clip = self.options["clip"]
        return kept if clip is None else kept.clamp_(-clip, clip)

    def _apply(self, p: torch.Tensor, delta: torch.Tensor, state: dict, name: str,
               group: dict, step: int, tally: Tally | None) -> None:
        keep, rescale, clip = group["keep"], self.options["rescale"], self.options["clip"]
        flat = delta.view(-1)
        index, ref = _ref_at(state, flat)
        alpha = group["alpha"] if ref is not None else 0.0
        if tally is not None and ref is not None:
            tally.signs(flat if index is None else flat[index], ref)
        before = _norm1(flat, self.variant) if rescale == "l1" else None
        kept, at = flat, None
        if keep < 1:
            numel = flat.numel()
            at = kept_positions(random_key(self.seed + step, name, "ondare"), 0, numel, numel,
                                keep).to(flat.device)
            kept = flat[at]
            flat.zero_()
            if rescale != "none":
                kept.div_(keep)
        if before is not None:
            ratio = _l1_ratio(before, kept, self.variant, group["eps"])
            if ratio is not None:
                kept.mul_(ratio)
                if clip is not None:
                    kept.clamp_(-clip, clip)
        if self.variant == "reference":  # the reference code's order: τ first, then F(Δ)
            if at is not None:
                flat[at] = kept
            if alpha:
                self._add_ref(p.view(-1), index, ref, alpha, fused=True)
            if tally is not None:
                merged = delta * (1 - alpha)
                if alpha:
                    self._add_ref(merged.view(-1), index, ref, alpha)
                tally.merged(merged)
            p.add_(delta, alpha=1 - alpha)
            return
        if alpha:
            kept.mul_(1 - alpha)
        if at is not None:
            flat[at] = kept
        if alpha:
            self._add_ref(flat, index, ref, alpha)
        if tally is not None:
            tally.merged(delta)
        p.add_(delta)

    def _apply_sparse(self, p: torch.Tensor, state: dict, name: str, group: dict,
                      step: int) -> bool:
        """F(Δ) is Δ at the kept entries: compute Adam's update there only, from the
        moments, and add it (with alpha * tau, each entry once) where it lands. The same
        bits as _apply on the dense update, without computing or touching the rest."""
        keep, rescale = group["keep"], self.options["rescale"]
        if keep >= 1 or rescale == "l1" or not p.is_contiguous():
            return False
        numel = p.numel()
        at = kept_positions(random_key(self.seed + step, name, "ondare"), 0, numel, numel,
                            keep).to(p.device)
        kept = update_of(state["exp_avg"].view(-1)[at], state["exp_avg_sq"].view(-1)[at],
                         step, group["lr"], group["betas"], group["eps"], self.arithmetic,
                         group["correct_bias"])
        if rescale != "none":
            kept.div_(keep)
        flat = p.view(-1)
        index, ref = _ref_at(state, kept)
        alpha = group["alpha"] if ref is not None else 0.0
        if self.variant == "reference":
            if alpha:
                self._add_ref(flat, index, ref, alpha, fused=True)
            flat.index_add_(0, at, kept.to(p.dtype), alpha=1 - alpha)
            return True
        if alpha:
            kept.mul_(1 - alpha)
            scaled = ref * alpha
            if index is None:  # a dense tau: every entry of p gets one sum
                scaled[at] += kept
                p.add_(scaled.view(p.shape))
                return True
            index = index.long()
            where = torch.searchsorted(index, at).clamp_(max=max(index.numel() - 1, 0))
            both = index[where] == at if index.numel() else torch.zeros_like(at, dtype=bool)
            kept[both] += scaled[where[both]]
            alone = torch.ones_like(index, dtype=torch.bool)
            alone[where[both]] = False
            _add_at(flat, index[alone], scaled[alone])
        _add_at(flat, at, kept)
        return True

    @staticmethod
    def _add_ref(flat: torch.Tensor, index: torch.Tensor | None, ref: torch.Tensor,
                 alpha: float, fused: bool = False) -> None:
        """flat += alpha * ref, at the kept positions. fused: torch's add with alpha (the
        reference code's p.add_(tau, alpha=...)); else alpha * ref is rounded first, as
        the language rule computes it."""
        if fused:
            if index is None:
                flat.add_(ref, alpha=alpha)
            else:
                flat.index_add_(0, index, ref, alpha=alpha)
        elif index is None:
            flat.add_(ref * alpha)
        else:
            flat.index_add_(0, index, ref * alpha)


class OnTIESAdamW(OnlineAdamW):
    """AdamW with online TIES merging (Lu et al. 2024; the reference code's OTAdamW):

        F(Δ) = the top `keep` fraction of Δ by magnitude;  τ' = the same of τ, once;
        s = sign(τ' + F(Δ)) (0 elects +);
        θ ← θ + α · τ' · [sign τ' = s] + (1 - α) · F(Δ) · [sign F(Δ) = s].

    The top fraction is an exact selection (no sort; ties at the cut-off go to the earlier
    entries), computed in place in blocks. Where τ' is zero (all but `keep` of it) the
    update keeps its own sign, so the election runs on τ''s entries only.

    Arguments as OnDAREAdamW's, and
      small ("one"; "all" with variant="reference"): a tensor too small to keep one entry
          (keep * numel < 1) keeps its largest entry, or all of them (the reference code);
      elect ("unweighted" | "weighted"): elect signs from τ' + F(Δ) (the reference code)
          or from α τ' + (1 - α) F(Δ);
      rescale ("none" | "l1"): scale F(Δ) and τ' to the L1 norm before the trim.
    With the unweighted election τ' vetoes the update's disagreeing entries even at
    alpha=0; alpha=0 and keep=1 give plain AdamW only with elect="weighted" or no τ.
    """

    rule = "onties"

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float | None = None,
                 weight_decay: float | None = None, *, small: str = _DEFAULT,
                 elect: str = "unweighted", rescale: str = "none", variant: str = "paper",
                 **kwargs: Any):
        if small is _DEFAULT:
            small = "all" if variant == "reference" else "one"
        options = {"small": _choice("small", small, ("one", "all")),
                   "elect": _choice("elect", elect, ("unweighted", "weighted")),
                   "rescale": _choice("rescale", rescale, ("none", "l1"))}
        super().__init__(params, lr, betas, eps, weight_decay, variant=variant,
                         options=options, **kwargs)

    def _trim(self, x: torch.Tensor, keep: float, name: str, eps: float) -> torch.Tensor:
        before = _norm1(x, self.variant) if self.options["rescale"] == "l1" else None
        top_fraction_(x, keep, self.options["small"], name)
        if before is not None:
            ratio = _l1_ratio(before, x, self.variant, eps)
            if ratio is not None:
                x.mul_(ratio)
        return x

    def _prepare(self, tau: torch.Tensor, name: str, group: dict) -> torch.Tensor:
        return self._trim(tau, group["keep"], name, group["eps"])

    def _apply(self, p: torch.Tensor, delta: torch.Tensor, state: dict, name: str,
               group: dict, step: int, tally: Tally | None) -> None:
        flat = delta.view(-1)
        index, ref = _ref_at(state, flat)
        alpha = group["alpha"] if ref is not None else 0.0
        if tally is not None and ref is not None:
            tally.signs(flat if index is None else flat[index], ref)
        self._trim(delta, group["keep"], name, group["eps"])
        merged = None
        if ref is not None:
            update = flat if index is None else flat[index]
            votes = ref + update if self.options["elect"] == "unweighted" \
                else ref * alpha + update * (1 - alpha)
            sign = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
            merged = (ref * (ref.sign() == sign)) * alpha \
                + (update * (update.sign() == sign)) * (1 - alpha)
        if alpha:
            flat.mul_(1 - alpha)
        if merged is not None:
            if index is None:
                flat.copy_(merged)
            else:
                flat[index] = merged
        if tally is not None:
            tally.merged(delta)
        p.add_(delta)
