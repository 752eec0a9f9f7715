"""A model source whose vocabulary-indexed tensors present the output's vocabulary.

`AlignedSource` wraps any ModelSource (a checkpoint, an in-memory model, another
wrapper): the embedding and head tensors report the output's row count, and each
requested block of rows is gathered from the model's own rows by the row map that
vocabulary alignment made (`mergelang.vocab`). A row the model lacks is filled as its
`Fill` says: zero, the model's mean row, or the mean of rows of other models. Every
other tensor passes through unchanged, so the executor's row blocks work as before.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from dataclasses import dataclass
from typing import Any

import torch

MISSING = -1


@dataclass(frozen=True)
class Fill:
    """What a missing row becomes: `mean` (of this model's rows), else the mean of
    `rows` ((source key, row) pairs, each a row of another model); zero when neither."""

    mean: bool = False
    rows: tuple[tuple[str, int], ...] = ()


class AlignedSource:
    """`inner` with the tensors named in `aligned` re-indexed to `rows` output rows."""

    def __init__(self, inner: Any, aligned: set[str], rows: int, row_map: list[int],
                 fills: dict[int, Fill], peers: dict[str, Any], embedding: str):
        self.inner = inner
        self.aligned = aligned
        self.rows = rows
        self.row_map = torch.tensor(row_map, dtype=torch.long)
        self.fills = fills
        self._filled = sorted(r for r, f in fills.items() if f.mean or f.rows)  # not zero
        self.peers = peers          # source key -> the unwrapped source, for Fill.rows
        self.embedding = embedding  # the input embedding's name, for a tied peer's head
        self.config, self.folder = inner.config, inner.folder
        self.tensors = dict(inner.tensors)
        for name in aligned:
            info = inner.tensors[name]
            row_bytes = info.nbytes // info.shape[0]
            self.tensors[name] = dataclasses.replace(info, shape=(rows, *info.shape[1:]),
                                                     nbytes=row_bytes * rows)
        self._means: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def load(self, name: str, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = None, view: bool = False) -> torch.Tensor:
        if name not in self.aligned:
            return self.inner.load(name, rows, dtype, view)
        start, stop = rows if rows is not None else (0, self.rows)
        info = self.inner.tensors[name]
        dtype = dtype or info.dtype
        index = self.row_map[start:stop]
        out = torch.zeros((stop - start, *info.shape[1:]), dtype=dtype)
        present = index >= 0
        if bool(present.any()):
            wanted = index[present]
            lo, hi = int(wanted.min()), int(wanted.max()) + 1
            part = self.inner.load(name, (lo, hi), dtype, view=True)
            out[present] = part[wanted - lo]
            del part
            self.inner.release(name, (lo, hi))
        filled = self._filled
        for row in filled[bisect.bisect_left(filled, start):bisect.bisect_left(filled, stop)]:
            out[row - start] = self._fill(name, self.fills[row]).to(dtype)
        return out

    def _fill(self, name: str, fill: Fill) -> torch.Tensor:
        if fill.mean:
            with self._lock:
                if name not in self._means:
                    whole = self.inner.load(name, None, torch.float32, view=True)
                    self._means[name] = whole.mean(dim=0)
                return self._means[name]
        rows = []
        for key, row in fill.rows:
            peer = self.peers[key]
            tensor = name if name in peer.tensors else self._peer_embedding(peer)
            rows.append(peer.load(tensor, (row, row + 1), torch.float32)[0])
        return torch.stack(rows).mean(dim=0)

    def _peer_embedding(self, peer: Any) -> str:
        """A peer without this head has tied embeddings: its head is its embedding."""
        from ..vocab import embedding_name

        return embedding_name(peer) or self.embedding

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        if name not in self.aligned:   # aligned rows were copied and released on load
            self.inner.release(name, rows)

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
