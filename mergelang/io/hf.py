"""The Hugging Face folder around the merged weights, and writing it atomically.

A merge is only useful if `from_pretrained` can load it, so the output carries the donor's
config (updated, e.g. for the output dtype), tokenizer and generation files, plus a model card
holding the script that produced it. The folder is built under a hidden temporary name next
to the target and renamed into place only when complete, so an interrupted or failed merge
never leaves something that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from types import TracebackType

from .errors import ModelFileError

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
        (out / "config.json").write_text(text, encoding="utf-8")
    for name in DONOR_FILES:
        source = donor_folder / name
        if source.is_file():
            try:
                shutil.copyfile(source, out / name)
            except OSError as e:
                raise ModelFileError(
                    f"cannot copy {source}: {e.strerror or e}", hint="check the file is readable"
                ) from e


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ModelFileError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(
            f"{path} is not valid JSON ({e})", hint="download the model's config again"
        ) from e
    if not isinstance(value, dict):
        raise ModelFileError(f"{path} is not a JSON object", hint="download the config again")
    return value


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
    (Path(out) / "README.md").write_text(card, encoding="utf-8")


def check_target(target: Path, force: bool) -> None:
    """Refuse an output path that exists (unless `force`) or that is not a folder.

    The CLI calls this before compiling so the refusal comes before any work is done.
    """
    target = Path(target)
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


class OutputFolder:
    """A context manager yielding a temporary folder that becomes `target` on success.

    On an exception the temporary folder is deleted, the target is left as it was, and the
    exception propagates.
    """

    def __init__(self, target: Path, force: bool = False) -> None:
        self.target = Path(os.path.abspath(target))
        self.force = force
        self.temp: Path | None = None

    def __enter__(self) -> Path:
        check_target(self.target, self.force)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.temp = _fresh_sibling(self.target, "tmp")
        except OSError as e:
            raise ModelFileError(
                f"cannot create a folder next to {self.target}: {e.strerror or e}",
                hint="check that the output location exists and is writable",
            ) from e
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
            return False
        self._move_into_place(temp)
        return False

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


def _fresh_name(target: Path, tag: str) -> Path:
    """An unused hidden sibling of `target`, so renames stay on one filesystem."""
    while True:
        candidate = target.with_name(f".{target.name}.{tag}-{secrets.token_hex(4)}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate


def _fresh_sibling(target: Path, tag: str) -> Path:
    """Create and return an empty hidden sibling folder with the usual permissions.

    tempfile.mkdtemp would make it private (0700), and that mode would survive the rename.
    """
    while True:
        candidate = _fresh_name(target, tag)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
