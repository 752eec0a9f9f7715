"""The primitives of online merging (stdlib/online.merge, mergelang.optim): a random keep
mask drawn sparsely, a top fraction with the reference code's rule for tiny tensors, and a
symmetric clamp.

An optimizer applies these at every step, to every parameter, so their cost is the point:

- `keep_random` keeps each entry with probability `keep`, as `drop` does, but draws the
  positions of the kept entries instead of one uniform number per entry: per page of
  RANDOM_PAGE entries, a binomial count and then that many distinct positions. That is the
  same distribution (independent Bernoulli(keep) entries) at a cost that grows with the
  kept entries, about a tenth of `drop`'s at keep=0.01. Each page has its own generator,
  keyed by (seed, tensor name, call site, page), so a tensor computed whole or in row
  blocks gets the same mask.
- `top_fraction` is `trim` (an exact radix selection, no sort) with the choice the
  reference code makes when keep * numel < 1: keep everything.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..reduce import RANDOM_PAGE, Chunk, RandomStream, reduce_whole
from ..sparse import Sparse, densify, gather
from . import PRIMITIVES, Param, primitive
from .common import FRACTION, NON_NEGATIVE
from .sparsify import top_mask

KEEP = Param("keep", "number", range=FRACTION)


def _page_generator(key: str, page: int) -> np.random.Generator:
    digest = hashlib.blake2b(f"{key}\0keep\0{page}".encode(), digest_size=8).digest()
    return np.random.Generator(np.random.SFC64(int.from_bytes(digest, "little")))


def kept_positions(key: str, offset: int, count: int, numel: int, keep: float) -> torch.Tensor:
    """The sorted positions, relative to `offset`, of the entries in [offset, offset + count)
    of a tensor of `numel` entries that a Bernoulli(keep) mask keyed by `key` keeps (int64).

    Each page of RANDOM_PAGE entries draws its count from Binomial(page size, keep) and then
    that many distinct positions, uniformly: together, independent Bernoulli(keep) entries.
    """
    parts = []
    for page in range(offset // RANDOM_PAGE, (offset + count - 1) // RANDOM_PAGE + 1):
        begin = page * RANDOM_PAGE
        size = min(RANDOM_PAGE, numel - begin)
        generator = _page_generator(key, page)
        chosen = generator.choice(size, int(generator.binomial(size, keep)), replace=False,
                                  shuffle=False)
        chosen.sort()
        chosen += begin - offset
        if begin < offset or begin + size > offset + count:  # a page the chunk cuts
            chosen = chosen[(chosen >= 0) & (chosen < count)]
        parts.append(chosen)
    joined = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return torch.from_numpy(joined.astype(np.int64, copy=False))


def random_key(seed: int, tensor_name: str, site: str) -> str:
    """The key of the draws of one tensor at one call site (as the executor makes it)."""
    return RandomStream(seed, tensor_name, site).key


def _keep_random_sparse(x: torch.Tensor | Sparse, keep: float, rescale: str = "density", *,
                        chunk: Chunk) -> torch.Tensor | Sparse:
    """keep_random's values as a Sparse (x dense or Sparse): the same draws, the kept
    entries only."""
    if keep >= 1:
        return x
    at = kept_positions(chunk.random.key, chunk.offset, x.numel(), chunk.numel, keep) \
        if keep > 0 else torch.empty(0, dtype=torch.int64)
    at = at.to(x.device)
    kept = gather(x, at)
    return Sparse(at, kept.div_(keep) if rescale == "density" else kept, x.shape)


@primitive("keep_random", Param("x", "tensor"), KEEP,
           Param("rescale", "string", "density", choices=("density", "none")), random=True,
           sparse=_keep_random_sparse)
def keep_random(x: torch.Tensor, keep: float, rescale: str = "density", *,
                chunk: Chunk) -> torch.Tensor:
    """DARE's random mask, drawn sparsely: keep each entry with probability `keep` and
    divide the kept entries by keep (rescale="density", the DARE paper) or leave them
    (rescale="none"). The same distribution as `drop(x, keep)`, other draws, and a cost
    that grows with the kept entries (see the module's docstring). keep >= 1 returns x.
    """
    if keep >= 1:
        return x
    out = torch.zeros_like(x)
    if keep <= 0:
        return out
    at = kept_positions(chunk.random.key, chunk.offset, x.numel(), chunk.numel, keep)
    at = at.to(x.device)
    kept = x.reshape(-1)[at]
    out.view(-1)[at] = kept.div_(keep) if rescale == "density" else kept
    return out


def keeps_all(numel: int, keep: float, small: str) -> bool:
    """Whether top_fraction keeps every entry: keep >= 1, or the reference code's rule for
    a tensor too small to keep one entry (small="all" and int(keep * numel) < 1)."""
    return keep >= 1 or (small == "all" and int(keep * numel) < 1)


def _top(numel: int, keep: float, small: str):
    if keeps_all(numel, keep, small):
        return None
    return PRIMITIVES["trim"].make_reduction(numel, (keep, "tensor"))


def _top_fraction_sparse(x: torch.Tensor | Sparse, keep: float, small: str = "one", *,
                         chunk: Chunk | None = None) -> torch.Tensor | Sparse:
    """top_fraction's kept entries as a Sparse: the same selection; the entries it drops
    are zeros (x * mask leaves -0.0 for a negative one). A chunk holding NaN or infinite
    entries is computed densely, so that they spread as top_fraction spreads them."""
    numel = x.numel() if chunk is None else chunk.numel
    if keeps_all(numel, keep, small):
        return x
    x = densify(x)
    mask = top_mask(x, keep, chunk)
    if not bool(torch.isfinite(x.sum())):  # a NaN or infinity, or a sum that overflows
        return x * mask
    index = mask.view(-1).nonzero().squeeze(1)
    return Sparse(index, torch.index_select(x.reshape(-1), 0, index), x.shape)


@primitive("top_fraction", Param("x", "tensor"), KEEP,
           Param("small", "string", "one", choices=("one", "all")), reduction=_top,
           sparse=_top_fraction_sparse)
def top_fraction(x: torch.Tensor, keep: float, small: str = "one", *,
                 chunk: Chunk | None = None) -> torch.Tensor:
    """Keep the k = int(keep * numel) entries of largest magnitude, zero the rest: `trim`
    (exact selection; ties at the cut-off go to the earlier entries), with a choice for a
    tensor too small to keep one entry (int(keep * numel) < 1): small="one" keeps the
    largest entry, as trim does; small="all" keeps every entry, as the online merging
    reference code does (it returns before masking).
    """
    numel = x.numel() if chunk is None else chunk.numel
    if keeps_all(numel, keep, small):
        return x
    return PRIMITIVES["trim"].fn(x, keep, "tensor", chunk=chunk)


@primitive("clamp_abs", Param("x", "tensor"), Param("limit", "number", range=NON_NEGATIVE),
           entrywise=True)
def clamp_abs(x: torch.Tensor, limit: float) -> torch.Tensor:
    """x clamped to [-limit, limit] (the reference code's `clip_val` on OnDARE's task vector
    and rescaled updates)."""
    return x.clamp(-limit, limit)


def top_fraction_(x: torch.Tensor, keep: float, small: str = "one", name: str = "",
                  block: int = 1 << 22) -> torch.Tensor:
    """top_fraction computed into x itself, `block` entries at a time, so the selection's
    scratch memory is that of a block, not of the tensor (how mergelang.optim trims an
    update in place). The same bits as top_fraction(x, keep, small)."""
    flat = x.view(-1)
    numel = flat.numel()
    prim = PRIMITIVES["top_fraction"]
    if keeps_all(numel, keep, small):
        return x
    spans = [(i, min(i + block, numel)) for i in range(0, numel, block)]
    reduction = prim.make_reduction(numel, (keep, small))
    if len(spans) == 1:
        stats = reduce_whole(reduction, [flat], Chunk(numel, 0, tensor=name))
    else:
        for _ in range(reduction.sweeps(len(spans))):
            for lo, hi in spans:
                reduction.add(flat[lo:hi], Chunk(numel, lo, tensor=name))
            reduction.finish_sweep()
        stats = reduction.result()
    state: dict = {}
    for lo, hi in spans:
        part = flat[lo:hi]
        part.copy_(prim.fn(part, keep, small, chunk=Chunk(numel, lo, stats, state, None, name)))
    return x
