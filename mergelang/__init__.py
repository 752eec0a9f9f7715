"""mergelang: a small, exact language for merging neural-network models.

    import mergelang
    program = mergelang.load("ties.merge")
    program.check()
    program.run("merged/")
    mergelang.evaluate("base + ties(a - base, b - base, density=0.2)", base=..., a=..., b=...)
    merge = mergelang.expression("base + ties(a - base, b - base, density=d)")
    merge(base=..., a=..., b=..., d=0.3)        # compiled once, called many times
"""

from .api import Program, Summary, compile, evaluate, expression, load
from .compiled import Expression
from .diagnostics import Diagnostic, MergeError

__all__ = ["Program", "Summary", "compile", "load", "evaluate", "expression", "Expression",
           "MergeError", "Diagnostic"]
__version__ = "0.1.0"
