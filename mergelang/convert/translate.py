"""Translation: a checked `Config` -> the statements of a mergelang script.

What mergekit computes is reproduced, not just its names: its inputs (the base model
added to `models`, the base first for slerp-like methods, deltas against the base for the
task-arithmetic family), its parameter precedence (`Parameters.resolve`), its defaults
wherever mergelang's differ (read from the standard library), and its slices (`stack` of
`.layers[a:b]`, gradients over each slice's own layers). The words for what is dropped or
approximated go into the script's head comments and the warnings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from .. import ast
from ..bind import NUM_LAYERS_KEYS
from .config import Config, ModelRef, SliceDef, SourceDef
from .dtypes import dtype_settings, weight_notes
from .emit import Make, Script, text_of, wrap_comment
from .methods import MERGEKIT_VERSION, MkParam
from .params import Const, Params, Value
from .reading import Reader
from .tokenizer import vocab_settings
from .values import Layers, Values

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_NOTE = "Hub id: download it first"


class Translator:
    """Writes the script for one config: its settings, models, bindings and output."""

    def __init__(self, config: Config, read: Reader, script_dir: Path | None):
        self.config = config
        self.method = config.method
        self.read = read
        self.script_dir = script_dir
        self.script = Script(_reserved_names())
        self.values = Values(self.script)
        self.notes: list[str] = []   # head comments, after the standard ones
        self.names: dict[tuple[str, str | None], str] = {}   # model key -> script name
        self.paths: dict[str, str] = {}   # model path -> its comment
        self.plain: set[tuple[str, str | None]] = set()   # the models, adapters aside

    def run(self) -> str:
        """The script's text."""
        config = self.config
        if config.name is not None:
            self.notes.append(f"name: {config.name} (mergekit-mega's name for this merge; "
                              "not used here)")
        if config.chat_template is not None:
            value, key = config.chat_template
            shown = value if len(value) <= 40 and "\n" not in value else "(a template)"
            self.notes.append(f"chat_template: {shown} is not applied: mergelang copies the "
                              "donor's tokenizer files as they are; set the template in the "
                              "output's tokenizer_config.json yourself")
            self.read.warn("chat_template is not applied: the donor's tokenizer files are "
                           "copied as they are", key)
        if config.module is not None:
            self.notes.append(f'modules: the one module "{config.module}" is the merge (its '
                              "parameters between a slice's and the top-level ones)")
        self._settings()
        output = self._output()
        self.notes += weight_notes(self) + self.read.ignored
        self._head()
        return self.script.text(output)

    def _head(self) -> None:
        head = self.script.head
        head += [f"# Converted from {Path(self.read.source.name).name} by `mergelang convert` "
                 f"(mergekit {MERGEKIT_VERSION} semantics).",
                 f"# merge_method: {self.method.name}"]
        if self.method.random:
            head += wrap_comment("Its random masks are drawn by mergelang (see `set seed`), so "
                                 "they differ from mergekit's.")
        hub = {path for path, comment in self.paths.items() if _HUB_NOTE in comment}
        if hub:
            head += wrap_comment("Hugging Face Hub ids are not downloaded: fetch each one first "
                                 "(e.g. `huggingface-cli download ID --local-dir DIR`) and put "
                                 "its folder in model(\"...\").")
        if any(not Path(p).is_absolute() and p not in hub for p in self.paths):
            head += wrap_comment("Relative paths resolve against this script's folder "
                                 "(mergekit's against the working directory).")
        for note in self.notes:
            head += wrap_comment(f"Note: {note}")

    def _settings(self) -> None:
        config = self.config
        dtype_settings(self)
        if config.seed is not None:
            self.script.set("seed", self._at(config.seed[1]).lit(config.seed[0]),
                            "mergekit ignores this key (its seed is --random-seed)")

    def _at(self, node: yaml.Node) -> Make:
        return Make(self.read.span(node))

    # models

    def _name(self, ref: ModelRef, is_base: bool) -> str:
        """The script's name for a model, given (with its `model(...)` line) on first use."""
        if ref.key in self.names:
            return self.names[ref.key]
        plain = None  # the adapted model's own name, where the script has several models
        if ref.lora is not None and len(self.plain) > 1:
            model = ModelRef(ref.path, ref.revision, ref.node)
            base = self.config.base
            plain = self._name(model, base is not None and model.key == base.key)
        if is_base and "base" not in self.script.taken:
            name = "base"
        else:
            stem = (ref.lora or ref.path).rstrip("/").split("/")[-1] or "model"
            stem = re.sub(r"\.safetensors$", "", stem)
            name = re.sub(r"[^0-9a-zA-Z]+", "_", stem).strip("_").lower() or "model"
            if name[0].isdigit():
                name = f"m_{name}"
        name = self.script.unique(name)
        self.names[ref.key] = name
        comment = "; ".join(
            ([_HUB_NOTE] if self._local_dir(ref.path) is None and _HUB_ID.match(ref.path)
             else []) + ([f"revision {ref.revision}"] if ref.revision else []))
        self.paths.setdefault(ref.path, comment)
        self.script.model(name, ref.path, self.read.span(ref.node), comment or None, ref.lora,
                          plain)
        return name

    def _local_dir(self, path: str) -> Path | None:
        """The model's folder, looked for from the working directory, the YAML's folder
        and the script's."""
        p = Path(path).expanduser()
        bases = [Path.cwd()]
        if self.read.source.path is not None:
            bases.append(Path(self.read.source.path).resolve().parent)
        if self.script_dir is not None:
            bases.append(self.script_dir)
        for b in bases:
            candidate = p if p.is_absolute() else b / p
            if candidate.exists():
                return candidate
        return None

    def _num_layers(self, ref: ModelRef) -> int | None:
        """The model's layer count from a local config.json, or None if unknown."""
        folder = self._local_dir(ref.path)
        if folder is None or not (folder / "config.json").is_file():
            return None
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        for key in NUM_LAYERS_KEYS:
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    # the output expression

    def _output(self) -> ast.Expr:
        method, slices, base = self.method, self.config.slices, self.config.base
        whole = self._whole_model(slices)
        if whole:
            for s in slices[0].sources:
                s.layer_range = None
        # names first, in the order the YAML gives the models (the base first)
        self.plain = {(r.path, r.revision) for r in self._models()}
        if base is not None and method.base != "ignored":
            self._name(base, True)
        for s in slices:
            if s.base is not None and method.base != "ignored":
                self._name(s.base, True)
        for s in slices:
            for src in s.sources:
                self._name(src.model, base is not None and src.model.key == base.key)
        if self.config.tokenizer is not None:
            vocab_settings(self, self.config.tokenizer, base)

        make = self._at(self.config.method_node)
        if whole:
            counts = [self._num_layers(s.model) for s in slices[0].sources]
            self.values.num_layers = next((n for n in counts if n is not None), None)
            return self._slice(slices[0], Layers(0, 0, True), "")
        total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in slices)
        parts, offset = [], 0
        for index, s in enumerate(slices, 1):
            n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            suffix = f"_{index}" if len(slices) > 1 else ""
            parts.append(self._slice(s, Layers(offset, n, n == total), suffix))
            offset += n
        if len(slices) > 1 and method.form != "passthrough":   # a name for each merged slice
            for index, s in enumerate(slices, 1):
                first = s.sources[0].layer_range
                parts[index - 1] = self.script.bind(
                    f"slice_{index}", parts[index - 1],
                    f"slice {index}: layers {first[0]}-{first[1] - 1} of its models")
        return make.call("stack", tuple(parts))

    def _models(self) -> list[ModelRef]:
        """Every model the script may name: the base (unless the method ignores it and no
        tokenizer setting names it), each slice's base and sources, the tokenizer's."""
        config, used = self.config, self.method.base != "ignored"
        tok = config.tokenizer
        refs = [config.base] if used or tok is not None else []
        refs += [s.base for s in config.slices if used]
        refs += [src.model for s in config.slices for src in s.sources]
        refs += [tok.ref, *(e.ref for e in tok.tokens)] if tok is not None else []
        return [r for r in refs if r is not None]

    def _whole_model(self, slices: list[SliceDef]) -> bool:
        """True for `models:`, and for one slice that is all of every source's layers
        (known from a local config.json): it is written without `.layers[...]`."""
        if len(slices) != 1:
            return False
        ranges = [s.layer_range for s in slices[0].sources]
        if all(r is None for r in ranges):
            return True
        return all(r[0] == 0 and self._num_layers(s.model) == r[1]
                   for r, s in zip(ranges, slices[0].sources, strict=True))

    def _slice(self, s: SliceDef, layers: Layers, suffix: str) -> ast.Expr:
        """One slice merged with the method (with `models:`, the whole merge)."""
        method, top_params = self.method, self.config.top_params
        base = s.base or self.config.base
        sources = list(s.sources)
        keys = [src.model.key for src in sources]
        base_src = None
        if method.base != "ignored":
            if base is not None and base.key not in keys:
                raise self.read.fail(f'the base model "{base.path}" is not one of the '
                                     "slice's sources", s.node,
                                     hint="add it to the sources with the same layer_range, "
                                          "as mergekit requires")
            base_src = sources[keys.index(base.key)] if base is not None else None
        if method.base == "required" and base_src is None:
            raise self.read.fail(f"{method.name} needs a base_model", s.node,
                                 hint="add `base_model: PATH` (the model the others were "
                                      "fine-tuned from)")
        others = [src for src in sources if src is not base_src]
        self._check_counts(sources, others, s.node)
        for src in sources:
            if src.added and method.base == "ignored" and method.name != "passthrough":
                self.read.warn(f'mergekit adds base_model "{src.model.path}" to the models '
                               f"{method.name} merges; so does this script", src.model.node)

        def scopes(src: SourceDef | None) -> list[Params]:
            return ([src.params] if src is not None else []) + [
                s.params, self.config.module_params, top_params]

        def value(param: MkParam, src: SourceDef | None) -> Value:
            if src is None:
                return self.config.params.resolve(param, scopes(None), s.node, "this merge")
            return self.config.params.resolve(param, scopes(src), src.node,
                                              f'"{src.model.path}"')

        kwargs: list[tuple[str, ast.Expr]] = []
        scale: dict[tuple, ast.Expr] = {}
        for param in method.params:
            used = any(param.name in p for p in [top_params, self.config.module_params,
                                                 s.params, *(x.params for x in sources)])
            make = self._at(self._where(param, s, sources))
            if param.keyword is None:
                if used and param.unsupported is not None:   # raises on the bad value
                    value(param, others[0] if others else None)
                if used and param.dropped and param.dropped not in self.notes:
                    self.notes.append(param.dropped)
                    self.read.warn(param.dropped, self._where(param, s, sources))
                if method.form == "passthrough" and param.name == "scale":
                    for src in sources:
                        name = f"scale_{self.names[src.model.key]}{suffix}"
                        factor = self.values.expr(value(param, src), param, layers, name, make)
                        if not isinstance(factor, ast.NoneLit):
                            scale[src.model.key] = factor
                continue
            default = self._ml_default(param)
            if param.per_model:
                owners = others if method.base != "ignored" else sources
                items = self._per_model(param, [value(param, o) for o in owners], owners,
                                        layers, suffix, make)
                texts = {text_of(i) for i in items}
                if len(texts) == 1 and not used and not param.always and default in texts:
                    continue
                kwargs.append((param.keyword, items[0] if len(texts) == 1 else
                               ast.ListExpr(make.span, tuple(items))))
            else:
                item = self.values.expr(value(param, None), param, layers,
                                        f"{param.name}{suffix}", make)
                if not used and (param.name == "lambda" or not param.always
                                 and default == text_of(item)):
                    continue
                kwargs.append((param.keyword, item))
        return self._form(base_src, others, sources, kwargs, scale)

    def _where(self, param: MkParam, s: SliceDef, sources: list[SourceDef]) -> yaml.Node:
        """The first YAML key that sets `param` (the slice, when none does)."""
        for p in [self.config.top_params, self.config.module_params, s.params,
                  *(x.params for x in sources)]:
            if param.name in p:
                return p[param.name].key
        return s.node

    def _check_counts(self, sources: list, others: list, node: yaml.Node) -> None:
        method = self.method

        def bad(what: str, n: int, lo: int | None, hi: int | None) -> str | None:
            if lo is not None and n < lo:
                return f"{method.name} needs at least {lo} {what}, and has {n}"
            if hi is not None and n > hi:
                return f"{method.name} takes at most {hi} {what}, and has {n}"
            return None

        problem = (bad("models (counting the base)", len(sources), method.min_inputs,
                       method.max_inputs)
                   or bad("models besides the base", len(others), method.min_non_base,
                          method.max_non_base))
        if problem:
            hint = None
            if method.name == "passthrough":
                hint = ("passthrough copies one model per slice: give each slice one "
                        "source, and no base_model with `models:`")
            elif method.form == "base_first" and method.max_inputs == 2:
                hint = f"{method.name} merges base_model with exactly one other model"
            raise self.read.fail(problem, node, hint=hint)

    def _per_model(self, param: MkParam, values: list[Value], owners: list[SourceDef],
                   layers: Layers, suffix: str, make: Make) -> list[ast.Expr]:
        """One expression per model; a complex value all models share is bound once."""
        if all(isinstance(v, Const) for v in values):
            return [self.values.expr(v, param, layers, None, make) for v in values]
        if len(set(map(repr, values))) == 1:
            shared = self.values.expr(values[0], param, layers, f"{param.name}{suffix}", make)
            return [shared] * len(values)
        return [self.values.expr(v, param, layers,
                                 f"{param.name}_{self.names[src.model.key]}{suffix}", make)
                for v, src in zip(values, owners, strict=True)]

    def _ml_default(self, param: MkParam) -> str | None:
        """mergelang's default for the keyword, as text; None when unknown."""
        fn = self.method.function
        if fn is None or param.keyword is None:
            return None
        return _stdlib_defaults(fn).get(param.keyword)

    def _view(self, src: SourceDef) -> ast.Expr:
        """A model, or its slice `name.layers[a:b]`."""
        make, name = self._at(src.node), self.names[src.model.key]
        if src.layer_range is None:
            return make.name(name)
        return make.layers(name, *src.layer_range)

    def _form(self, base_src: SourceDef | None, others: list[SourceDef],
              sources: list[SourceDef], kwargs: list[tuple[str, ast.Expr]],
              scale: dict[tuple, ast.Expr]) -> ast.Expr:
        """The method's call, its inputs passed as mergekit passes them."""
        method, make = self.method, self._at(self.config.method_node)
        if method.form == "passthrough":
            src = sources[0]
            factor = scale.get(src.model.key)
            view = self._view(src)
            return make.op(factor, "*", view) if factor is not None else view
        fn = method.function
        assert fn is not None
        base = self._view(base_src) if base_src is not None else None
        if method.form == "delta" and not others:   # mergekit returns the base as it is
            return base
        if method.form == "delta" or (method.form == "optional_base" and base is not None):
            deltas = tuple(make.op(self._view(o), "-", base) for o in others)
            return make.op(base, "+", make.call(fn, deltas, tuple(kwargs)))
        if method.form == "base_first":
            return make.call(fn, (base, *map(self._view, others)), tuple(kwargs))
        # inputs, or optional_base without a base: the models in mergekit's order
        inputs = sources if method.form == "inputs" else others
        return make.call(fn, tuple(map(self._view, inputs)), tuple(kwargs))


def _reserved_names() -> set[str]:
    """Names the script must not bind: the language's built-ins and the stdlib's."""
    from ..builtins import BUILTINS, CONTEXT_NAMES
    from ..ops import PRIMITIVES
    from ..resolve import stdlib_scope

    return set(BUILTINS) | set(CONTEXT_NAMES) | set(PRIMITIVES) | \
        stdlib_scope().all_names() | {"lambda"}


def _stdlib_defaults(function: str) -> dict[str, str]:
    """The defaults of a standard-library function's parameters, as text."""
    from ..resolve import stdlib_scope

    fn = stdlib_scope().functions.get(function)
    if fn is None:
        return {}
    return {p.name: text_of(p.default) for p in fn.params if p.default is not None}
