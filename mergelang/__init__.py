"""mergelang: a small, exact language for merging neural-network models.

    import mergelang
    program = mergelang.load("ties.merge")
    program.check()
    program.run("merged/")
    mergelang.evaluate("base + ties(a - base, b - base, density=0.2)", base=..., a=..., b=...)
"""

from .api import Program, Summary, compile, evaluate, load
from .diagnostics import Diagnostic, MergeError

__all__ = ["Program", "Summary", "compile", "load", "evaluate", "MergeError", "Diagnostic"]
__version__ = "0.1.0"
