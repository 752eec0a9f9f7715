"""`~`: a regular expression matched with a time limit.

The syntax is Python's `re` (lower checks a pattern with `re.compile`, so its errors
read as ever), but the match runs on the `regex` engine, which has the same semantics
for those patterns (its VERSION0) and, unlike `re`, takes a timeout: a pattern that
backtracks without bound (`"aaaa…!" ~ "(a+)+$"`) becomes a located diagnostic instead
of a hang. `regex` is a small, well-kept C extension that transformers already
requires; a worker process per match would cost more than the match.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from .diagnostics import Span, error

LIMIT_S = 2.0
"""The longest one match may take: any sensible pattern on a tensor name takes µs."""


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> Any:
    import regex  # 10 ms of start-up, for scripts that match

    try:
        return regex.compile(pattern, regex.VERSION0)
    except regex.error:  # one `re` accepts and `regex` does not: `re`, unbounded
        return re.compile(pattern)


def search(pattern: str, text: str, span: Span | None) -> bool:
    """Whether `pattern` matches anywhere in `text` (Python's re.search). Raises
    MergeError if the match takes longer than LIMIT_S."""
    compiled = _compiled(pattern)
    if isinstance(compiled, re.Pattern):
        return compiled.search(text) is not None
    try:
        return compiled.search(text, timeout=LIMIT_S) is not None
    except TimeoutError:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise error(f'matching "{shown}" against the regular expression "{pattern}" took '
                    f"more than {LIMIT_S:g} s: the pattern backtracks without bound", span,
                    hint="avoid a repetition inside a repetition such as (a+)+; "
                         "e.g. write a+$") from None
