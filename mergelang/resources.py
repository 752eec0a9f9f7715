"""Where the grammar and the standard library live.

Both are data, shipped inside the package (`mergelang/grammar`, `mergelang/stdlib` in an
installed wheel) and kept at the repository root in a checkout (`grammar/`, `stdlib/`),
so that readers find them where DESIGN.md says.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """The installed copy if there is one, else the checkout's top-level folder."""
    for candidate in (_HERE / name, _HERE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"mergelang is installed without its {name}/ folder")


GRAMMAR_FILE = data_dir("grammar") / "mergelang.lark"
STDLIB_DIR = data_dir("stdlib")
