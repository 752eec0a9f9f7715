"""Tasks on a Dask cluster as the client sees them: submitted one by one or all at once,
answered as they finish, and, when the client stops early (an error, an interrupt),
cancelled and waited for, so that no task goes on writing after the run has given up.

A task answers an `Outcome`: its value, or the diagnostics of a script or input error,
which are raised here as a MergeError (the first one ends the run)."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..diagnostics import Diagnostic, MergeError
from .tasks import Outcome

if TYPE_CHECKING:
    from distributed import Client, Future

STOP_WAIT_S = 30
"""How long a failed or interrupted run waits for tasks already running to stop."""
_POLL_S = 0.05  # how often the client looks for finished tasks (and calls `tick`)


class Pool:
    """Tasks of one client: `submit` them, take their values from `answers()` as they
    finish, and `close()` (also on leaving a `with` block), which cancels the rest.
    `tick()` is called between looks at the tasks (the client's progress display)."""

    def __init__(self, client: Client, tick: Callable[[], None] | None = None):
        from distributed import as_completed

        self.client, self.tick = client, tick
        self.token = secrets.token_hex(4)
        self.pending: dict[str, tuple[Future, Any, str]] = {}  # key -> future, tag, what
        self.finished = as_completed([], loop=client.loop)
        self.ready: deque[Future] = deque()
        self.count = 0

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, fn: Callable[[Any], Outcome], task: Any, tag: Any, what: str) -> None:
        """Run fn(task) on the cluster; its value is answered with `tag`. `what` names the
        task in a diagnostic (when its workers keep dying)."""
        key = f"mergelang-{fn.__name__}-{self.token}-{self.count}"
        self.count += 1
        future = self.client.submit(fn, task, pure=False, key=key)
        self.pending[key] = (future, tag, what)
        self.finished.add(future)

    def __len__(self) -> int:
        return len(self.pending)

    def next(self) -> tuple[Any, Any]:
        """(tag, value) of the next task to finish; MergeError for a task's script or
        input error, or for a task whose worker died too many times."""
        from distributed import KilledWorker

        while not self.ready:
            if not self.pending:
                raise ValueError("no task is left to answer")
            self.ready.extend(self.finished.next_batch(block=False))
            if self.tick is not None:
                self.tick()
            if not self.ready:
                time.sleep(_POLL_S)
        future = self.ready.popleft()
        _, tag, what = self.pending.pop(future.key)
        try:
            outcome = future.result()
        except KilledWorker as exc:
            raise MergeError(_lost(what, exc)) from None
        if outcome.diagnostics:
            raise MergeError(list(outcome.diagnostics))
        return tag, outcome.value

    def answers(self) -> Iterator[tuple[Any, Any]]:
        """(tag, value) of each task as it finishes, until none is left."""
        while self.pending:
            yield self.next()

    def close(self) -> None:
        """Cancel the tasks not finished, and wait (up to STOP_WAIT_S) until no worker
        still runs one: Dask cannot stop a running task, and one that went on writing
        while the run's temporary folder is deleted could leave part of it behind. (One
        still running after that finishes on its own; a later run removes what it left.)"""
        pending, self.pending = self.pending, {}
        if not pending:
            return
        self.client.cancel([future for future, _, _ in pending.values()])
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            try:
                running = self.client.run(_running_any, set(pending), on_error="ignore")
            except Exception:
                return
            if not any(value is True for value in running.values()):
                return
            time.sleep(_POLL_S)


def _running_any(keys: set, dask_worker: Any = None) -> bool:
    """On a worker: whether it is executing one of these tasks."""
    return any(ts.key in keys for ts in dask_worker.state.executing)


def _lost(what: str, exc: Exception) -> Diagnostic:
    return Diagnostic(f"{what} was lost with its Dask worker too many times",
                      notes=(str(exc).splitlines()[0],) if str(exc) else (),
                      hint="a worker that runs out of memory dies: lower --max-memory, or "
                           "give the workers more memory")
