"""The parser's LALR tables, kept between runs as private JSON so start-up stays quick.

Building the tables from the grammar takes about 0.1 s; loading saved ones, about
0.015 s. lark's own cache (`cache=True`) would do it in less, but it keeps a pickle at a
predictable name in the shared temporary folder and loads it: a file planted there by
another user would run code inside mergelang. Here the tables are JSON (data: loading
it cannot run code) in a folder only this user owns and can write (`cache_folder`),
under a name that hashes the grammar, lark's version and the options, so a changed
grammar never meets stale tables. Any problem with the cache means the tables are
built again, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

import lark
import lark.grammar
import lark.lexer

_FORMAT = 1  # bump when the way tables are written changes


def build_parser(grammar: str, options: dict, postlex: object) -> lark.Lark:
    """A LALR parser for `grammar`, from saved tables when this user has them."""
    key = hashlib.sha256("\0".join(
        [str(_FORMAT), lark.__version__, repr(sorted(options.items())), grammar]
    ).encode()).hexdigest()[:32]
    folder = cache_folder()
    path = folder / f"parser-{key}.json" if folder is not None else None
    parser = _load(path, key, postlex, options) if path is not None else None
    if parser is None:
        parser = lark.Lark(grammar, postlex=postlex, **options)
        if path is not None:
            _save(parser, path, key)
    return parser


def cache_folder() -> Path | None:
    """`$XDG_CACHE_HOME/mergelang` (default `~/.cache/mergelang`), made private (0700),
    or None when there is no such folder that this user alone owns and can write: then
    the tables are built every time rather than trusted to a shared place."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):
        return None
    folder = Path(base) / "mergelang"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode):
            return None
        if hasattr(os, "getuid"):
            if info.st_uid != os.getuid():
                return None
            if info.st_mode & 0o077:
                os.chmod(folder, 0o700)
    except OSError:
        return None
    return folder


def _load(path: Path, key: str, postlex: object, options: dict) -> lark.Lark | None:
    """The parser from tables saved by _save, or None if there are none usable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        mine = not hasattr(os, "getuid") or info.st_uid == os.getuid()
        if not stat.S_ISREG(info.st_mode) or not mine or info.st_mode & 0o022:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            saved = json.loads(f.read())
        if saved.get("key") != key:
            return None
        data, memo = _untag(saved["tables"])
        return lark.Lark._load_from_dict(
            data, memo, postlex=postlex,
            propagate_positions=options.get("propagate_positions", False))
    except Exception:  # a damaged or foreign file: build the tables instead
        return None
    finally:
        os.close(fd)


def _save(parser: lark.Lark, path: Path, key: str) -> None:
    """Write the tables atomically (a private temporary file renamed into place)."""
    data, memo = parser.memo_serialize([lark.lexer.TerminalDef, lark.grammar.Rule])
    data["options"] = {k: v for k, v in data["options"].items() if k != "postlex"}
    text = json.dumps({"key": key, "tables": _tag((data, memo))}, separators=(",", ":"))
    try:
        fd, temp = tempfile.mkstemp(prefix=".parser-", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _tag(value: object) -> object:
    """lark's serialised tables as JSON, keeping what JSON alone would lose: tuples, and
    dictionaries with integer keys ("D", "T", "L" mark dicts, tuples and lists)."""
    if isinstance(value, dict):
        return ["D", [[_tag(k), _tag(v)] for k, v in value.items()]]
    if isinstance(value, tuple):
        return ["T", [_tag(v) for v in value]]
    if isinstance(value, list):
        return ["L", [_tag(v) for v in value]]
    if value is None or type(value) in (bool, int, str):
        return value
    raise TypeError(f"cannot save a {type(value).__name__} in the parser tables")


def _untag(value: object) -> object:
    if not isinstance(value, list):
        return value
    tag, items = value
    if tag == "D":
        return {_untag(k): _untag(v) for k, v in items}
    if tag == "T":
        return tuple(_untag(v) for v in items)
    return [_untag(v) for v in items]
