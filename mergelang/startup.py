"""Ctrl-C while the command starts: a message and exit 130, never a traceback.

The `mergelang` command spends its first second importing torch and the rest; Ctrl-C
then would raise KeyboardInterrupt inside some import and print its traceback. The
entry points (`mergelang` and `python -m mergelang`) call `guard()` before importing
anything heavy: until `cli.main` takes over with its own handling (`release()`), Ctrl-C
prints "interrupted; nothing was written" and ends the process with status 130. Nothing
can have been written by then: the output folder is made only once the run begins.
This module imports only the standard library, so that it is in place at once.
"""

from __future__ import annotations

import os
import signal
import threading

MESSAGE = b"interrupted; nothing was written\n"
EXIT_INTERRUPTED = 130


def _stop(signum: int, frame: object) -> None:
    try:
        os.write(2, MESSAGE)
    finally:
        os._exit(EXIT_INTERRUPTED)  # mid-import, with nothing to clean up


def guard() -> None:
    """Until release(): Ctrl-C prints the message and exits 130 at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop)


def release() -> None:
    """Ctrl-C raises KeyboardInterrupt again (the command's own handling), if guard()
    set it otherwise; a handler someone else installed is left alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is _stop:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main() -> int:
    """The `mergelang` command's entry point."""
    guard()
    from .cli import main as command

    return command()
