"""Online merging optimizers (mergelang.optim, stdlib/online.merge, ops/online.py): each rule
and option against a closed form on small tensors, AdamW reproduced exactly at alpha=0 and
keep=1 (torch's arithmetic for variant="paper", Hugging Face's old AdamW for "reference"),
k-step merging, bit-exact resumption from a state dict, the compiled-rule wrapper, and real
training loops (plain PyTorch, bf16 parameters, transformers.Trainer)."""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch

import mergelang
from mergelang.ops import PRIMITIVES
from mergelang.ops.online import kept_positions, random_key, top_fraction_
from mergelang.optim import OnDAREAdamW, OnlineMerging, OnTIESAdamW, StepStats
from mergelang.optim.adamw import adam_update
from mergelang.optim.wrapper import default_prepare
from mergelang.reduce import Chunk, RandomStream


def tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))


@pytest.fixture(scope="module")
def models():
    """(base, sft, data): a tiny pretrained model, its fine-tune, and a regression batch."""
    base = tiny()
    sft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    x = torch.randn(32, 6, generator=g)
    y = torch.randn(32, 3, generator=g)
    return base, sft, (x, y)


def train(model, make, data, steps: int, clip: float | None = None):
    """`steps` steps of a plain PyTorch loop; returns the model and its optimizer."""
    opt = make(model)
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def grads_of(model, data):
    x, y = data
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def taus(base, sft):
    b = dict(base.named_parameters())
    return {n: (p - b[n]).detach().float() for n, p in sft.named_parameters()}


# --- the primitives -----------------------------------------------------------------------


def test_keep_random_is_a_bernoulli_mask_the_same_whole_or_in_row_blocks():
    x = torch.randn(300, 1000)  # 300,000 entries: two pages of draws
    stream = RandomStream(7, "w", "site")
    keep_random = PRIMITIVES["keep_random"].fn
    whole = keep_random(x, 0.01, chunk=Chunk.whole(x, stream))
    parts = [keep_random(x[a:b], 0.01, chunk=Chunk(x.numel(), a * 1000, random=stream))
             for a, b in ((0, 37), (37, 262), (262, 300))]
    assert torch.equal(torch.cat(parts), whole)
    kept = whole != 0
    assert abs(kept.float().mean().item() - 0.01) < 0.001
    assert torch.equal(whole[kept], x[kept] / 0.01)
    other = keep_random(x, 0.01, chunk=Chunk.whole(x, RandomStream(8, "w", "site")))
    assert not torch.equal(other != 0, kept)
    assert torch.equal(keep_random(x, 0.5, "none", chunk=Chunk.whole(x, stream)) != 0,
                       (keep_random(x, 0.5, chunk=Chunk.whole(x, stream)) != 0))


def test_top_fraction_keeps_the_largest_and_follows_the_small_tensor_rule():
    x = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1])
    top = PRIMITIVES["top_fraction"].fn
    assert torch.equal(top(x, 0.1), torch.tensor([0.0, -3.0, 0.0, 0.0, 0.0]))  # keeps one
    assert torch.equal(top(x, 0.1, "all"), x)                                 # keeps all
    assert torch.equal(top(x, 0.4, "all"), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))
    y = torch.randn(1000, 70)
    y[3, :10] = 4.0  # ties at the cut-off go to the earlier entries
    blocks = top_fraction_(y.clone(), 0.01, block=4096)
    assert torch.equal(blocks, PRIMITIVES["trim"].fn(y, 0.01))
    assert int((blocks != 0).sum()) == 700


def test_the_language_rules_are_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    update, ref = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g)
    alpha = 0.3
    got = mergelang.evaluate("ondare(update, ref, keep=1, alpha=0.3)", update=update, ref=ref)
    assert torch.equal(got, (1 - alpha) * update + alpha * ref)
    got = mergelang.evaluate("ondare(update, ref, keep=0.2, alpha=0.3)", update=update,
                             ref=ref, seed=5)
    rest = got - alpha * ref
    kept = rest != 0
    assert 0.1 < kept.float().mean() < 0.3
    assert torch.allclose(rest[kept], (1 - alpha) * update[kept] / 0.2)
    trimmed = mergelang.evaluate("top_fraction(update, 0.2)", update=update)
    ref_t = mergelang.evaluate("top_fraction(ref, 0.2)", ref=ref)
    sign = torch.where(ref_t + trimmed >= 0, 1.0, -1.0)
    want = alpha * (ref_t * (ref_t.sign() == sign)) \
        + (1 - alpha) * (trimmed * (trimmed.sign() == sign))
    got = mergelang.evaluate("onties(update, onties_ref(ref, keep=0.2), keep=0.2, alpha=0.3)",
                             update=update, ref=ref)
    assert torch.equal(got, want)
    weighted = torch.where(alpha * ref_t + (1 - alpha) * trimmed >= 0, 1.0, -1.0)
    got = mergelang.evaluate('onties(update, ref, keep=0.2, alpha=0.3, elect="weighted")',
                             update=update, ref=ref_t)
    assert torch.equal(got, alpha * (ref_t * (ref_t.sign() == weighted))
                       + (1 - alpha) * (trimmed * (trimmed.sign() == weighted)))
    clipped = mergelang.evaluate("ondare_ref(tau, keep=0.5, clip=0.1)", tau=ref)
    assert clipped.abs().max() <= 0.1


# --- AdamW reproduced ---------------------------------------------------------------------


def groups_of(model):
    named = list(model.named_parameters())
    return [{"params": [(n, p) for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0,
             "lr": 3e-3}]


def test_alpha_0_keep_1_is_torch_adamw_bit_for_bit(models):
    base, sft, data = models
    want, _ = train(copy.deepcopy(sft), lambda m: torch.optim.AdamW(groups_of(m), lr=1e-2),
                    data, 6, clip=0.5)
    makers = [
        lambda m: OnDAREAdamW(groups_of(m), lr=1e-2, reference=sft, base=base, keep=1.0,
                              alpha=0.0),
        lambda m: OnTIESAdamW(groups_of(m), lr=1e-2, keep=1.0, alpha=0.0),  # no tau
        lambda m: OnTIESAdamW(groups_of(m), lr=1e-2, reference=sft, base=base, keep=1.0,
                              alpha=0.0, elect="weighted"),
    ]
    for make in makers:
        got, _ = train(copy.deepcopy(sft), make, data, 6, clip=0.5)
        assert same(got, want)


def hf_adamw(model, data, steps, lr, eps, decay, betas=(0.9, 0.999)):
    """Hugging Face's old AdamW (the reference code's arithmetic), by hand."""
    moments = {}
    for t in range(1, steps + 1):
        for n, g in grads_of(model, data).items():
            p = dict(model.named_parameters())[n]
            m, v = moments.setdefault(n, (torch.zeros_like(p), torch.zeros_like(p)))
            with torch.no_grad():
                m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                size = lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
                p.add_((m / v.sqrt().add_(eps)) * -size)
                p.add_(p, alpha=-lr * decay)
    return model


def test_reference_variant_at_alpha_0_keep_1_is_the_reference_adamw(models):
    base, sft, data = models
    want = hf_adamw(copy.deepcopy(sft), data, 4, 1e-2, 1e-6, 0.05)
    for cls in (OnDAREAdamW, OnTIESAdamW):
        extra = {"elect": "weighted"} if cls is OnTIESAdamW else {}
        got, opt = train(copy.deepcopy(sft), lambda m, cls=cls, extra=extra: cls(
            m.named_parameters(), lr=1e-2, weight_decay=0.05, reference=sft, base=base,
            keep=1.0, alpha=0.0, variant="reference", **extra), data, 4)
        assert same(got, want) and opt.defaults["eps"] == 1e-6


# --- one step of each rule, closed forms ---------------------------------------------------


def first_update(p, g, lr, eps, arithmetic):
    state = {"step": 1, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return adam_update(g, state, lr, (0.9, 0.999), eps, arithmetic, True)


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("rescale", ["density", "l1"])
def test_one_ondare_step_is_the_closed_form(models, variant, rescale):
    base, sft, data = models
    keep, alpha, lr, eps, seed = 0.25, 0.2, 1e-2, 1e-3, 11
    model = copy.deepcopy(sft)
    grads = grads_of(model, data)
    opt = OnDAREAdamW(model.named_parameters(), lr=lr, eps=eps, weight_decay=0.0,
                      reference=sft, base=base, keep=keep, alpha=alpha, seed=seed,
                      variant=variant, rescale=rescale, clip=0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, tau in taus(base, sft).items():
        kept = PRIMITIVES["keep_random"].fn(
            tau, keep, chunk=Chunk.whole(tau, RandomStream(seed, name, "ondare.ref")))
        kept = kept.clamp(-0.3, 0.3)
        delta = first_update(before[name], grads[name], lr, eps,
                             "torch" if variant == "paper" else "hf").reshape(-1)
        at = kept_positions(random_key(seed + 1, name, "ondare"), 0, delta.numel(),
                            delta.numel(), keep)
        mask = torch.zeros_like(delta, dtype=torch.bool)
        mask[at] = True
        update = torch.where(mask, delta / keep, 0.0)
        if rescale == "l1" and update.abs().sum() > 0:  # the reference: + eps (Adam's)
            new = update.abs().sum() + (eps if variant == "reference" else 0.0)
            update = (update * (delta.abs().sum() / new)).clamp(-0.3, 0.3)
        want = before[name] + ((1 - alpha) * update.reshape(tau.shape) + alpha * kept)
        assert torch.allclose(dict(model.named_parameters())[name], want, atol=1e-7,
                              rtol=1e-6), name


def test_ondare_computes_the_update_at_the_kept_entries_only_with_the_same_bits(models):
    base, sft, data = models
    for variant in ("paper", "reference"):
        for dtype in (torch.float32, torch.bfloat16):
            start = copy.deepcopy(sft).to(dtype)
            batch = tuple(t.to(dtype) for t in data)
            runs = [train(copy.deepcopy(start), lambda m, s=stats, v=variant: OnDAREAdamW(
                m.named_parameters(), lr=1e-2, reference=sft, base=base, keep=0.3, alpha=0.2,
                weight_decay=0.1, variant=v, stats=s), batch, 3)[0]
                for stats in (False, True)]  # statistics need the dense update
            if variant == "paper":
                assert same(*runs), dtype
            else:  # p += (1 - alpha) * update: torch's fused add, rounded its own way
                tol = 1e-7 if dtype == torch.float32 else 4e-3  # an ulp or two
                assert all(torch.allclose(a.float(), b.float(), rtol=0, atol=tol)
                           for a, b in zip(runs[0].parameters(), runs[1].parameters(),
                                           strict=True)), dtype


def reference_onties(before, delta, tau_kept, alpha):
    """The reference code's OnTIES merge, written from its description: sign elected by the
    plain sum of the trimmed task vector and trimmed update, agreeing entries weighted."""
    votes = torch.stack([tau_kept, delta])
    sign = (votes.sum(0) >= 0).long() * 2 - 1
    votes = votes * (votes.sign() == sign)
    weights = torch.tensor([alpha, 1 - alpha]).reshape(2, *[1] * delta.dim())
    return before + (votes * weights).sum(0)


def sort_top(x, keep, small):
    """Top fraction by a stable descending sort (the closed form of the exact selection)."""
    k = int(keep * x.numel())
    if k < 1 and small == "all":
        return x.clone()
    k = max(k, 1)
    order = torch.sort(x.reshape(-1).abs(), descending=True, stable=True).indices[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool)
    mask[order] = True
    return torch.where(mask.reshape(x.shape), x, 0.0)


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_one_onties_step_is_the_closed_form_and_the_reference_step_exactly(models, variant):
    base, sft, data = models
    keep, alpha, lr, eps = 0.1, 0.3, 1e-2, 1e-2  # eps: distinct magnitudes at step 1
    model = copy.deepcopy(sft)
    grads = grads_of(model, data)
    opt = OnTIESAdamW(model.named_parameters(), lr=lr, eps=eps, weight_decay=0.0,
                      reference=sft, base=base, keep=keep, alpha=alpha, variant=variant)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    small = "all" if variant == "reference" else "one"  # the 3-entry bias: int(0.3) < 1
    for name, tau in taus(base, sft).items():
        delta = first_update(before[name], grads[name], lr, eps,
                             "torch" if variant == "paper" else "hf")
        want = reference_onties(before[name], sort_top(delta, keep, small),
                                sort_top(tau, keep, small), alpha)
        assert torch.equal(dict(model.named_parameters())[name], want), name


def test_onties_options_weighted_election_and_l1_rescale(models):
    base, sft, data = models
    keep, alpha, lr, eps = 0.1, 0.3, 1e-2, 1e-2
    model = copy.deepcopy(sft)
    grads = grads_of(model, data)
    opt = OnTIESAdamW(model.named_parameters(), lr=lr, eps=eps, weight_decay=0.0,
                      reference=sft, base=base, keep=keep, alpha=alpha, elect="weighted",
                      rescale="l1")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for name, tau in taus(base, sft).items():
        delta = first_update(before[name], grads[name], lr, eps, "torch")
        d = sort_top(delta, keep, "one")
        d = d * (delta.abs().sum() / d.abs().sum())
        t = sort_top(tau, keep, "one")
        t = t * (tau.abs().sum() / t.abs().sum())
        sign = torch.where(alpha * t + (1 - alpha) * d >= 0, 1.0, -1.0)
        want = before[name] + (alpha * t * (t.sign() == sign)
                               + (1 - alpha) * d * (d.sign() == sign))
        assert torch.allclose(dict(model.named_parameters())[name], want, atol=1e-7), name


# --- k-step merging -----------------------------------------------------------------------


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_k_step_merging_accumulates_and_merges_on_the_kth_step(models, decay):
    base, sft, data = models
    keep, alpha, lr, k = 0.2, 0.3, 1e-2, 3
    adamw = copy.deepcopy(sft)
    opt = torch.optim.AdamW(adamw.parameters(), lr=lr, weight_decay=decay)
    start = {n: p.detach().clone() for n, p in adamw.named_parameters()}
    history = []
    for _ in range(k):
        train_step(adamw, opt, data)
        history.append({n: p.detach().clone() for n, p in adamw.named_parameters()})
    model = copy.deepcopy(sft)
    merged = OnTIESAdamW(model.named_parameters(), lr=lr, weight_decay=decay, reference=sft,
                         base=base, keep=keep, alpha=alpha, every=k)
    for step in range(k):
        train_step(model, merged, data)
        if step < k - 1:  # between merges: plain AdamW, every parameter (no early return)
            assert all(torch.equal(p, history[step][n]) for n, p in model.named_parameters())
    shrink = (1 - lr * decay) ** k
    for name, tau in taus(base, sft).items():
        anchor = start[name] * shrink
        total = history[-1][name] - anchor  # the k updates, decayed as the weights were
        want = reference_onties(anchor, sort_top(total, keep, "one"),
                                sort_top(tau, keep, "one"), alpha)
        got = dict(model.named_parameters())[name]
        assert torch.allclose(got, want, atol=1e-6), name


def train_step(model, opt, data):
    x, y = data
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()


# --- state dicts, resumption ----------------------------------------------------------------


def resumes_exactly(sft, make, data, steps=5, at=3):
    straight, _ = train(copy.deepcopy(sft), make, data, steps)
    first, opt = train(copy.deepcopy(sft), make, data, at)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    again = copy.deepcopy(sft)
    again.load_state_dict(loaded["model"])
    opt2 = make(again)
    opt2.load_state_dict(loaded["opt"])
    x, y = data
    for _ in range(steps - at):
        train_step(again, opt2, data)
    return same(again, straight)


def test_state_dict_round_trip_resumes_bit_exactly(models):
    base, sft, data = models
    makers = [
        lambda m: OnDAREAdamW(m.named_parameters(), lr=1e-2, reference=sft, base=base,
                              keep=0.3, alpha=0.1, seed=3),
        lambda m: OnDAREAdamW(m.named_parameters(), lr=1e-2, reference=sft, base=base,
                              keep=0.3, alpha=0.1, every=2),  # saved inside a window
        lambda m: OnTIESAdamW(m.named_parameters(), lr=1e-2, reference=sft, base=base,
                              keep=0.3, alpha=0.1, variant="reference"),
        lambda m: OnlineMerging(torch.optim.AdamW(m.named_parameters(), lr=1e-2),
                                "ondare(update, ref, keep=0.3, alpha=0.1)", reference=sft,
                                base=base, every=2, seed=4),
    ]
    for make in makers:
        assert resumes_exactly(sft, make, data)
    opt = makers[0](copy.deepcopy(sft))
    with pytest.raises(ValueError, match="of a onties optimizer"):
        opt.load_state_dict(makers[2](copy.deepcopy(sft)).state_dict())


# --- the compiled-rule wrapper --------------------------------------------------------------


def test_online_merging_applies_the_compiled_rule_to_the_inner_update(models):
    base, sft, data = models
    rule = "ondare(update, ref, keep=0.3, alpha=0.2)"
    sgd_model, _ = train(copy.deepcopy(sft), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         data, 1)
    model, opt = train(copy.deepcopy(sft), lambda m: OnlineMerging(
        torch.optim.SGD(m.named_parameters(), lr=0.1), rule, reference=sft, base=base,
        seed=9, batch=200), data, 1)  # batches of a few parameters: the same draws
    ref = mergelang.evaluate("ondare_ref(tau, keep=0.3)", tau=taus(base, sft), seed=9)
    start = {n: p.detach() for n, p in sft.named_parameters()}
    update = {n: p.detach() - start[n] for n, p in sgd_model.named_parameters()}
    merged = mergelang.evaluate(rule, update=update, ref=ref, seed=10)
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name] + merged[name]), name
    assert default_prepare(rule) == "ondare_ref(tau, keep=0.3)"


@pytest.mark.parametrize("rule", ['onties(update, ref, keep=0.2, alpha=0.3, rescale="l1")',
                                  "ondare(update, ref, keep=0.2, alpha=0.3) + 0.5 * update"])
def test_online_merging_of_bfloat16_parameters_reads_each_update_once(models, rule):
    """bfloat16 parameters: the rule widens the update (a view of it in float32) and reads
    it twice, sparsely and whole; the update is still θ after - θ before, taken once."""
    base, sft, data = (m.bfloat16() if isinstance(m, torch.nn.Module) else m
                       for m in (copy.deepcopy(models[0]), copy.deepcopy(models[1]),
                                 models[2]))
    x, y = data
    plain, model = copy.deepcopy(sft), copy.deepcopy(sft)
    for m in (plain, model):
        ((m(x.bfloat16()) - y.bfloat16()).float() ** 2).mean().backward()
    torch.optim.SGD(plain.parameters(), lr=0.1).step()
    opt = OnlineMerging(torch.optim.SGD(model.named_parameters(), lr=0.1), rule,
                        reference=sft, base=base, seed=9, prepare="tau")
    opt.step()
    start = {n: p.detach() for n, p in sft.named_parameters()}
    update = {n: q.detach() - start[n] for n, q in plain.named_parameters()}
    tau = {n: t.bfloat16() for n, t in taus(base, sft).items()}
    merged = mergelang.evaluate(rule, update=update, ref=tau, seed=10)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p, (start[name].float() + merged[name]).bfloat16()), name


def test_online_merging_is_the_rule_at_every_step_whatever_the_batches(models):
    """The rule runs on batches of parameters, on the sparse task vector and the update
    read where it keeps entries: each step is still before + rule (the dense evaluation's
    bits), with the task vector the optimizer holds, also after a state dict brings other
    ones."""
    base, sft, data = models
    rule = "ondare(update, ref, keep=0.5, alpha=0.3)"
    model = copy.deepcopy(sft)

    def make(seed):
        return OnlineMerging(torch.optim.SGD(model.named_parameters(), lr=0.1), rule,
                             reference=sft, base=base, seed=seed, batch=150)  # 3 batches
    opt, other = make(9), make(4)
    for step in range(4):
        if step == 3:  # the other draws of the task vector, loaded into the same optimizer
            opt.load_state_dict(other.state_dict())
        seed = 4 if step == 3 else 9
        ref = mergelang.evaluate("ondare_ref(tau, keep=0.5)", tau=taus(base, sft), seed=seed)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = grads_of(model, data)
        plain = copy.deepcopy(model)
        for n, q in plain.named_parameters():
            q.grad = grads[n]
        torch.optim.SGD(plain.parameters(), lr=0.1).step()
        update = {n: q.detach() - before[n] for n, q in plain.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n]
        opt.step()
        count = step + 1 if step < 3 else 1  # the loaded state's step count
        merged = mergelang.evaluate(rule, update=update, ref=ref, seed=seed + count)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name] + merged[name]), (step, name)


def test_online_merging_runs_a_rule_of_ones_own(models, tmp_path):
    base, sft, data = models
    library = tmp_path / "rules.merge"
    library.write_text("# halfway back toward the task vector's sign\n"
                       "fn steer(update, ref, alpha=0.5) = update + alpha * sign(ref)\n")
    sgd_model, _ = train(copy.deepcopy(sft), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         data, 1)
    model, _ = train(copy.deepcopy(sft), lambda m: OnlineMerging(
        torch.optim.SGD(m.named_parameters(), lr=0.1), "steer(update, ref, alpha=0.01)",
        library=library, prepare="tau", reference=sft, base=base), data, 1)
    start, tau = {n: p.detach() for n, p in sft.named_parameters()}, taus(base, sft)
    for (name, p), q in zip(model.named_parameters(), sgd_model.parameters(), strict=True):
        update = q.detach() - start[name]
        assert torch.allclose(p, start[name] + update + 0.01 * tau[name].sign()), name


def test_parameters_without_a_gradient_are_left_alone_and_one_plan_serves_every_seed(models):
    base, sft, data = models
    makers = [lambda m: OnDAREAdamW(m.named_parameters(), lr=1e-2, reference=sft, base=base,
                                    keep=0.5, alpha=0.1),
              lambda m: OnlineMerging(torch.optim.AdamW(m.named_parameters(), lr=1e-2),
                                      "ondare(update, ref, keep=0.5, alpha=0.1)",
                                      reference=sft, base=base)]
    for make in makers:
        model = copy.deepcopy(sft)
        opt = make(model)
        for step in range(3):
            opt.zero_grad()
            ((model(data[0]) - data[1]) ** 2).mean().backward()
            if step == 2:
                model[2].bias.grad = None
                frozen = model[2].bias.detach().clone()
            opt.step()
        assert torch.equal(model[2].bias, frozen)
    drop = mergelang.expression("drop(x, 0.5)")
    x = torch.randn(50)
    for seed in (1, 2, 3):
        assert torch.equal(drop(x=x, seed=seed), mergelang.evaluate("drop(x, 0.5)", x=x,
                                                                     seed=seed))
    assert drop.cached_plans == 1


def test_a_rule_reads_the_parameters_before_the_step(models):
    base, sft, data = models
    sgd_model, _ = train(copy.deepcopy(sft), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         data, 1)
    model, _ = train(copy.deepcopy(sft), lambda m: OnlineMerging(
        torch.optim.SGD(m.named_parameters(), lr=0.1), "update - 0.25 * before"), data, 1)
    for (name, p), q in zip(model.named_parameters(), sgd_model.parameters(), strict=True):
        start = dict(sft.named_parameters())[name].detach()
        assert torch.equal(p, start + ((q.detach() - start) - 0.25 * start)), name


def test_a_rule_that_fails_leaves_the_parameters_where_the_inner_step_put_them(models):
    """The update is computed in the parameters' memory: a rule that raises gives them back
    (θ_before + update, to rounding), with its own located diagnostic."""
    base, sft, data = models
    sgd_model, _ = train(copy.deepcopy(sft), lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                         data, 1)
    model = copy.deepcopy(sft)
    with pytest.raises(mergelang.MergeError, match=r"density must be in \[0, 1\]"):
        train(model, lambda m: OnlineMerging(torch.optim.SGD(m.named_parameters(), lr=0.1),
                                             "drop(update, 1.5)"), data, 1)
    for p, q in zip(model.parameters(), sgd_model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=0, atol=1e-7)


def test_a_compiled_rule_keeps_no_tensor_of_its_calls():
    """An optimizer calls its rule with new tensors at every step: the cached plan takes
    each call's tensors and lets them go."""
    import gc
    import weakref
    merge = mergelang.expression("a * 2 + b")
    a = torch.randn(64, 8)
    held = weakref.ref(a)
    first = merge(a=a, b=torch.ones(64, 8))
    del a
    gc.collect()
    assert held() is None
    x = torch.randn(64, 8)
    assert torch.equal(merge(a=x, b=first), x * 2 + first) and merge.cached_plans == 1


def test_default_preparation_and_wrapper_errors(models):
    base, sft, _ = models
    assert default_prepare("onties(update, ref, 0.1, small=\"all\", alpha=0.3)") == \
        'onties_ref(tau, keep=0.1, small="all")'
    assert default_prepare("ondare(update, ref, keep=0.01, alpha=1e-7, clip=1)") == \
        "ondare_ref(tau, keep=0.01, clip=1)"
    sgd = torch.optim.SGD(tiny().named_parameters(), lr=0.1)
    with pytest.raises(TypeError, match="give prepare="):
        OnlineMerging(sgd, "update + 0.1 * ref", reference=sft, base=base)
    with pytest.raises(TypeError, match="its inputs are update, ref and before"):
        OnlineMerging(sgd, "update + grad")
    with pytest.raises(TypeError, match="no name"):
        OnlineMerging(torch.optim.SGD(tiny().parameters(), lr=0.1), "update")


# --- memory, statistics, errors --------------------------------------------------------------


def test_the_kept_task_vector_is_sparse(models):
    base = torch.nn.Linear(400, 500)
    sft = copy.deepcopy(base)
    with torch.no_grad():
        sft.weight.add_(torch.randn_like(sft.weight))
    model = copy.deepcopy(sft)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for cls in (OnDAREAdamW, OnTIESAdamW):
        opt = cls(model.named_parameters(), reference=sft, base=base, keep=0.01)
        assert opt.memory()["reference"] <= 0.05 * size  # values and int32 positions
        dense = cls(model.named_parameters(), reference=sft, base=base, keep=0.9)
        assert dense.memory()["reference"] <= size  # more than half kept: stored dense


def test_statistics_reach_a_callback_and_the_log(models, caplog):
    base, sft, data = models
    seen: list[StepStats] = []
    train(copy.deepcopy(sft), lambda m: OnDAREAdamW(
        m.named_parameters(), lr=1e-2, reference=sft, base=base, keep=0.5, alpha=0.1,
        callback=seen.append), data, 3)
    assert [s.step for s in seen] == [1, 2, 3] and all(s.merged for s in seen)
    assert all(0.4 < s.kept < 0.8 and 0 <= s.agreement <= 1 for s in seen)
    assert all(s.update_norm > 0 and s.merged_norm > 0 and s.ref_norm > 0 for s in seen)
    with caplog.at_level(logging.DEBUG, logger="mergelang.optim"):
        train(copy.deepcopy(sft), lambda m: OnTIESAdamW(
            m.named_parameters(), lr=1e-2, reference=sft, base=base, every=2), data, 2)
    assert "step 1 (not merged)" in caplog.text and "step 2: kept" in caplog.text


def test_errors_name_what_is_wrong(models, tmp_path):
    base, sft, _ = models
    model = tiny()
    with pytest.raises(KeyError, match="'0.weight' is not in the reference model"):
        OnDAREAdamW(model.named_parameters(), reference={}, base=base)
    wide = {n: torch.zeros(2) for n, _ in model.named_parameters()}
    with pytest.raises(ValueError, match="has shape .* but .2,. in the base model"):
        OnDAREAdamW(model.named_parameters(), reference=sft, base=wide)
    with pytest.raises(TypeError, match="give both reference= and base="):
        OnTIESAdamW(model.named_parameters(), reference=sft)
    with pytest.raises(TypeError, match="have no name"):
        OnTIESAdamW(model.parameters(), reference=sft, base=base)
    with pytest.raises(ValueError, match="variant must be"):
        OnTIESAdamW(model.named_parameters(), variant="code")
    with pytest.raises(ValueError, match="keep must be in"):
        OnDAREAdamW(model.named_parameters(), keep=2)
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        OnDAREAdamW(model.named_parameters(), reference=tmp_path, base=base)


def test_reference_and_base_from_safetensors_folders(models, tmp_path):
    from safetensors.torch import save_file
    base, sft, data = models
    for name, m in (("base", base), ("sft", sft)):
        (tmp_path / name).mkdir()
        save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                  str(tmp_path / name / "model.safetensors"))
    make = [lambda m, r=r, b=b: OnTIESAdamW(m.named_parameters(), reference=r, base=b,
                                             keep=0.2, alpha=0.1)
            for r, b in ((sft, base), (tmp_path / "sft", tmp_path / "base"))]
    a, _ = train(copy.deepcopy(sft), make[0], data, 2)
    b, _ = train(copy.deepcopy(sft), make[1], data, 2)
    assert same(a, b)


# --- real training --------------------------------------------------------------------------


def test_plain_loops_train_with_clipping_groups_and_bf16(models):
    base, sft, data = models
    x, y = data
    makers = [
        lambda m: OnDAREAdamW(groups_of(m), lr=1e-2, reference=sft, base=base, keep=0.3,
                              alpha=1e-3),
        lambda m: OnTIESAdamW(groups_of(m), lr=1e-2, reference=sft, base=base, keep=0.3,
                              alpha=1e-3),
        lambda m: OnlineMerging(torch.optim.AdamW(groups_of(m), lr=1e-2),
                                "onties(update, ref, keep=0.3, alpha=1e-3)", reference=sft,
                                base=base),
    ]
    for make in makers:
        model, _ = train(copy.deepcopy(sft), make, data, 12, clip=1.0)
        start = ((sft(x) - y) ** 2).mean()
        assert ((model(x) - y) ** 2).mean() < 0.9 * start
    half = copy.deepcopy(sft).to(torch.bfloat16)
    data16 = (x.bfloat16(), y.bfloat16())
    want, _ = train(copy.deepcopy(half), lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
                    data16, 3)
    got, opt = train(copy.deepcopy(half), lambda m: OnDAREAdamW(
        m.named_parameters(), lr=1e-2, reference=sft, base=base, keep=1.0, alpha=0.0),
        data16, 3)
    assert same(got, want)
    assert opt.state[next(got.parameters())]["ref_values"].dtype == torch.bfloat16
    got, _ = train(copy.deepcopy(half), lambda m: OnTIESAdamW(
        m.named_parameters(), lr=1e-2, reference=sft, base=base, keep=0.3), data16, 3)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in got.parameters())


def test_a_transformers_trainer_run_logs_and_resumes(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mergelang.optim import OnlineMergingCallback
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    sft = copy.deepcopy(base)
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 12),
                                                                        generator=g)]

    def run(out, steps, resume=None):
        model = copy.deepcopy(sft)
        named = list(model.named_parameters())
        groups = [{"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.01},
                  {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0}]
        opt = OnTIESAdamW(groups, lr=1e-3, reference=sft.state_dict(), base=base.state_dict(),
                          keep=0.1, alpha=1e-4)
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
            logging_steps=2, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
            max_grad_norm=1.0, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                       optimizers=(opt, None))
        OnlineMergingCallback.attach(trainer, opt)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, trainer = run(tmp_path / "a", 4)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(0 < h["online/kept"] < 1 for h in logged)
    assert all("online/agreement" in h and h["online/ref_norm"] > 0 for h in logged)
    resumed, _ = run(tmp_path / "a", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert same(resumed, straight)
