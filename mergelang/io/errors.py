"""The one error the I/O layer raises for a model it cannot use.

The I/O layer knows paths, shards and tensor names but not the script that named the model,
so it reports what went wrong and a likely fix; the compiler attaches the source span.
"""

from __future__ import annotations


class ModelFileError(Exception):
    """A model folder or file that cannot be read (or an output folder that cannot be made)."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message
