"""mergelang: a small, exact language for merging neural-network models.

    import mergelang
    program = mergelang.load("ties.merge")
    program.check()
    program.run("merged/")
    mergelang.evaluate("base + ties(a - base, b - base, density=0.2)", base=..., a=..., b=...)
    merge = mergelang.expression("base + ties(a - base, b - base, density=d)")
    merge(base=..., a=..., b=..., d=0.3)        # compiled once, called many times
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import Program, Summary, compile, evaluate, expression, load
    from .compiled import Expression
    from .diagnostics import Diagnostic, MergeError

__all__ = ["Program", "Summary", "compile", "load", "evaluate", "expression", "Expression",
           "MergeError", "Diagnostic"]
__version__ = "0.1.0"

# Imported when first used, so that `import mergelang` (which every entry point does
# first) takes no time: the command guards Ctrl-C before torch is imported (startup.py).
_HOMES = {"Program": "api", "Summary": "api", "compile": "api", "load": "api",
          "evaluate": "api", "expression": "api", "Expression": "compiled",
          "MergeError": "diagnostics", "Diagnostic": "diagnostics"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f".{name}", __name__)  # `mergelang.api`, as before
    else:
        raise AttributeError(f"module 'mergelang' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
