"""`mergelang convert`: a mergekit 0.1.5 YAML config as a readable `.merge` script.

    script = convert(yaml_text, "ties.yml").script
    convert_file(Path("ties.yml"), Path("ties.merge"))

Three stages, one module or two each:

- reading (`reading`, `config`, `params`): the YAML is read with line positions and
  checked into a `Config`; an unknown key, method or parameter is a `MergeError` whose
  span points into the YAML file, shown with a caret like any other diagnostic;
- translation (`translate`, `values`, with the method table in `methods`): mergekit's
  semantics, written out as mergelang expressions: parameter precedence and filters,
  gradients, slices, dtypes, the tokenizer donor;
- emission (`emit`): the statements become a syntax tree (`mergelang.ast`), turned into
  text by the general unparser (`mergelang.unparse`), comments passed alongside.

`METHODS` is the single place that says what each mergekit method becomes;
docs/convert.md is its prose form.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..diagnostics import Diagnostic, Source, error
from .config import read_config
from .methods import MERGEKIT_VERSION, METHODS, MkMethod, MkParam
from .reading import Reader
from .translate import Translator


@dataclass
class Conversion:
    script: str
    warnings: list[Diagnostic] = field(default_factory=list)


def convert(text: str, name: str = "<config>", path: Path | None = None,
            script_dir: Path | None = None) -> Conversion:
    """Convert mergekit YAML text. `path` is the YAML file (its folder, the working
    directory and `script_dir` are searched for local models' config.json)."""
    read = Reader(Source(name, text, path))
    script = Translator(read_config(read), read, script_dir).run()
    return Conversion(script, read.warnings)


def convert_file(config: Path, script: Path | None = None, force: bool = False) -> Conversion:
    """Convert the YAML file `config`; write the script to `script` when given."""
    config = Path(config)
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"cannot read {config}: no such file",
                    hint="give the path of a mergekit YAML config") from None
    except UnicodeDecodeError:
        raise error(f"{config} is not UTF-8 text", hint="a mergekit config is a YAML file") \
            from None
    except OSError as exc:
        raise error(f"cannot read {config}: {exc.strerror}") from None
    if script is not None and Path(script).exists() and not force:
        raise error(f"{script} already exists", hint="pass --force to replace it")
    result = convert(text, str(config), config,
                     Path(script).resolve().parent if script is not None else None)
    if script is not None:
        script = Path(script)
        tmp = script.with_name(f".{script.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(result.script, encoding="utf-8")
            tmp.replace(script)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise error(f"cannot write {script}: {exc.strerror}") from None
    return result


__all__ = ["convert", "convert_file", "Conversion", "METHODS", "MERGEKIT_VERSION", "MkMethod",
           "MkParam"]
