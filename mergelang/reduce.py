"""What lets a primitive run on a tensor in row blocks and still give the same bits.

Large tensors are computed in chunks of whole rows (see schedule.py). An elementwise
primitive needs nothing for that; two kinds need help, and it is here:

- a per-tensor reduction (TIES's magnitude threshold, DARE's L1 norms) is accumulated
  over the chunks first, in one or two sweeps, by a `Reduction`;
- randomness is drawn per fixed page of elements from a generator seeded by
  (seed, tensor name, call site, page), so a chunk gets the same draws whatever the
  chunk size, tensor order, thread count or device.

A `Chunk` tells a primitive where it is: which elements of the whole tensor it holds,
what the reduction found, and a small state carried from one chunk to the next.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

RANDOM_PAGE = 1 << 18  # elements drawn from one generator


class RandomStream:
    """Uniform [0, 1) draws for the elements of one tensor at one call site.

    Drawn on the CPU with numpy's SFC64 generator (about twice as fast as torch's
    Mersenne Twister here), one generator per page of RANDOM_PAGE elements. The pages are
    independent, and numpy lets go of the GIL while it fills one, so they are drawn on
    torch's number of threads at once (1.75x faster on two cores; DARE spends a third of
    its time here): the same numbers, in the same places."""

    def __init__(self, seed: int, tensor_name: str, site: str):
        self.key = f"{seed}\0{tensor_name}\0{site}"

    def _generator(self, page: int) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.key}\0{page}".encode(), digest_size=8).digest()
        return np.random.Generator(np.random.SFC64(int.from_bytes(digest, "little")))

    def uniform(self, offset: int, count: int, numel: int) -> torch.Tensor:
        """Draws for elements [offset, offset + count) of a tensor of `numel` elements,
        made on the CPU (every device gets the same numbers)."""
        out = np.empty(count, dtype=np.float32)

        def draw(page: int) -> None:
            begin = page * RANDOM_PAGE
            size = min(RANDOM_PAGE, numel - begin)
            lo, hi = max(begin, offset), min(begin + size, offset + count)
            generator = self._generator(page)
            if (lo, hi) == (begin, begin + size):  # the whole page: draw in place
                generator.random(size, dtype=np.float32, out=out[lo - offset:hi - offset])
            else:
                drawn = generator.random(size, dtype=np.float32)
                out[lo - offset:hi - offset] = drawn[lo - begin:hi - begin]

        pages = range(offset // RANDOM_PAGE, (offset + count - 1) // RANDOM_PAGE + 1)
        if len(pages) < 2 or torch.get_num_threads() < 2:
            for page in pages:
                draw(page)
        else:
            for _ in _drawers(torch.get_num_threads(), os.getpid()).map(draw, pages):
                pass
        return torch.from_numpy(out)


@functools.cache
def _drawers(threads: int, pid: int) -> ThreadPoolExecutor:
    """The threads that fill pages of random numbers: one pool per thread count, and per
    process (a forked child has none of its parent's threads)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="mergelang-draw")


@dataclass
class Chunk:
    """Rows [row0, row0 + rows) of a tensor of `numel` elements, as a primitive sees them."""

    numel: int
    offset: int                 # first element of the chunk, row-major
    stats: Any = None           # what this call's reduction found
    state: dict = field(default_factory=dict)  # carried across the chunks of one call, in order
    random: RandomStream | None = None
    tensor: str = ""            # the output tensor's name

    @staticmethod
    def whole(x: torch.Tensor, random: RandomStream | None = None) -> Chunk:
        return Chunk(x.numel(), 0, None, {}, random)


class Reduction:
    """A per-tensor statistic accumulated over the chunks of a tensor, in sweeps.

    A model-wide reduction (`model_wide = True`) is fed the chunks of every tensor of
    the model, in the plan's order, and gives each tensor its share of the result."""

    model_wide = False

    def sweeps(self, chunks: int) -> int:
        """How many sweeps over the tensor it needs when the tensor is in `chunks` chunks."""
        return 1

    def add(self, x: torch.Tensor, chunk: Chunk) -> None:
        raise NotImplementedError

    def finish_sweep(self) -> bool:
        """Called after each sweep; True when the result is known."""
        raise NotImplementedError

    def result(self) -> Any:
        raise NotImplementedError

    # A model-wide reduction can also be fed in parts, by processes that each hold some of
    # the tensors (mergelang.cluster): each part's `partial()` is sent back, and one
    # reduction `merge`s them all before `finish_sweep`. Partials are plain data (numbers,
    # lists, dicts, CPU tensors), never the reduction itself, which holds functions.

    def partial(self) -> Any:
        """What this reduction gathered in its current sweep, as plain picklable data."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fed in parts")

    def merge(self, partials: Sequence[Any]) -> None:
        """Add the current sweep's partials of reductions of the same call, each fed some
        other tensors, as if their chunks had been fed here, partial after partial (where
        the order of the tensors matters, as for ties, give them in the plan's order)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be fed in parts")


def reduce_whole(reduction: Reduction | None, tensors: list, chunk: Chunk | None) -> Any:
    """Run a reduction on tensors held whole (one chunk) and return its result (None for
    no reduction): how a primitive called directly, or the executor on a tensor of one
    chunk, gets what the sweeps would have found."""
    if reduction is None:
        return None
    if reduction.sweeps(1) == 0:
        return reduction.result()
    while True:
        reduction.add(*tensors, chunk)
        if reduction.finish_sweep():
            return reduction.result()


def rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, rest): its first dimension is the row, the unit chunks are made of; a
    scalar is one row."""
    return x.reshape(x.shape[0], -1) if x.dim() > 0 else x.reshape(1, 1)


def row_sums(x: torch.Tensor, dtype: torch.dtype | None = torch.float64) -> list[float]:
    """Per-row sums in `dtype` (None: x's own): the same numbers whatever block of rows x
    came in, to be added exactly (math.fsum)."""
    r = rows(x)
    return (r if dtype is None else r.to(dtype)).sum(1).tolist()


L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: norms below this are not rescaled


class L1Ratio(Reduction):
    """‖first‖₁ / ‖second‖₁ over the whole tensor, 1 when either is below L1_EPS, in one
    sweep: per-row sums of magnitudes, added exactly (math.fsum), so the ratio does not
    depend on how the rows were chunked.

    parts(*tensor arguments, chunk) gives this chunk's (first, second); a boolean `second`
    is a mask on the first: ‖first * mask‖₁. The sums are taken in `dtype`, None for the
    compute dtype (drop's rescale, which has always summed so: float64 would change its
    bits)."""

    def __init__(self, parts: Callable[..., tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype | None = torch.float64):
        self.parts, self.dtype = parts, dtype
        self.first: list[float] = []
        self.second: list[float] = []

    def add(self, *args) -> None:
        self.add_parts(*self.parts(*args))

    def add_parts(self, first: torch.Tensor, second: torch.Tensor) -> None:
        magnitude = rows(first).abs()
        if self.dtype is not None:
            magnitude = magnitude.to(self.dtype)
        self.first += magnitude.sum(1).tolist()
        if second.dtype == torch.bool:
            magnitude *= rows(second)  # |first * mask|, in place
            self.second += magnitude.sum(1).tolist()
        else:
            self.second += row_sums(second.abs(), self.dtype)

    def finish_sweep(self) -> bool:
        return True

    def result(self) -> float:
        return l1_ratio(math.fsum(self.first), math.fsum(self.second))


def l1_ratio(first: float, second: float) -> float:
    return first / second if first >= L1_EPS and second >= L1_EPS else 1.0
