"""Staging: getting a task's inputs in and its results out, off the main thread.

A reader thread loads the next chunk's inputs (converting them to the compute dtype
where that is needed, and copying them to the GPU) while the main thread computes the
current one; a writer thread casts finished chunks to the output dtype and hands them
to the sink. The interpreter (execute.py) sees only `Stager.prefetch`, `Stager.widen`
and `Writer.write`.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .bind import InMemoryModel
from .io.dtypes import FLOAT8
from .ir import Node
from .plan import Plan, TensorPlan
from .schedule import Kernel, Pass
from .sparse import Difference, Sparse

# sink(name, first row, rows of the result in the output dtype, on the CPU)
Sink = Callable[[str, int, torch.Tensor], None]
SMALL = 1 << 18  # elements: read or written on the spot, not by a helper thread
_COUNTING = threading.Lock()


class Loaded:
    """A task's inputs, and the file views among them to release when it is done."""

    def __init__(self) -> None:
        self.tensors: dict[Node, torch.Tensor] = {}
        self.views: set[int] = set()
        self.release: list[tuple[Any, str, tuple[int, int] | None]] = []

    def done(self) -> None:
        for source, name, rows in self.release:
            source.release(name, rows)
        self.release.clear()


class Stager:
    """Loads inputs for one device, on a reader thread."""

    def __init__(self, plan: Plan, device: torch.device):
        self.plan, self.device = plan, device
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="mergelang-read")
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.largest = torch.finfo(plan.compute_dtype).max

    def close(self) -> None:
        self.reader.shutdown()

    def prefetch(self, k: Kernel, p: Pass, rows: tuple[int, int]) -> Future:
        """Start loading a task's inputs on the reader thread; small ones, and tensors the
        caller holds in memory (nothing to read), are loaded right away, where a thread
        hand-off would cost more than the read."""
        if len(p.loads) * (rows[1] - rows[0]) * k.row_numel < SMALL or all(
                isinstance(self.plan.bound.models[n.attr[0]].source, InMemoryModel)
                for n in p.loads):
            done: Future = Future()
            done.set_result(self.load(k, p, rows))
            return done
        return self.reader.submit(self.load, k, p, rows)

    def load(self, k: Kernel, p: Pass, rows: tuple[int, int]) -> Loaded:
        """A task's inputs. On the CPU an input needing no conversion is a view of the
        file's bytes, released once the task is done (see Loaded)."""
        whole = rows == (0, k.rows) or not k.tensor.shape
        loaded = Loaded()
        for node in p.loads:
            key, name = node.attr
            source = self.plan.bound.models[key].source
            part = None if whole else rows
            dtype = self._load_dtype(k, node)
            view = dtype is None and self.copy_stream is None
            tensor = source.load(name, part, dtype, view=view)
            if view:
                loaded.views.add(id(tensor))
                loaded.release.append((source, name, part))
            if isinstance(tensor, (Sparse, Difference)):
                tensor = tensor.to(device=self.device)
            elif self.copy_stream is not None:
                with torch.cuda.stream(self.copy_stream):
                    tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            loaded.tensors[node] = tensor
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        return loaded

    def _load_dtype(self, k: Kernel, node: Node) -> torch.dtype | None:
        """Inputs stay in their stored dtype when it widens exactly to the compute dtype
        (bfloat16 -> float32): the first operation that uses them converts them, and an
        operation with one operand already in the compute dtype promotes the other as
        it goes, which saves a pass and a buffer per input."""
        stored = self.plan.bound.models[node.attr[0]].source.tensors[node.attr[1]].dtype
        compute = self.plan.compute_dtype
        if k.tensor.copy_only:
            return None
        if stored in FLOAT8 or torch.promote_types(stored, compute) != compute:
            return compute
        return None

    def widen(self, value: Any) -> Any:
        """A tensor (or the tensors of a list) in the compute dtype; a number beyond the
        compute dtype's largest as the value IEEE rounds it to there, mostly infinity
        (torch refuses such a number beside a tensor of that dtype: clamp_min(x, 1e39)
        in float32)."""
        if isinstance(value, list):
            return [self.widen(v) for v in value]
        if isinstance(value, (torch.Tensor, Sparse, Difference)) and \
                value.dtype != self.plan.compute_dtype:
            return value.to(self.plan.compute_dtype)
        if isinstance(value, float) and abs(value) > self.largest and value == value:
            return torch.tensor(value, dtype=torch.float64).to(self.plan.compute_dtype).item()
        return value


class Writer:
    """Casts results to their output dtype and hands them to the sink, on a writer
    thread, counting non-finite values on the way."""

    def __init__(self, sink: Sink, non_finite: Counter | None):  # None: no check
        self.sink, self.non_finite = sink, non_finite
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mergelang-write")
        self.pending: deque[Future] = deque()

    def close(self) -> None:
        self.pool.shutdown()

    def write(self, t: TensorPlan, row0: int, part: torch.Tensor | Sparse) -> None:
        if isinstance(part, Sparse):  # after the writes before it: a tensor's blocks
            self.drain(0)             # reach the sink one at a time, in order
        if isinstance(part, Sparse) or part.numel() < SMALL:
            self._cast_and_sink(t, row0, part)
            return
        self.drain(1)
        self.pending.append(self.pool.submit(self._cast_and_sink, t, row0, part))

    def _cast_and_sink(self, t: TensorPlan, row0: int, part: torch.Tensor | Sparse) -> None:
        if isinstance(part, Sparse):
            self._sink_sparse(t, row0, part)
            return
        out = part.to(t.out_dtype).cpu()
        # one reduction finds out whether any value is NaN or infinite (the sum would
        # be); only then are they counted (float8, which torch cannot sum, widened)
        seen = out.float() if out.dtype in FLOAT8 else out
        if self.non_finite is not None and seen.is_floating_point() and seen.numel() \
                and not torch.isfinite(seen.sum()):
            bad = int((~torch.isfinite(seen)).sum())
            if bad:
                with _COUNTING:
                    self.non_finite[t.name] += bad
        self.sink(t.name, row0, out.reshape(-1) if not t.shape else out)

    def _sink_sparse(self, t: TensorPlan, row0: int, part: Sparse) -> None:
        """A Sparse result: its values and fill cast, counted and handed on as a Sparse."""
        out = part.to(t.out_dtype).cpu()
        if self.non_finite is not None and out.is_floating_point():
            wide = out.to(torch.float32) if out.dtype in FLOAT8 else out
            bad = int((~torch.isfinite(wide.values)).sum())
            if not bool(torch.isfinite(wide.fill)):
                bad += out.numel() - len(out.support)
            if bad:
                with _COUNTING:
                    self.non_finite[t.name] += bad
        self.sink(t.name, row0, out)

    def drain(self, keep: int) -> None:
        """Wait until at most `keep` writes are outstanding (raising their errors)."""
        while len(self.pending) > keep:
            self.pending.popleft().result()
