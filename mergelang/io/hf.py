"""The Hugging Face folder around the merged weights, and writing it atomically.

A merge is only useful if `from_pretrained` can load it, so the output carries the donor's
config (updated, e.g. for the output dtype), tokenizer and generation files, plus a model card
holding the script that produced it. The folder is built under a hidden temporary name next
to the target and renamed into place only when complete, so an interrupted or failed merge
never leaves something that looks like a finished model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from .errors import ModelFileError
from .header import FileIdentity, read_header
from .jsonfile import read_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

DONOR_FILES: tuple[str, ...] = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
"""Files copied unchanged from the donor folder when present; config.json is handled apart."""


def write_donor_files(out: Path, donor_folder: Path | None, config_updates: dict) -> None:
    """Copy the donor's config.json (with `config_updates` applied) and its tokenizer and
    generation files into `out`. Without a donor folder there is nothing to copy."""
    if donor_folder is None:
        return
    out, donor_folder = Path(out), Path(donor_folder)
    config_path = donor_folder / "config.json"
    if config_path.is_file():
        config = _read_json_object(config_path)
        for key, value in config_updates.items():
            config[key] = value
            if key == "torch_dtype" and "dtype" in config:
                config["dtype"] = value
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        write_text(out / "config.json", text)
    for name in DONOR_FILES:
        source = donor_folder / name
        if source.is_file():
            try:
                shutil.copyfile(source, out / name)
            except OSError as e:
                raise ModelFileError(
                    f"cannot copy {source} into the output: {e.strerror or e}",
                    hint="check that the file is readable and the output location has free "
                    "space",
                ) from e


def _read_json_object(path: Path) -> dict:
    value = read_json(path, hint="download the model's config again")
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is not a JSON object", hint="download the config again")
    return value


def write_text(path: Path, text: str) -> None:
    """Write a small output file; a full disk or a read-only folder is a ModelFileError."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ModelFileError(f"cannot write {path}: {e.strerror or e}",
                             hint="check that the output location has free space and is "
                             "writable") from None


def write_model_card(out: Path, script_text: str, script_name: str) -> None:
    """Write README.md: Hub metadata, and the script that made the model, verbatim."""
    fence = "```"
    while fence in script_text:
        fence += "`"
    title = Path(script_name).stem or "merge"
    body = script_text if script_text.endswith("\n") else script_text + "\n"
    card = (
        "---\n"
        "tags:\n"
        "- merge\n"
        "- mergelang\n"
        "library_name: transformers\n"
        "---\n"
        "\n"
        f"# {title}\n"
        "\n"
        f"This model is a merge made with mergelang from the script `{script_name}`:\n"
        "\n"
        f"{fence}merge\n"
        f"{body}"
        f"{fence}\n"
    )
    write_text(Path(out) / "README.md", card)


OUTPUT_FILES: frozenset[str] = frozenset(
    {"README.md", "config.json", "model.safetensors", "model.safetensors.index.json",
     "adapter_config.json", "adapter_model.safetensors", "extraction.json", *DONOR_FILES}
)
"""The names a mergelang output folder holds, besides its numbered shards."""

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_CARD_TAG = "- mergelang"
SCRIPT_KEY = "mergelang_script"
"""The safetensors metadata key under which every output shard carries its script."""

_SUFFIX_ROOM = len(".tmp-4194304-") + 8 + 1
"""Bytes the hidden working names add to the output's name (pid up to 7 digits)."""


def check_target(target: Path | str, force: bool, protect: Iterable[Path | str] = ()) -> None:
    """Refuse an output path that replacing could lose data, or that cannot be made.

    Refused always: the current folder or one of its ancestors (`-o ""` and `-o .` both
    name it), a path that is or contains one of `protect` (the inputs and the script),
    a name too long for the filesystem. Refused unless `force`: an existing folder.
    Refused even with `force`: anything but a folder, and a folder holding anything but
    a previous mergelang output (see `previous_output_problem`). The CLI calls this
    before any work is done, and OutputFolder again under its lock.
    """
    target = Path(target)
    try:
        _check_place(target, protect)
        if not target.exists() and not target.is_symlink():
            return
        if not target.is_dir():
            raise ModelFileError(
                f"output path {target} exists and is not a folder",
                hint="choose another output path",
            )
        if not force:
            raise ModelFileError(
                f"output folder {target} already exists", hint="pass --force to replace it"
            )
        problem = previous_output_problem(target)
        if problem is not None:
            raise ModelFileError(
                f"output folder {target} {problem}; --force replaces only a previous "
                "mergelang output",
                hint="move those files elsewhere, delete the folder yourself if nothing in "
                "it is needed, or choose another output folder",
            )
    except OSError as e:
        raise ModelFileError(
            f"cannot check the output path {target}: {e.strerror or e}",
            hint="check that the output location exists and is readable",
        ) from None
    except ValueError as e:  # an embedded NUL byte
        raise ModelFileError(f"invalid output path {target!r}: {e}",
                             hint="choose another output path") from None


def _check_place(target: Path, protect: Iterable[Path | str]) -> None:
    real = Path(os.path.realpath(target))
    try:
        here = Path(os.path.realpath(Path.cwd()))
    except OSError:  # the current folder was deleted: there is nothing there to protect
        here = None
    if here is not None and (real == here or real in here.parents):
        what = "is the current folder" if real == here else "contains the current folder"
        raise ModelFileError(
            f"output folder {str(target) or '(empty)'} {what}; replacing it would delete it",
            hint='name a new folder, e.g. -o merged (an empty -o, such as an unset "$OUT", '
            "means the current folder)",
        )
    for path in protect:
        kept = Path(os.path.realpath(path))
        if kept == real or real in kept.parents:
            what = "is" if kept == real else "contains"
            raise ModelFileError(
                f"output folder {target} {what} {kept}, which this merge reads",
                hint="choose an output folder outside the input models and the script",
            )
    name_max = _name_max(real.parent)
    length = len(os.fsencode(real.name))
    if length + _SUFFIX_ROOM > name_max:
        raise ModelFileError(
            f"the output folder's name is too long ({length} bytes; at most "
            f"{name_max - _SUFFIX_ROOM} here)",
            hint="choose a shorter name",
        )


def _name_max(folder: Path) -> int:
    """The longest file name the filesystem holding `folder` (or its nearest existing
    ancestor) allows."""
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            try:
                return os.pathconf(candidate, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):
                break
    return 255


def previous_output_problem(folder: Path) -> str | None:
    """None when `folder` is empty or is what a mergelang run writes, else what it holds.

    A previous output is recognised by its contents: only files named as mergelang names
    them (shards, index, config, donor files, README.md), a model card tagged `mergelang`
    as write_model_card writes it, and shards whose metadata carry the script that made
    them (SCRIPT_KEY). Anything else makes --force refuse, so a folder of notes, a model
    downloaded from elsewhere or a home folder is never deleted by a mistyped -o.
    """
    names = sorted(os.listdir(folder))
    if not names:
        return None
    foreign = [n + ("/" if (folder / n).is_dir() else "") for n in names
               if (folder / n).is_symlink() or not (folder / n).is_file()
               or not (n in OUTPUT_FILES or _SHARD.fullmatch(n))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more"
                                          if len(foreign) > 5 else "")
        return f"holds files mergelang did not write: {shown}"
    shards = [n for n in names if n.endswith(".safetensors")]
    if not _has_card(folder / "README.md") or not shards or not all(
            _made_by_mergelang(folder / n) for n in shards):
        return "holds a model that was not written by mergelang (no mergelang model card " \
            "and script in its shards)"
    return None


def _has_card(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return False
    lines = head.splitlines()
    if not lines or lines[0] != "---" or "---" not in lines[1:]:
        return False
    return _CARD_TAG in lines[1:lines.index("---", 1)]


def _made_by_mergelang(path: Path) -> bool:
    try:
        return SCRIPT_KEY in read_header(path).metadata
    except ModelFileError:
        return False


class OutputFolder:
    """A context manager yielding a temporary folder that becomes `target` on success.

    On an exception the temporary folder is deleted, the target is left as it was,
    parent folders made for it are removed again, and the exception propagates.
    While it is open, a lock next to the target (`.NAME.lock`, holding the owner's
    process id) stops a second run from writing the same output; the lock is the
    kernel's (flock), so a killed run never leaves it held. The temporary folder's name
    records the owner's process id, and temporary folders of the same target whose
    owner is no longer running are removed on entry (listed in `notes`).
    """

    def __init__(self, target: Path, force: bool = False,
                 protect: Iterable[Path | str] = ()) -> None:
        self.target = Path(os.path.abspath(target))
        self.force = force
        self.protect = tuple(protect)
        self.temp: Path | None = None
        self.notes: list[str] = []
        self._made: list[Path] = []
        self._lock: _Lock | None = None
        self._weights: dict[Path, FileIdentity] = {}

    def __enter__(self) -> Path:
        check_target(self.target, self.force, self.protect)
        try:
            self._made = _make_parents(self.target.parent)
            self._lock = _Lock.take(self.target)
            check_target(self.target, self.force, self.protect)  # again, now that it is ours
            self.notes = _remove_stale(self.target)
            self._weights = _weight_files(self.protect)
            while True:  # named before it is made, so an interrupt cannot orphan it
                self.temp = _fresh_name(self.target, "tmp")
                try:
                    self.temp.mkdir()  # the usual permissions (mkdtemp's 0700 would stay)
                    break
                except FileExistsError:
                    continue
        except BaseException as e:
            if self.temp is not None:
                shutil.rmtree(self.temp, ignore_errors=True)
                self.temp = None
            self._release(failed=True)
            if isinstance(e, OSError):
                raise ModelFileError(
                    f"cannot create a folder next to {self.target}: {e.strerror or e}",
                    hint="check that the output location exists and is writable",
                ) from e
            raise
        return self.temp

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        temp, self.temp = self.temp, None
        if temp is None:
            return False
        if exc_type is not None:
            shutil.rmtree(temp, ignore_errors=True)
            self._release(failed=True)
            return False
        try:
            _check_unchanged(self._weights)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            self._release(failed=True)
            raise
        try:
            self._move_into_place(temp)  # on failure it says where the finished model is
        except BaseException:
            self._release(failed=True)
            raise
        self._release(failed=False)
        return False

    def _release(self, failed: bool) -> None:
        """Drop the lock; after a failure, also the empty parent folders made for it."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()
        if failed:
            for folder in reversed(self._made):
                try:
                    folder.rmdir()
                except OSError:
                    break
        self._made = []

    def _move_into_place(self, temp: Path) -> None:
        target = self.target
        kept = f"the finished model is in {temp}; move it by hand"
        exists = target.exists() or target.is_symlink()
        if exists and not self.force:
            raise ModelFileError(f"output folder {target} appeared while merging", hint=kept)
        old = _fresh_name(target, "old") if exists else None
        try:
            if old is not None:
                os.rename(target, old)
            try:
                os.rename(temp, target)
            except OSError:
                if old is not None:
                    os.rename(old, target)
                raise
        except OSError as e:
            raise ModelFileError(
                f"cannot move the output into {target}: {e.strerror or e}", hint=kept
            ) from e
        if old is None:
            return
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def _weight_files(paths: Iterable[Path | str]) -> dict[Path, FileIdentity]:
    """The identity of each .safetensors file among `paths`, as the merge starts."""
    found = {}
    for path in map(Path, paths):
        if path.suffix == ".safetensors":
            with contextlib.suppress(OSError):
                found[path] = FileIdentity.of(os.stat(path))
    return found


def _check_unchanged(weights: dict[Path, FileIdentity]) -> None:
    """The last check before a finished output is moved into place: no input weight file
    was truncated, rewritten or replaced while the merge ran (a change after the last
    tensor was read is caught here, not by the reader)."""
    for path, before in weights.items():
        try:
            now = FileIdentity.of(os.stat(path))
        except OSError:
            now = None
        if now != before:
            raise ModelFileError(
                f"{path} changed while the merge was reading it; the output was discarded",
                hint="leave the input models unchanged until the merge has finished, then "
                "run it again",
            )


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing ancestors; the ones created, outermost first."""
    missing: list[Path] = []
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    made: list[Path] = []
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError:
            for done in reversed(made):
                with contextlib.suppress(OSError):
                    done.rmdir()
            raise
        made.append(candidate)
    return made


class _Lock:
    """An exclusive flock on `.NAME.lock` beside the output, removed when released."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def take(cls, target: Path) -> _Lock:
        path = target.with_name(f".{target.name}.lock")
        if fcntl is None:  # no flock here (Windows): runs are not serialised
            return cls(path, None)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise ModelFileError(
                    f"another mergelang run (process {owner}) is writing {target}",
                    hint="wait for it to finish, or choose another output folder",
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder removed it as we opened it: take the new one
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return cls(path, fd)
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)
        self.fd = None


def _remove_stale(target: Path) -> list[str]:
    """Remove temporary folders of `target` left by runs that are no longer running
    (killed, or stopped by power loss); what was removed, for the user to read."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[0-9a-f]{{8}}")
    notes = []
    for entry in sorted(target.parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(match.group(1))
        if _running(pid):
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        notes.append(f"removed {entry} ({size} bytes), left by an earlier run (process {pid}) "
                     "that did not finish")
    return notes


def _running(pid: int) -> bool:
    """Whether process `pid` exists (conservatively yes when that cannot be told)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True
    return True


def _fresh_name(target: Path, tag: str) -> Path:
    """An unused hidden sibling of `target` that records this process's id, so renames
    stay on one filesystem and a later run can tell whether its owner still runs."""
    while True:
        candidate = target.with_name(
            f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate

