"""Exact order statistics of a tensor's values, whole or in row blocks, and where the ties
at a cut-off go: the one selection behind `trim` (TIES's top k, per tensor or over the
whole model), breadcrumbs' band of magnitudes, SCE's top variances and Arcee Fusion's
quartiles.

A selection by rank must give the bits a sort would, whether the tensor comes whole or in
chunks of rows, without holding or sorting the tensor. Each float32 value gets a 32-bit
key that orders like it: a non-negative float's bits, read as an integer, already do (the
exponent lies above the mantissa); a signed value is mapped to [0, 2^32) by flipping all
its bits when it is negative and only the sign bit otherwise. The first sweep counts the
keys' high 16 bits in a 65,536-bin histogram, which tells the bin each wanted rank falls
in; the second counts the low 16 bits of the keys inside those bins, which gives the exact
value at each rank and how many entries are below it and equal to it. A tensor held in one
chunk gets both sweeps in one call. (A one-off timing on a 2.9M-entry bfloat16 delta, two
threads: about 20 ms, against about 60 ms for torch.kthvalue, which also needs a call per
rank.)

Ties are placed as a stable sort would place them: entries equal in value are ordered by
position, row-major and chunk after chunk (and, for a whole-model selection, tensor after
tensor in the plan's order). `take_ties` is that rule; `keep_top` and `keep_band` use it.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .reduce import Chunk, Reduction

_BINS = 1 << 16


class Rank(NamedTuple):
    """What is at one rank of the ascending order of a tensor's values."""

    value: float  # the value at the rank
    less: int     # entries strictly smaller
    equal: int    # entries equal to it, the rank's own included


class Selection(NamedTuple):
    """An `OrderStatistics` result."""

    ranks: dict[int, Rank]  # each wanted rank (ascending, 0-based) and what is there
    nonzero: int | None     # entries with a nonzero value, when the ranks depended on it


class OrderStatistics(Reduction):
    """Exact order statistics of per-entry float32 values over a whole tensor (or, with
    `per_tensor`, over all the tensors of a model).

    values(*tensor arguments) gives the values of a chunk's entries (default: the first
    argument itself); `magnitudes` orders their absolute values, else the values
    themselves. `ranks` are the ascending ranks (0-based) to find, or a function of the
    number of nonzero values that gives them. With `per_tensor`, the second sweep also
    counts, per tensor (`Chunk.tensor`), its entries in the bins of the wanted ranks, so
    each tensor's share of a tie is known (`equal_by_tensor`).
    """

    def __init__(self, numel: int, ranks: Sequence[int] | Callable[[int], Sequence[int]],
                 values: Callable[..., torch.Tensor] | None = None, magnitudes: bool = True,
                 per_tensor: bool = False):
        self.numel, self.values = numel, values
        self.magnitudes, self.per_tensor = magnitudes, per_tensor
        self.wanted = ranks if callable(ranks) else None
        self.ranks: list[int] = [] if callable(ranks) else self._check(ranks)
        self.nonzero = 0
        self.sweep = 0
        self.high: torch.Tensor | None = None
        self.bin_of: dict[int, int] = {}                # wanted rank -> its bin
        self.below: dict[int, int] = {}                 # bin -> entries in lower bins
        self.low: dict[int, torch.Tensor | None] = {}   # bin -> histogram of its low bits
        self.low_of: dict[int, int] = {}                # wanted rank -> its low 16 bits
        self.tensors: dict[str, dict[int, torch.Tensor]] = {}  # in the order first seen
        self.found: dict[int, Rank] | None = None
        if self.wanted is None and not self.ranks:
            self.found = {}

    def _check(self, ranks: Sequence[int]) -> list[int]:
        wanted = sorted(set(ranks))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < self.numel:
            raise ValueError(f"ranks {wanted} are not all in [0, {self.numel})")
        return wanted

    def sweeps(self, chunks: int) -> int:
        if self.found is not None:
            return 0
        return 1 if chunks == 1 else 2

    def add(self, *args) -> None:
        *tensors, chunk = args
        if self.per_tensor:
            self.tensors.setdefault(chunk.tensor, {})
        if self.found is not None:
            return
        v = (self.values(*tensors) if self.values is not None else tensors[0]).detach()
        v = v.float().reshape(-1)
        if self.magnitudes:
            v = v.abs()
        keys = _keys(v, self.magnitudes)
        if self.sweep == 1:
            self._count_low(keys, chunk)
            return
        if self.wanted is not None:
            self.nonzero += int((v != 0).sum())
        self.high = _count(self.high, keys >> 16, _BINS)
        if keys.numel() == self.numel:  # the whole tensor at once: its second sweep now
            if self._choose_bins():
                self._count_low(keys, chunk)
                self._finish()

    def finish_sweep(self) -> bool:
        if self.found is not None:
            return True
        if self.sweep == 0:
            return not self._choose_bins()
        self._finish()
        return True

    def _choose_bins(self) -> bool:
        """After the first sweep: the bin of each wanted rank. False when none is wanted."""
        if self.wanted is not None:
            self.ranks = self._check(self.wanted(self.nonzero))
        if not self.ranks:
            self.found = {}
            return False
        high = self.high if self.high is not None else torch.zeros(_BINS, dtype=torch.int64)
        through = high.cumsum(0)
        for r in self.ranks:
            b = self.bin_of[r] = int(torch.searchsorted(through, r, right=True))
            self.below[b] = int(through[b]) - int(high[b])
            self.low[b] = None
        self.sweep = 1
        return True

    def _count_low(self, keys: torch.Tensor, chunk: Chunk | None) -> None:
        """Count the low 16 bits of the keys in each wanted bin: keys below the bin go to
        slot 0, those above to the last slot (a clamp costs less than gathering the
        bin's entries, which can be a tenth of a tensor of bfloat16 deltas)."""
        own = self.tensors[chunk.tensor] if self.per_tensor else None
        for b in self.low:
            slots = (keys - (b << 16)).clamp_(-1, _BINS).add_(1)
            counts = _count(None, slots, _BINS + 2)
            self.low[b] = counts if self.low[b] is None else self.low[b].add_(counts)
            if own is not None and counts[1:-1].any():
                own[b] = counts.clone() if b not in own else own[b].add_(counts)

    def _finish(self) -> None:
        found = {}
        for r in self.ranks:
            b = self.bin_of[r]
            counts = self.low[b]
            low = counts[1:-1] if counts is not None else torch.zeros(_BINS, dtype=torch.int64)
            through = low.cumsum(0) + self.below[b]
            j = int(torch.searchsorted(through, r, right=True))
            found[r] = Rank(_value((b << 16) | j, self.magnitudes),
                            int(through[j]) - int(low[j]), int(low[j]))
            self.low_of[r] = j
        self.found = found

    def result(self) -> Selection:
        assert self.found is not None
        return Selection(self.found, self.nonzero if self.wanted is not None else None)

    def partial(self) -> dict:
        """The histograms so far (high bits; in the second sweep, the low bits of the wanted
        bins), the nonzero count, and the tensors fed, in order, each with its own low-bit
        counts (only where nonzero: a tensor rarely has many entries in a wanted bin)."""
        return {"high": self.high, "nonzero": self.nonzero, "low": dict(self.low),
                "tensors": {name: {b: _sparse(c) for b, c in bins.items()}
                            for name, bins in self.tensors.items()}}

    def merge(self, partials: Sequence[dict]) -> None:
        """Take from each partial what this reduction's current sweep counts: the high bits
        and nonzero count in the first, the low bits of the wanted bins in the second."""
        for p in partials:
            for name, bins in p["tensors"].items():
                own = self.tensors.setdefault(name, {}) if self.per_tensor else {}
                for b, sparse in bins.items() if self.sweep == 1 and self.per_tensor else ():
                    dense = _dense(sparse)
                    own[b] = dense if b not in own else own[b].add_(dense)
            if self.found is not None:
                continue
            if self.sweep == 0:
                self.nonzero += p["nonzero"]
                if p["high"] is not None:
                    self.high = p["high"].clone() if self.high is None \
                        else self.high.add_(p["high"])
                continue
            for b, counts in p["low"].items():
                if counts is not None and b in self.low:
                    self.low[b] = counts.clone() if self.low[b] is None \
                        else self.low[b].add_(counts)

    def equal_by_tensor(self, rank: int) -> dict[str, int]:
        """With `per_tensor`: each tensor's count of entries equal to the value at `rank`,
        in the order the tensors were first seen."""
        assert self.found is not None and self.per_tensor
        b, j = self.bin_of[rank], self.low_of[rank]
        return {name: int(bins[b][1 + j]) if b in bins else 0
                for name, bins in self.tensors.items()}


def _keys(v: torch.Tensor, magnitudes: bool) -> torch.Tensor:
    """Keys in [0, 2^32) that order like the float32 values `v` (int32 for magnitudes,
    whose sign bit is clear; int64 for signed values)."""
    bits = v.view(torch.int32)
    if magnitudes:
        return bits
    bits = bits.long() & 0xFFFFFFFF
    return torch.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))


def _value(key: int, magnitudes: bool) -> float:
    bits = key if magnitudes else key - (1 << 31) if key >= 1 << 31 else 0xFFFFFFFF - key
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _count(histogram: torch.Tensor | None, keys: torch.Tensor, bins: int) -> torch.Tensor:
    """histogram (a new one when None) plus the counts of keys in [0, bins), on the CPU."""
    if histogram is None:
        histogram = torch.zeros(bins, dtype=torch.int64)
    if keys.numel() >= bins // 4:
        histogram += torch.bincount(keys, minlength=bins).cpu()
    elif keys.numel():
        histogram.index_add_(0, keys.long().cpu(), torch.ones(keys.numel(), dtype=torch.int64))
    return histogram


def _sparse(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A histogram as (where it is nonzero, the counts there, its length)."""
    where = counts.nonzero().squeeze(1)
    return where, counts[where], counts.numel()


def _dense(sparse: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
    where, values, length = sparse
    return torch.zeros(length, dtype=torch.int64).index_put_((where,), values)


# --- configurations -----------------------------------------------------------------------


def top_cut(numel: int, k: int, at: Rank) -> tuple[float, int, int]:
    """(threshold, room, ties) for keeping the k largest of `numel` values, given what is at
    ascending rank numel - k: keep the values above the threshold and the first `room` of
    the `ties` entries equal to it."""
    above = numel - at.less - at.equal
    return at.value, max(0, k - above), at.equal


class KthMagnitude(OrderStatistics):
    """The cut-off of the k largest |x| of a tensor (trim's): result() is
    (threshold, room, ties), see `top_cut`; everything is kept when k >= numel, nothing
    when k <= 0."""

    def __init__(self, k: int, numel: int, per_tensor: bool = False):
        super().__init__(numel, [numel - k] if 0 < k < numel else [], per_tensor=per_tensor)
        self.k = k

    def result(self) -> tuple[float, int, int]:
        if self.k >= self.numel:
            return -1.0, max(0, self.k - self.numel), 0
        if self.k <= 0:
            return math.inf, 0, 0
        assert self.found is not None
        return top_cut(self.numel, self.k, self.found[self.numel - self.k])


class ModelKthMagnitude(KthMagnitude):
    """KthMagnitude over all the tensors of a task vector (the TIES paper's trim scope):
    two sweeps of the whole model. Entries equal to the threshold are kept in the plan's
    tensor order, then row-major order, so each tensor gets its share of the room."""

    model_wide = True

    def __init__(self, k: int, numel: int):
        super().__init__(k, numel, per_tensor=True)
        self.rooms: dict[str, tuple[int, int]] | None = None

    def result_for(self, tensor: str) -> tuple[float, int, int]:
        """(threshold, room, ties) for one tensor: its share of the entries at the
        threshold."""
        threshold, room, _ = self.result()
        if self.rooms is None:
            self.rooms = {}
            if 0 < self.k < self.numel:
                for name, ties in self.equal_by_tensor(self.numel - self.k).items():
                    self.rooms[name] = (min(ties, room), ties)
                    room -= self.rooms[name][0]
        return (threshold, *self.rooms.get(tensor, (0, 0)))


# --- where ties go ------------------------------------------------------------------------


def take_ties(keep: torch.Tensor, key: torch.Tensor, value: float, first: int, stop: int,
              state: dict, slot: object) -> None:
    """Set in `keep` the entries of this chunk equal to `value` whose place among all the
    tensor's entries equal to it (row-major, counting those of earlier chunks, which
    `state[slot]` carries) is in [first, stop)."""
    equal = (key == value).reshape(-1)
    through = _tie_blocks(equal)
    seen = state.get(slot, 0)
    lo, hi = _tie_at(equal, through, first - seen), _tie_at(equal, through, stop - seen)
    if lo < hi:
        keep.view(-1)[lo:hi].logical_or_(equal[lo:hi])
    state[slot] = seen + (int(through[-1]) if len(through) else 0)


_TIE_BLOCK = 1 << 12


def _tie_blocks(equal: torch.Tensor) -> torch.Tensor:
    """How many entries are True up to the end of each block of _TIE_BLOCK entries (on the
    CPU). Finding the j-th tie from these and one block costs a third of listing every
    tie's position, and a cut-off of bfloat16 deltas can tie a tenth of a tensor."""
    full = equal.numel() - equal.numel() % _TIE_BLOCK
    counts = equal[:full].view(torch.uint8).view(-1, _TIE_BLOCK).sum(1, dtype=torch.int32)
    if full < equal.numel():
        counts = torch.cat([counts, equal[full:].sum(dtype=torch.int32).reshape(1)])
    return counts.cpu().cumsum(0)


def _tie_at(equal: torch.Tensor, through: torch.Tensor, j: int) -> int:
    """The position of the j-th True entry of `equal` (0-based): 0 for j <= 0, the end when
    there are not more than j."""
    if j <= 0:
        return 0
    if not len(through) or j >= int(through[-1]):
        return equal.numel()
    block = int(torch.searchsorted(through, j, right=True))
    before = int(through[block - 1]) if block else 0
    start = block * _TIE_BLOCK
    inside = equal[start:start + _TIE_BLOCK].nonzero().squeeze(1)
    return start + int(inside[j - before])


def keep_top(key: torch.Tensor, threshold: float, room: int, ties: int,
             state: dict) -> torch.Tensor:
    """The entries of this chunk among the top of `key` cut at (threshold, room, ties)
    (see `top_cut`): ties at the cut-off go to the earlier entries, as in a stable
    descending sort."""
    if room >= ties:  # every entry at the threshold is kept
        return key >= threshold
    keep = key > threshold
    if room > 0:
        take_ties(keep, key, threshold, 0, room, state, "top")
    return keep


def keep_band(key: torch.Tensor, ranks: dict[int, Rank], lo: int, hi: int,
              state: dict) -> torch.Tensor:
    """The entries of this chunk whose rank in the stable ascending order of `key` is in
    [lo, hi), given what is at ranks lo and hi - 1."""
    low, high = ranks[lo], ranks[hi - 1]
    keep = (key > low.value) & (key < high.value)
    ends = {"low": low} if low.value == high.value else {"low": low, "high": high}
    for slot, at in ends.items():
        take_ties(keep, key, at.value, lo - at.less, hi - at.less, state, slot)
    return keep
