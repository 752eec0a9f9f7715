"""Stopping a run from outside: SIGTERM is handled as Ctrl-C is.

A run stopped by Ctrl-C (KeyboardInterrupt) unwinds normally: the temporary output
folder is deleted, the output lock released, the input files unmapped. A plain
SIGTERM (what `kill`, a container runtime or a job scheduler sends) would instead end
the process on the spot and leave a hidden, full-size temporary folder behind. Raising
`Terminated`, a kind of KeyboardInterrupt, from the handler gives SIGTERM the same
clean path; only the exit status (143, as a shell reports a SIGTERM) and the message
differ. SIGKILL cannot be handled: its leftovers are removed by the next run in the
same place (see hf.OutputFolder).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated in the main thread; the previous handler
    is put back on leaving. Does nothing outside the main thread (Python delivers
    signals there only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


EXIT_BROKEN_PIPE = 128 + 13  # SIGPIPE, as a shell reports a writer whose reader left


def stdout_closed() -> int:
    """After a BrokenPipeError (`mergelang graph x | head`): point stdout at /dev/null so
    the flush at exit does not fail again, and give the status a shell would show."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE
