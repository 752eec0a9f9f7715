"""`mergelang convert`: a mergekit 0.1.5 YAML config as a readable `.merge` script.

    script = convert(yaml_text, "ties.yml").script
    convert_file(Path("ties.yml"), Path("ties.merge"))

The YAML is read with `yaml.compose`, so every node keeps its line and column: an
unknown key, method or parameter is a `MergeError` whose span points into the YAML
file, shown with a caret like any other diagnostic.

What mergekit computes is reproduced, not just its names:

- parameter precedence: a model's (or slice source's) `parameters`, then the slice's,
  then the top-level `parameters`, then the method's default; a `filter` list that
  matches nothing falls through to the next level, as in mergekit;
- `filter` is a substring test on the tensor name: `if name ~ "<escaped>" then ...`;
- a gradient (a list of numbers) interpolates over the layers, and tensors outside the
  layers get its first value (mergekit evaluates them at t = 0); inside one slice of
  several, it runs over that slice's layers only;
- the task-arithmetic family works on deltas against the base (`base + ties(a - base,
  ...)`); mergekit's defaults are written out wherever mergelang's differ.

The method table (`METHODS`) is the single place that says what each mergekit method
becomes; docs/convert.md is its prose form.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .diagnostics import Diagnostic, MergeError, Source, Span, did_you_mean, error

MERGEKIT_VERSION = "0.1.5"
REQUIRED = object()
LINE_WIDTH = 92


# --------------------------------------------------------------------------------------
# mergekit's methods, and what each becomes


@dataclass(frozen=True)
class MkParam:
    """A mergekit method parameter and its mergelang keyword."""

    name: str
    type: type                    # float, int or bool: how mergekit validates the value
    default: Any = REQUIRED
    per_model: bool = False       # mergekit's NON_BASE / INPUT scope: one value per model
    keyword: str | None = None    # the mergelang keyword; None: not passed (see `dropped`)
    dropped: str | None = None    # why the parameter has no mergelang counterpart
    transform: Callable[[Any], Any] | None = None  # mergekit value -> mergelang value
    unsupported: Any = None       # a value mergelang cannot reproduce (with `why`)
    why: str = ""
    always: bool = False          # write it even when equal to mergelang's default


@dataclass(frozen=True)
class MkMethod:
    name: str
    function: str | None   # the mergelang function (None: passthrough, no call)
    form: str              # delta | inputs | base_first | optional_base | passthrough
    base: str              # mergekit's base policy: required | optional | ignored
    params: tuple[MkParam, ...] = ()
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    random: bool = False
    upcasts: bool = False  # computes in float32 whatever `dtype` (linear, slerp)

    def param(self, name: str) -> MkParam | None:
        return next((p for p in self.params if p.name == name), None)


def _rescale(value: bool) -> str:
    return "l1" if value else "none"


_INT8 = MkParam("int8_mask", bool, False, dropped="int8_mask only changes how mergekit stores "
                "its masks; it has no effect on the result")
_LAMBDA = MkParam("lambda", float, 1.0, keyword="lambda")
_WEIGHT = MkParam("weight", float, per_model=True, keyword="weights")


def _task_arithmetic_family(name: str, function: str, sparsify: str | None,
                            normalize: bool, rescale: bool,
                            random: bool = False) -> MkMethod:
    params = [_WEIGHT]
    if sparsify is None:
        params.append(MkParam("density", float, 1.0, per_model=True, dropped=f"{name} does not "
                              "sparsify, so density has no effect"))
    else:
        params.append(MkParam("density", float, 1.0, per_model=True, keyword="density",
                              always=True))
    if sparsify == "outliers":
        params.append(MkParam("gamma", float, 0.01, per_model=True, keyword="gamma",
                              always=True))
    if sparsify == "della":
        params.append(MkParam("epsilon", float, 0.15, per_model=True, keyword="epsilon",
                              always=True))
    params.append(MkParam("normalize", bool, normalize, keyword="normalize"))
    if sparsify is None:
        params.append(MkParam("rescale", bool, rescale, dropped=f"{name} does not sparsify, "
                              "so rescale has no effect"))
    elif sparsify == "magnitude":
        params.append(MkParam(
            "rescale", bool, rescale, unsupported=True,
            why="mergelang's ties does not rescale the trimmed deltas; remove `rescale: "
                "true` (mergekit's default for ties is false)"))
    else:
        # DARE and DELLA: mergelang's default (the papers' rescaling) is not mergekit's
        params.append(MkParam("rescale", bool, rescale, keyword="rescale", transform=_rescale,
                              always=sparsify != "outliers"))
    params += [_LAMBDA, _INT8]
    return MkMethod(name, function, "delta", "required", tuple(params), random=random)


METHODS: dict[str, MkMethod] = {m.name: m for m in [
    MkMethod("linear", "linear", "inputs", "ignored", (
        MkParam("weight", float, per_model=True, keyword="weights"),
        MkParam("normalize", bool, True, keyword="normalize"),
    ), upcasts=True),
    _task_arithmetic_family("task_arithmetic", "task_arithmetic", None, False, False),
    _task_arithmetic_family("ties", "ties", "magnitude", True, False),
    _task_arithmetic_family("dare_ties", "dare_ties", "random", False, True, random=True),
    _task_arithmetic_family("dare_linear", "dare_linear", "random", False, True, random=True),
    _task_arithmetic_family("breadcrumbs", "breadcrumbs", "outliers", False, False),
    _task_arithmetic_family("breadcrumbs_ties", "breadcrumbs_ties", "outliers", False, False),
    _task_arithmetic_family("della", "della", "della", True, True, random=True),
    _task_arithmetic_family("della_linear", "della_linear", "della", False, True, random=True),
    MkMethod("slerp", "slerp", "base_first", "required", (
        MkParam("t", float, keyword="t"),
    ), min_inputs=2, max_inputs=2, upcasts=True),
    MkMethod("nuslerp", "nuslerp", "optional_base", "optional", (
        MkParam("weight", float, per_model=True, keyword="weights"),
        MkParam("nuslerp_row_wise", bool, False, keyword="row_wise"),
        MkParam("nuslerp_flatten", bool, True, keyword="flatten"),
    ), min_non_base=2, max_non_base=2),
    MkMethod("multislerp", "multislerp", "optional_base", "optional", (
        MkParam("weight", float, per_model=True, keyword="weights"),
        MkParam("normalize_weights", bool, True, keyword="normalize"),
        MkParam("eps", float, 1e-8, keyword="eps"),
    ), min_non_base=1),
    MkMethod("karcher", "karcher", "inputs", "ignored", (
        MkParam("max_iter", int, 10, keyword="max_iter"),
        MkParam("tol", float, 1e-5, keyword="tol"),
    )),
    MkMethod("model_stock", "model_stock", "base_first", "required", (
        MkParam("filter_wise", bool, False, keyword="filter_wise"),
    ), min_inputs=3),
    MkMethod("nearswap", "nearswap", "base_first", "required", (
        MkParam("t", float, keyword="t"),
    ), min_inputs=2, max_inputs=2),
    MkMethod("arcee_fusion", "arcee_fusion", "base_first", "required", (),
             min_inputs=2, max_inputs=2),
    MkMethod("sce", "sce", "delta", "required", (
        _INT8,
        MkParam("select_topk", float, 1.0, keyword="select_topk"),
    )),
    MkMethod("ram", "ram", "delta", "required", (
        MkParam("epsilon", float, 1e-5, keyword="epsilon"),
    )),
    MkMethod("ramplus_tl", "ramplus_tl", "delta", "required", (
        MkParam("r", float, 0.1, keyword="r"),
        MkParam("alpha", float, 0.2, keyword="alpha"),
        MkParam("epsilon", float, 1e-5, keyword="epsilon"),
    )),
    MkMethod("passthrough", None, "passthrough", "ignored", (
        MkParam("scale", float, None, per_model=True),
    ), max_inputs=1),
]}

# mergekit methods of other versions, or of its other tools, with a word on each
_NOT_IN_0_1_5 = {
    "ranked_ties": "it is not a merge method of mergekit 0.1.5",
    "dare": "mergekit 0.1.5 calls it dare_ties or dare_linear",
    "task_arithmetic_ties": "mergekit 0.1.5 calls it ties",
}

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "random_seed")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
DTYPES = ("float32", "float64", "float16", "bfloat16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_KEYWORDS = frozenset("fn return output import set if then else and or not true false none"
                      .split())


# --------------------------------------------------------------------------------------
# the parsed config


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None
    node: yaml.Node

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.path, self.revision)


@dataclass(frozen=True)
class Entry:
    """One entry of a parameter setting: `filter` None (or "*") matches every tensor."""

    filter: str | None
    value: Any               # a scalar, or a tuple of scalars (a gradient)
    node: yaml.Node


@dataclass(frozen=True)
class Setting:
    name: str
    entries: tuple[Entry, ...]
    key: yaml.Node


Params = dict[str, Setting]


@dataclass
class SourceDef:
    model: ModelRef
    layer_range: tuple[int, int] | None
    params: Params
    node: yaml.Node
    added: bool = False   # the base model, added to `models` as mergekit does


@dataclass
class SliceDef:
    sources: list[SourceDef]
    base: ModelRef | None
    params: Params
    node: yaml.Node


# values a parameter takes per tensor


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Grad:
    values: tuple


@dataclass(frozen=True)
class When:
    filter: str
    then: Any
    orelse: Any


@dataclass(frozen=True)
class Layers:
    """Where a slice's layers sit in the output: mergekit's gradients run over them."""

    offset: int
    length: int
    whole: bool   # the slice is all of the output's layers: `gradient` (over depth) fits


@dataclass
class Conversion:
    script: str
    warnings: list[Diagnostic] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# entry points


def convert(text: str, name: str = "<config>", path: Path | None = None,
            script_dir: Path | None = None) -> Conversion:
    """Convert mergekit YAML text. `path` is the YAML file (its folder, the working
    directory and `script_dir` are searched for local models' config.json)."""
    source = Source(name, text, path)
    return _Converter(source, script_dir).run()


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


# --------------------------------------------------------------------------------------
# reading YAML nodes


_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class _Reader:
    def __init__(self, source: Source):
        self.source = source

    def span(self, node: yaml.Node) -> Span:
        start, end = node.start_mark, node.end_mark
        if isinstance(node, yaml.ScalarNode) or end.line == start.line:
            return Span(self.source, start.line + 1, start.column + 1, end.line + 1,
                        max(end.column, start.column + 1) + 1)
        return Span(self.source, start.line + 1, start.column + 1, start.line + 1,
                    len(self.source.line(start.line + 1)) + 1)

    def fail(self, message: str, node: yaml.Node | None, hint: str | None = None,
             notes: tuple[str, ...] = ()) -> MergeError:
        return error(message, self.span(node) if node is not None else None, hint, notes)

    def scalar(self, node: yaml.Node) -> Any:
        return _CONSTRUCTOR.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...],
                hints: dict[str, str] | None = None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's entries by key, checked against `allowed`."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(f"{what} must be a mapping of keys to values, not "
                            f"{_node_kind(node)}", node,
                            hint=f"e.g. `{allowed[0]}: ...`")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or not isinstance(self.scalar(key), str):
                raise self.fail(f"a key in {what} must be a word", key)
            name = self.scalar(key)
            if name in out:
                raise self.fail(f'"{name}" appears twice in {what}', key,
                                hint="keep one (mergekit would silently use the last)",
                                notes=(f"the first is at line {out[name][0].start_mark.line + 1}",))
            if name not in allowed:
                hint = (hints or {}).get(name) or did_you_mean(name, allowed)
                raise self.fail(f'unknown key "{name}" in {what}', key, hint=hint,
                                notes=(f"expected one of: {', '.join(allowed)}",))
            out[name] = (key, value)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(f"{what} must be a list, not {_node_kind(node)}", node,
                            hint="write one `- ...` line per entry")
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self.fail(f"{what} must be a string, not {_node_kind(node)}", node)
        return value

    def is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and self.scalar(node) is None


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    value = _CONSTRUCTOR.construct_object(node, deep=True)
    if value is None:
        return "empty"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    return f'"{value}"'


# --------------------------------------------------------------------------------------
# the converter


class _Converter:
    def __init__(self, source: Source, script_dir: Path | None):
        self.source = source
        self.read = _Reader(source)
        self.script_dir = script_dir
        self.warnings: list[Diagnostic] = []
        self.notes: list[str] = []           # comments at the head of the script
        self.settings: list[tuple[str, str]] = []   # (line, comment)
        self.names: dict[tuple[str, str | None], str] = {}  # model key -> script name
        self.model_lines: list[tuple[str, str, str]] = []  # name, path, comment
        self.taken: set[str] = set(_reserved_names())
        self.bindings: list[tuple[str, str, str | None]] = []  # name, text, comment
        self.bound_text: dict[str, str] = {}  # text -> name, to share equal bindings
        self.method: MkMethod | None = None
        self.donor: ModelRef | str | None = None   # from tokenizer_source

    # the top level

    def run(self) -> Conversion:
        try:
            root = yaml.compose(self.source.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            raise self._yaml_error(exc) from None
        except yaml.YAMLError as exc:
            raise error(f"{self.source.name} is not valid YAML: {exc}") from None
        if root is None:
            raise error(f"{self.source.name} is empty",
                        hint="a mergekit config has at least merge_method and models")
        top = self.read.mapping(root, "a mergekit config", TOP_KEYS)

        if "modules" in top:
            raise self.read.fail("`modules` (a separate merge per module, for multi-module "
                                 "models) is not supported", top["modules"][0],
                                 hint="use `models` or `slices`")
        if "merge_method" not in top:
            raise self.read.fail("the config has no merge_method", root,
                                 hint=f"add e.g. `merge_method: ties`; mergekit "
                                      f"{MERGEKIT_VERSION} has: {', '.join(METHODS)}")
        method_node = top["merge_method"][1]
        method_name = self.read.string(method_node, "merge_method")
        if method_name not in METHODS:
            why = _NOT_IN_0_1_5.get(method_name)
            hint = did_you_mean(method_name, METHODS)
            raise self.read.fail(f'unknown merge_method "{method_name}"'
                                 + (f": {why}" if why else ""), method_node,
                                 hint=hint or f"mergekit {MERGEKIT_VERSION}'s methods: "
                                              f"{', '.join(METHODS)}")
        self.method = method = METHODS[method_name]

        has_models, has_slices = "models" in top, "slices" in top
        if has_models == has_slices:
            raise self.read.fail("a config has either `models` or `slices`" +
                                 (", not both" if has_models else ""),
                                 top["slices"][0] if has_slices else root,
                                 hint="list the models to merge under `models:`, or layer "
                                      "ranges under `slices:`")
        base = self._model_ref(top["base_model"][1]) if "base_model" in top else None
        params = self._params(top["parameters"][1], "the top-level parameters", per_model=False,
                              where="top") if "parameters" in top else {}

        if has_models:
            slices = [self._models(top["models"][1], base)]
        else:
            slices = self._slices(top["slices"][1])

        self._settings(top, base, method)
        for key in ("name", "random_seed", "chat_template"):
            if key in top:
                self._misc(key, *top[key])
        self._tokenizer(top, base)

        output = self._output(method, slices, base, params)
        return Conversion(self._text(method, output), self.warnings)

    def _yaml_error(self, exc: yaml.MarkedYAMLError) -> MergeError:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if "expected a single document" in str(exc):
            problem = ("several YAML documents (mergekit-mega's format) are not supported: "
                       "put each merge in its own file")
        span = None
        if mark is not None:
            span = Span(self.source, mark.line + 1, mark.column + 1, mark.line + 1,
                        mark.column + 2)
        return error(f"{self.source.name} is not valid YAML: {problem}", span)

    # models and slices

    def _model_ref(self, node: yaml.Node) -> ModelRef:
        if isinstance(node, yaml.MappingNode):
            entries = self.read.mapping(node, "a model reference",
                                        ("model", "lora", "override_architecture"))
            if "lora" in entries:
                raise self.read.fail("a LoRA adapter on a model is not supported",
                                     entries["lora"][0],
                                     hint="merge the adapter into its model first (e.g. with "
                                          "peft's merge_and_unload) and name that folder")
            if "override_architecture" in entries:
                raise self.read.fail("override_architecture is not supported",
                                     entries["override_architecture"][0],
                                     hint="mergelang finds layers from tensor names and "
                                          "config.json; remove the key")
            if "model" not in entries:
                raise self.read.fail("a model reference needs `model:`", node)
            inner = entries["model"][1]
            if isinstance(inner, yaml.MappingNode):
                path_entries = self.read.mapping(inner, "a model path", ("path", "revision"))
                if "path" not in path_entries:
                    raise self.read.fail("a model path needs `path:`", inner)
                path = self.read.string(path_entries["path"][1], "path")
                revision = (self.read.string(path_entries["revision"][1], "revision")
                            if "revision" in path_entries else None)
                return ModelRef(path, revision, path_entries["path"][1])
            node = inner
        text = self.read.string(node, "a model")
        if "+" in text:
            raise self.read.fail(f'"{text}" names a LoRA adapter (model+adapter), which is '
                                 "not supported", node,
                                 hint="merge the adapter into its model first (e.g. with "
                                      "peft's merge_and_unload) and name that folder")
        if text.count("@") > 1:
            raise self.read.fail(f'"{text}" has more than one "@"', node,
                                 hint="write path@revision")
        path, _, revision = text.partition("@")
        return ModelRef(path, revision or None, node)

    def _models(self, node: yaml.Node, base: ModelRef | None) -> SliceDef:
        sources = []
        for item in self.read.sequence(node, "models"):
            if isinstance(item, yaml.ScalarNode) and not self.read.is_null(item):
                raise self.read.fail("each entry of models is `- model: PATH`", item,
                                     hint=f"write `- model: {self.read.scalar(item)}`")
            entries = self.read.mapping(item, "an entry of models", MODEL_KEYS)
            if "model" not in entries:
                raise self.read.fail("an entry of models has no `model:`", item)
            ref = self._model_ref(entries["model"][1])
            params = (self._params(entries["parameters"][1], f'the parameters of "{ref.path}"',
                                   per_model=True, where="model")
                      if "parameters" in entries else {})
            sources.append(SourceDef(ref, None, params, item))
        if not sources:
            raise self.read.fail("models is empty", node, hint="list the models to merge")
        self._no_duplicates(sources)
        if base is not None and base.key not in {s.model.key for s in sources}:
            # mergekit adds the base model to the inputs, without parameters of its own
            sources.append(SourceDef(base, None, {}, base.node, added=True))
        return SliceDef(sources, base, {}, node)

    def _slices(self, node: yaml.Node) -> list[SliceDef]:
        slices = []
        for item in self.read.sequence(node, "slices"):
            entries = self.read.mapping(item, "a slice", SLICE_KEYS)
            if "sources" not in entries:
                raise self.read.fail("a slice has no `sources:`", item,
                                     hint="list `- model: PATH` with `layer_range: [a, b]`")
            sources = []
            for src in self.read.sequence(entries["sources"][1], "sources"):
                s = self.read.mapping(src, "a slice source", SOURCE_KEYS)
                if "model" not in s:
                    raise self.read.fail("a slice source has no `model:`", src)
                if "layer_range" not in s:
                    raise self.read.fail("a slice source has no `layer_range:`", src,
                                         hint="add e.g. `layer_range: [0, 16]` (layers 0 to 15)")
                ref = self._model_ref(s["model"][1])
                params = (self._params(s["parameters"][1], f'the parameters of "{ref.path}"',
                                       per_model=True, where="model")
                          if "parameters" in s else {})
                sources.append(SourceDef(ref, self._layer_range(s["layer_range"][1]), params,
                                         src))
            if not sources:
                raise self.read.fail("a slice has no sources", entries["sources"][1])
            self._no_duplicates(sources)
            lengths = {b - a for a, b in (s.layer_range for s in sources)}
            if len(lengths) > 1:
                raise self.read.fail("the sources of a slice have different numbers of layers: "
                                     f"{sorted(lengths)}", entries["sources"][1],
                                     hint="give every source a layer_range of the same length")
            base = self._model_ref(entries["base_model"][1]) if "base_model" in entries else None
            params = (self._params(entries["parameters"][1], "the parameters of a slice",
                                   per_model=False, where="slice")
                      if "parameters" in entries else {})
            if "residual_weight" in entries:
                self._warn("residual_weight is not used by mergekit 0.1.5; it is ignored",
                           entries["residual_weight"][0])
            slices.append(SliceDef(sources, base, params, item))
        if not slices:
            raise self.read.fail("slices is empty", node, hint="list at least one slice")
        return slices

    def _layer_range(self, node: yaml.Node) -> tuple[int, int]:
        items = self.read.sequence(node, "layer_range") if isinstance(node, yaml.SequenceNode) \
            else None
        values = [self.read.scalar(i) if isinstance(i, yaml.ScalarNode) else None
                  for i in items or ()]
        if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int)
                                    for v in values) or values[0] < 0):
            raise self.read.fail("layer_range must be two whole numbers [start, end]", node,
                                 hint="e.g. `layer_range: [0, 16]`: layers 0 to 15")
        if values[1] <= values[0]:
            raise self.read.fail(f"layer_range [{values[0]}, {values[1]}] is empty", node,
                                 hint="the end is not included: [0, 16] is layers 0 to 15")
        return values[0], values[1]

    def _no_duplicates(self, sources: list[SourceDef]) -> None:
        seen: dict[tuple, SourceDef] = {}
        for s in sources:
            if s.model.key in seen:
                raise self.read.fail(f'"{s.model.path}" is listed twice', s.model.node,
                                     hint="mergekit refuses duplicate inputs; list it once")
            seen[s.model.key] = s

    # parameters

    def _params(self, node: yaml.Node, what: str, per_model: bool, where: str) -> Params:
        if self.read.is_null(node):
            return {}
        method = self.method
        assert method is not None
        names = tuple(p.name for p in method.params)
        hints = {"filter": "a filter goes inside a parameter: `weight: [{filter: mlp, "
                           "value: 0.5}, {value: 1.0}]`"}
        if not names:
            if isinstance(node, yaml.MappingNode) and node.value:
                key = node.value[0][0]
                raise self.read.fail(f'{method.name} takes no parameters, so '
                                     f'"{self.read.scalar(key)}" is unknown', key,
                                     hint="remove the parameters")
            return {}
        entries = self.read.mapping(node, what, names, hints)
        out: Params = {}
        for name, (key, value) in entries.items():
            param = method.param(name)
            assert param is not None
            if per_model and not param.per_model:
                raise self.read.fail(
                    f"{name} is one value for the whole merge, not one per model: mergekit "
                    f"ignores it in {what}", key,
                    hint="move it to the top-level `parameters:` (or a slice's)")
            out[name] = Setting(name, self._setting(value, param), key)
        return out

    def _setting(self, node: yaml.Node, param: MkParam) -> tuple[Entry, ...]:
        if isinstance(node, yaml.MappingNode):
            return (self._conditional(node, param),)
        if isinstance(node, yaml.SequenceNode):
            items = node.value
            if not items:
                raise self.read.fail(f"{param.name} is an empty list", node,
                                     hint="give a number, or a list of numbers (a gradient)")
            if all(isinstance(i, yaml.MappingNode) for i in items):
                entries = tuple(self._conditional(i, param) for i in items)
                catch_all = [i for i, e in enumerate(entries) if e.filter in (None, "*")]
                if catch_all and catch_all[0] < len(entries) - 1:
                    self._warn(f"the entries of {param.name} after the one without a filter "
                               "are never used (mergekit takes the first match)",
                               entries[catch_all[0] + 1].node)
                return entries
            if any(isinstance(i, yaml.MappingNode) for i in items):
                raise self.read.fail(f"{param.name} mixes `{{filter, value}}` entries with "
                                     "plain values", node,
                                     hint="write the plain value as `{value: ...}` last")
            return (Entry(None, self._gradient(node, param), node),)
        return (Entry(None, self._value(node, param), node),)

    def _conditional(self, node: yaml.Node, param: MkParam) -> Entry:
        entries = self.read.mapping(
            node, f"an entry of {param.name}", ("filter", "value"),
            {"pattern": "mergekit 0.1.5 calls it `filter` (and silently ignores `pattern`, "
                        "so the entry would match every tensor)"})
        if "value" not in entries:
            raise self.read.fail(f"an entry of {param.name} has no `value:`", node,
                                 hint="write `{filter: self_attn, value: 0.5}`")
        filt = None
        if "filter" in entries:
            filt = self.read.scalar(entries["filter"][1]) \
                if isinstance(entries["filter"][1], yaml.ScalarNode) else None
            if filt is not None and not isinstance(filt, str):
                filt = str(filt) if isinstance(filt, int) and not isinstance(filt, bool) else None
            if filt is None:
                raise self.read.fail("a filter is a piece of a tensor name, e.g. self_attn",
                                     entries["filter"][1])
        value_node = entries["value"][1]
        if isinstance(value_node, yaml.SequenceNode):
            value = self._gradient(value_node, param)
        else:
            value = self._value(value_node, param)
        return Entry(filt, value, node)

    def _gradient(self, node: yaml.Node, param: MkParam) -> tuple:
        values = tuple(self._value(i, param) for i in node.value)
        if not values:
            raise self.read.fail(f"{param.name} is an empty list", node)
        if len(values) > 1 and len(set(values)) > 1 and param.type is not float:
            raise self.read.fail(f"a gradient of {param.name} ({param.type.__name__} values) "
                                 "is not supported", node,
                                 hint="mergekit steps through such values; give one value, "
                                      "or use filters")
        return values

    def _value(self, node: yaml.Node, param: MkParam) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.read.fail(f"{param.name} must be a {_type_word(param.type)}, not "
                                 f"{_node_kind(node)}", node)
        value = self.read.scalar(node)
        if param.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
        elif param.type is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        else:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return value
            if isinstance(value, str):   # YAML reads 1e-5 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
        raise self.read.fail(f"{param.name} must be a {_type_word(param.type)}, not "
                             f"{_node_kind(node)}", node)

    def _resolve(self, param: MkParam, scopes: list[Params], owner: yaml.Node,
                 who: str) -> Any:
        """A parameter's value per tensor, mergekit's way: the first scope that sets it;
        filters that match nothing fall through to the next scope, then the default."""
        for i, params in enumerate(scopes):
            if param.name in params:
                setting = params[param.name]
                rest = scopes[i + 1:]

                def chain(j: int, entries=setting.entries, rest=rest, key=setting.key) -> Any:
                    if j == len(entries):
                        return self._resolve(param, rest, key, who)
                    entry = entries[j]
                    leaf = self._leaf(entry.value, param, entry.node)
                    if entry.filter in (None, "*"):
                        return leaf
                    return When(entry.filter, leaf, chain(j + 1))

                return chain(0)
        if param.default is REQUIRED:
            raise self.read.fail(
                f"{param.name} has no value for {who}", owner,
                hint=f"mergekit's {self.method.name} needs `{param.name}` for it (there is "
                     f"no default): set it in its `parameters:` or the top-level ones, with "
                     f"an entry without a filter")
        return Const(param.default)

    def _leaf(self, value: Any, param: MkParam, node: yaml.Node) -> Any:
        if param.unsupported is not None and value == param.unsupported:
            raise self.read.fail(f"{param.name}: {str(value).lower()} is not supported for "
                                 f"{self.method.name}", node, hint=param.why)
        if isinstance(value, tuple):
            return Grad(value) if len(set(value)) > 1 else Const(value[0])
        return Const(value)

    # settings and other keys

    def _settings(self, top: dict, base: ModelRef | None, method: MkMethod) -> None:
        dtype = self._dtype(top, "dtype")
        out_dtype = self._dtype(top, "out_dtype")
        if dtype is not None:
            if method.upcasts and dtype != "float64":
                self.settings.append(('set dtype = "float32"',
                                      f"mergekit: loaded in {dtype}, {method.name} computes "
                                      "in float32"))
            else:
                self.settings.append((f'set dtype = "{dtype}"',
                                      "mergekit loads and merges in `dtype`"))
        if out_dtype is not None:
            self.settings.append((f'set out_dtype = "{out_dtype}"', None))
        elif dtype is not None:
            self.settings.append((f'set out_dtype = "{dtype}"',
                                  "and writes in it when there is no `out_dtype`"))

    def _dtype(self, top: dict, key: str) -> str | None:
        if key not in top or self.read.is_null(top[key][1]):
            return None
        node = top[key][1]
        value = self.read.string(node, key)
        name = value.removeprefix("torch.")
        if name not in DTYPES:
            raise self.read.fail(f'unknown {key} "{value}"', node,
                                 hint=did_you_mean(name, DTYPES)
                                 or f"mergekit takes: {', '.join(DTYPES)}")
        return name

    def _misc(self, key: str, key_node: yaml.Node, node: yaml.Node) -> None:
        if key == "name":
            self.notes.append(f"name: {self.read.scalar(node)!s} (mergekit-mega's name for "
                              "this merge; not used here)")
        elif key == "random_seed":
            value = self.read.scalar(node) if isinstance(node, yaml.ScalarNode) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self.read.fail("random_seed must be a whole number >= 0", node)
            self.settings.append((f"set seed = {value}",
                                  "mergekit ignores this key (its seed is --random-seed)"))
        elif key == "chat_template":
            value = self.read.string(node, "chat_template")
            shown = value if len(value) <= 40 and "\n" not in value else "(a template)"
            self.notes.append(f"chat_template: {shown} is not applied: mergelang copies the "
                              "donor's tokenizer files as they are; set the template in the "
                              "output's tokenizer_config.json yourself")
            self._warn("chat_template is not applied: the donor's tokenizer files are "
                       "copied as they are", key_node)

    def _tokenizer(self, top: dict, base: ModelRef | None) -> None:
        if "tokenizer_source" in top and "tokenizer" in top:
            raise self.read.fail("give tokenizer_source or tokenizer, not both",
                                 top["tokenizer"][0])
        if "tokenizer" in top:
            key, node = top["tokenizer"]
            entries = self.read.mapping(node, "tokenizer", TOKENIZER_KEYS)
            for unsupported in ("tokens", "pad_to_multiple_of"):
                if unsupported in entries:
                    raise self.read.fail(f"tokenizer.{unsupported} is not supported: it "
                                         "changes the embedding matrices (tokenizer surgery)",
                                         entries[unsupported][0],
                                         hint="remove it, and merge models that share one "
                                              "vocabulary")
            source = entries.get("source", (key, None))[1]
            what = "tokenizer.source"
            if source is None:   # mergekit's default source is "union"
                self._tokenizer_source("union", None, what, key)
                return
        elif "tokenizer_source" in top:
            key, source = top["tokenizer_source"]
            what = "tokenizer_source"
            if self.read.is_null(source):
                return
        else:
            return
        if isinstance(source, yaml.ScalarNode) and self.read.scalar(source) in ("union", "base"):
            self._tokenizer_source(self.read.scalar(source), None, what, key)
        else:
            self._tokenizer_source(None, self._model_ref(source), what, key)

    def _tokenizer_source(self, kind: str | None, ref: ModelRef | None, what: str,
                          key: yaml.Node) -> None:
        surgery = (f"{what}: full tokenizer surgery (mergekit's union or re-mapped vocabulary, "
                   "with the embeddings re-ordered to match) is out of scope and not done "
                   "here: the models must share one vocabulary, and the tokenizer files are "
                   "copied from the donor")
        self.notes.append(surgery)
        self._warn(f"{what}: tokenizer surgery is not done; the tokenizer files are copied "
                   "from the donor model", key)
        if kind == "union":
            return
        if kind == "base":
            self.donor = "base"
            return
        assert ref is not None
        self.donor = ref

    def _warn(self, message: str, node: yaml.Node) -> None:
        self.warnings.append(Diagnostic(message, self.read.span(node), severity="warning"))

    # naming

    def _name(self, ref: ModelRef, is_base: bool) -> str:
        if ref.key in self.names:
            return self.names[ref.key]
        if is_base and "base" not in self.taken:
            name = "base"
        else:
            stem = ref.path.rstrip("/").split("/")[-1] or "model"
            stem = re.sub(r"\.safetensors$", "", stem)
            name = re.sub(r"[^0-9a-zA-Z]+", "_", stem).strip("_").lower() or "model"
            if name[0].isdigit():
                name = f"m_{name}"
        name = self._unique(name)
        self.names[ref.key] = name
        self.model_lines.append((name, ref.path, self._model_comment(ref)))
        return name

    def _unique(self, name: str) -> str:
        if name in self.taken:
            i = 2
            while f"{name}_{i}" in self.taken:
                i += 1
            name = f"{name}_{i}"
        self.taken.add(name)
        return name

    def _model_comment(self, ref: ModelRef) -> str:
        parts = []
        if self._local_dir(ref.path) is None and _HUB_ID.match(ref.path):
            parts.append("Hub id: download it first")
        if ref.revision:
            parts.append(f"revision {ref.revision}")
        return "; ".join(parts)

    def _local_dir(self, path: str) -> Path | None:
        p = Path(path).expanduser()
        bases = [Path.cwd()]
        if self.source.path is not None:
            bases.append(Path(self.source.path).resolve().parent)
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
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            value = config.get(key) if isinstance(config, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def bind(self, hint: str, text: str, comment: str | None = None) -> str:
        """Bind `text` to a new name (or reuse the name of an equal binding)."""
        if text in self.bound_text:
            return self.bound_text[text]
        name = self._unique(hint)
        self.bindings.append((name, text, comment))
        self.bound_text[text] = name
        return name

    # the output expression

    def _output(self, method: MkMethod, slices: list[SliceDef], base: ModelRef | None,
                top_params: Params) -> Any:
        whole = self._whole_model(slices)
        if whole:
            for s in slices[0].sources:
                s.layer_range = None
        multi = len(slices) > 1
        total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
                    for s in slices) if not whole else None
        # names first, in the order the YAML gives the models (the base first)
        if base is not None and method.base != "ignored":
            self._name(base, True)
        for s in slices:
            if s.base is not None and method.base != "ignored":
                self._name(s.base, True)
        for s in slices:
            for src in s.sources:
                self._name(src.model, base is not None and src.model.key == base.key)
        if self.donor is not None:
            if self.donor == "base":
                if base is None:
                    raise error("tokenizer source `base` needs a base_model")
                self.settings.append((f"set donor = {self._name(base, True)}",
                                      "tokenizer_source: its tokenizer files are copied"))
            else:
                self.settings.append((f"set donor = {self._name(self.donor, False)}",
                                      "tokenizer_source: its tokenizer files are copied"))

        parts, offset = [], 0
        for index, s in enumerate(slices, 1):
            if whole:
                layers = Layers(0, 0, True)
            else:
                n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
                layers = Layers(offset, n, n == total)
                offset += n
            suffix = f"_{index}" if multi else ""
            parts.append((s, self._slice(method, s, base, top_params, layers, suffix)))
        if whole:
            return parts[0][1]
        if multi and method.form != "passthrough":
            names = []
            for index, (s, doc) in enumerate(parts, 1):
                first = s.sources[0].layer_range
                hint = f"slice_{index}"
                names.append(self.bind(hint, _layout(doc, len(hint) + 3),
                                       f"slice {index}: layers {first[0]}-{first[1] - 1} of "
                                       f"its models"))
            return _Call("stack", tuple(names))
        return _Call("stack", tuple(doc for _, doc in parts))

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

    def _slice(self, method: MkMethod, s: SliceDef, top_base: ModelRef | None,
               top_params: Params, layers: Layers, suffix: str) -> Any:
        base = s.base or top_base
        sources = list(s.sources)
        keys = [src.model.key for src in sources]
        if method.base == "ignored":
            base_src = None
        else:
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
        self._check_counts(method, sources, others, s.node)

        views = {src.model.key: self._view(src) for src in sources}
        for src in sources:
            if src.added and method.base == "ignored" and method.name != "passthrough":
                self._warn(f'mergekit adds base_model "{src.model.path}" to the models '
                           f"{method.name} merges; so does this script", src.model.node)

        def scopes(src: SourceDef | None) -> list[Params]:
            return ([src.params] if src is not None else []) + [s.params, top_params]

        kwargs: list[tuple[str, str]] = []
        scale: dict[tuple, str] = {}
        for param in method.params:
            used = any(param.name in p for p in [top_params, s.params,
                                                 *(x.params for x in sources)])
            if param.keyword is None:
                if used and param.unsupported is not None:   # raises on the bad value
                    self._resolve(param, scopes(others[0] if others else None), s.node,
                                  "this merge")
                if used and param.dropped:
                    self._note_once(param.name, param.dropped, self._where(param, top_params,
                                                                           s, sources))
                if method.form == "passthrough" and param.name == "scale":
                    for src in sources:
                        value = self._resolve(param, scopes(src), src.node,
                                              f'"{src.model.path}"')
                        text = self._render(value, param, layers,
                                            f"scale_{self.names[src.model.key]}{suffix}")
                        if text != "none":
                            scale[src.model.key] = text
                continue
            if param.per_model:
                owners = others if method.base != "ignored" else sources
                values = [self._resolve(param, scopes(src), src.node, f'"{src.model.path}"')
                          for src in owners]
                texts = self._per_model_texts(param, values, owners, layers, suffix)
                text = texts[0] if len(set(texts)) == 1 else f"[{', '.join(texts)}]"
                default = self._ml_default(param)
                if not used and not param.always and default is not None and \
                        len(set(texts)) == 1 and default == texts[0]:
                    continue
                kwargs.append((param.keyword, text))
            else:
                value = self._resolve(param, scopes(None), s.node, "this merge")
                text = self._render(value, param, layers, f"{param.name}{suffix}")
                default = self._ml_default(param)
                if not used and not param.always and default == text:
                    continue
                if param.name == "lambda" and not used:
                    continue
                kwargs.append((param.keyword, text))

        return self._form(method, base_src, others, sources, views, kwargs, scale)

    def _where(self, param: MkParam, top: Params, s: SliceDef,
               sources: list[SourceDef]) -> yaml.Node:
        for p in [top, s.params, *(x.params for x in sources)]:
            if param.name in p:
                return p[param.name].key
        return s.node

    def _note_once(self, name: str, message: str, node: yaml.Node) -> None:
        if message not in self.notes:
            self.notes.append(message)
            self._warn(message, node)

    def _check_counts(self, method: MkMethod, sources: list, others: list,
                      node: yaml.Node) -> None:
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

    def _view(self, src: SourceDef) -> str:
        name = self.names[src.model.key]
        if src.layer_range is None:
            return name
        a, b = src.layer_range
        return f"{name}.layers[{a}:{b}]"

    def _per_model_texts(self, param: MkParam, values: list, owners: list[SourceDef],
                         layers: Layers, suffix: str) -> list[str]:
        simple = [self._render(v, param, layers, None) if _is_simple(v) else None
                  for v in values]
        if all(t is not None for t in simple):
            return simple
        if len(set(map(repr, values))) == 1:   # one complex value shared by all models
            text = self._render(values[0], param, layers, f"{param.name}{suffix}")
            return [text] * len(values)
        return [t if t is not None else
                self._render(v, param, layers,
                             f"{param.name}_{self.names[src.model.key]}{suffix}")
                for t, v, src in zip(simple, values, owners, strict=True)]

    def _ml_default(self, param: MkParam) -> str | None:
        """mergelang's default for the keyword, as text; None when unknown."""
        fn = self.method.function
        if fn is None or param.keyword is None:
            return None
        return _stdlib_defaults(fn).get(param.keyword)

    # rendering parameter values

    def _render(self, value: Any, param: MkParam, layers: Layers, hint: str | None) -> str:
        """The text of a per-tensor value; anything beyond a literal is bound to a name
        (from `hint`) so the output line stays readable."""
        if isinstance(value, Const):
            return _literal(param.transform(value.value) if param.transform else value.value)
        assert hint is not None
        if isinstance(value, Grad):
            return self._gradient_text(value, param, layers, hint)
        branches = []
        while isinstance(value, When):
            then = value.then
            text = (_literal(param.transform(then.value) if param.transform else then.value)
                    if isinstance(then, Const) else self._gradient_inline(then, layers, hint))
            branches.append((value.filter, text))
            value = value.orelse
        if isinstance(value, Const):
            orelse = _literal(param.transform(value.value) if param.transform else value.value)
        else:
            orelse = self._gradient_inline(value, layers, hint)
        pad = " " * (len(hint) + 3)
        lines = []
        for i, (filt, text) in enumerate(branches):
            lines.append(f'{"" if i == 0 else pad + "else "}if name ~ {_string(re.escape(filt))} '
                         f"then {text}")
        lines.append(f"{pad}else {orelse}")
        one = f"{lines[0]} else {orelse}"
        if len(branches) == 1 and len(hint) + 3 + len(one) <= LINE_WIDTH:
            lines = [one]
        comment = "mergekit's filters are substring matches on the tensor name"
        return self.bind(hint, "\n".join(lines), comment)

    def _gradient_inline(self, value: Grad, layers: Layers, hint: str) -> str:
        if layers.whole and value.values[0] == value.values[-1]:
            return f"gradient({_literal(list(value.values))})"
        if layers.whole:
            return (f"(if layer == none then {_literal(value.values[0])} "
                    f"else gradient({_literal(list(value.values))}))")
        return self._slice_gradient(value, layers, hint)

    def _gradient_text(self, value: Grad, param: MkParam, layers: Layers, hint: str) -> str:
        if not layers.whole:
            return self._slice_gradient(value, layers, hint)
        v = value.values
        if v[0] == v[-1]:
            return self.bind(hint, f"gradient({_literal(list(v))})")
        return self.bind(hint, f"if layer == none then {_literal(v[0])} "
                               f"else gradient({_literal(list(v))})",
                         "mergekit gives tensors outside the layers (embeddings, final norm, "
                         "lm_head) a gradient's first value")

    def _slice_gradient(self, value: Grad, layers: Layers, hint: str) -> str:
        """mergekit's gradient over one slice of several: t = (layer - offset) / (n - 1)
        over the slice's own layers; tensors outside the layers get the first value."""
        v = value.values
        first, last = layers.offset, layers.offset + layers.length - 1
        comment = (f"the gradient {_literal(list(v))} over this slice's layers (output layers "
                   f"{first}-{last}), as mergekit spreads it; the first value outside the "
                   f"layers")
        if layers.length == 1:   # mergekit: t = 1 for a one-layer slice
            text = f"if layer == none then {_literal(v[0])} else {_literal(v[-1])}"
            return self.bind(hint, text, comment)
        k = len(v) - 1
        pos_text = f"(layer - {first})" if first else "layer"
        pos_text += f" / {layers.length - 1}" if layers.length > 2 else ""
        pos_text += f" * {k}" if k > 1 else ""
        pos = self.bind(f"{hint}_pos", pos_text,
                        "the position in the gradient's list: 0 at the slice's first layer")
        pad = " " * (len(hint) + 3)
        lines = [f"if layer == none then {_literal(v[0])}"]
        for j in range(k):
            frac = pos if j == 0 else f"({pos} - {j})"
            segment = f"(1 - {frac}) * {_literal(v[j])} + {frac} * {_literal(v[j + 1])}"
            if j < k - 1:
                lines.append(f"{pad}else if {pos} < {j + 1} then {segment}")
            else:
                lines.append(f"{pad}else {segment}")
        return self.bind(hint, "\n".join(lines), comment)

    # the method's expression

    def _form(self, method: MkMethod, base_src: SourceDef | None, others: list[SourceDef],
              sources: list[SourceDef], views: dict, kwargs: list[tuple[str, str]],
              scale: dict) -> Any:
        fn = method.function
        kwargs = tuple(kwargs)
        if method.form == "passthrough":
            src = sources[0]
            view = views[src.model.key]
            factor = scale.get(src.model.key)
            return f"{factor} * {view}" if factor is not None else view
        base = views[base_src.model.key] if base_src is not None else None
        if method.form == "delta" or (method.form == "optional_base" and base is not None):
            args = tuple(f"{views[o.model.key]} - {base}" for o in others)
            return _Sum(base, _Call(fn, args, kwargs))
        if method.form == "base_first":
            return _Call(fn, (base, *(views[o.model.key] for o in others)), kwargs)
        # inputs, or optional_base without a base: the models in mergekit's order
        inputs = sources if method.form == "inputs" else others
        return _Call(fn, tuple(views[s.model.key] for s in inputs), kwargs)

    # the script

    def _text(self, method: MkMethod, output: Any) -> str:
        lines = [f"# Converted from {Path(self.source.name).name} by `mergelang convert` "
                 f"(mergekit {MERGEKIT_VERSION} semantics).",
                 f"# merge_method: {method.name}"]
        if method.random:
            lines.extend(_wrap_comment("Its random masks are drawn by mergelang (see `set "
                                       "seed`), so they differ from mergekit's."))
        hub = {path for _, path, comment in self.model_lines if "Hub id" in comment}
        if hub:
            lines.extend(_wrap_comment(
                "Hugging Face Hub ids are not downloaded: fetch each one first (e.g. "
                "`huggingface-cli download ID --local-dir DIR`) and put its folder in "
                "model(\"...\")."))
        if any(not Path(p).is_absolute() and p not in hub for _, p, _ in self.model_lines):
            lines.extend(_wrap_comment("Relative paths resolve against this script's folder "
                                       "(mergekit's against the working directory)."))
        for note in self.notes:
            lines.extend(_wrap_comment(f"Note: {note}"))
        lines.append("")
        if self.settings:
            width = max(len(s) for s, _ in self.settings)
            for setting, comment in self.settings:
                lines.append(f"{setting:<{width}}  # {comment}" if comment else setting)
            lines.append("")
        width = max(len(f'{n} = model({_string(p)})') for n, p, _ in self.model_lines)
        for name, path, comment in self.model_lines:
            text = f"{name} = model({_string(path)})"
            lines.append(f"{text:<{width}}  # {comment}" if comment else text)
        lines.append("")
        said: set[str] = set()
        for name, text, comment in self.bindings:
            if comment and comment not in said:
                lines.extend(_wrap_comment(comment))
                said.add(comment)
            lines.append(f"{name} = {text}")
        if self.bindings:
            lines.append("")
        lines.append(f"output {_layout(output, 7)}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# text helpers


def _type_word(t: type) -> str:
    return {bool: "true or false", int: "whole number"}.get(t, "number")


def _is_simple(value: Any) -> bool:
    return isinstance(value, Const)


def _literal(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        if text in ("inf", "-inf", "nan"):
            raise error(f"{value} is not a number mergelang can write")
        return text
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    raise TypeError(value)


def _string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class _Call:
    """A call to lay out: on one line if it fits, else one argument per line."""

    fn: str
    args: tuple
    kwargs: tuple = ()


@dataclass(frozen=True)
class _Sum:
    """`left + right`, as in `base + ties(...)`."""

    left: str
    right: Any


def _flat(doc: Any) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, _Sum):
        return f"{doc.left} + {_flat(doc.right)}"
    parts = [_flat(a) for a in doc.args] + [f"{k}={_flat(v)}" for k, v in doc.kwargs]
    return f"{doc.fn}({', '.join(parts)})"


def _layout(doc: Any, column: int) -> str:
    """`doc` as text starting at `column`, broken into aligned lines if too wide."""
    one = _flat(doc)
    if column + len(one) <= LINE_WIDTH or isinstance(doc, str):
        return one
    if isinstance(doc, _Sum):
        return f"{doc.left} + {_layout(doc.right, column + len(doc.left) + 3)}"
    inner = column + len(doc.fn) + 1
    parts = [_layout(a, inner) for a in doc.args]
    parts += [f"{k}={_layout(v, inner + len(k) + 1)}" for k, v in doc.kwargs]
    return f"{doc.fn}(" + f",\n{' ' * inner}".join(parts) + ")"


def _wrap_comment(text: str) -> list[str]:
    words, lines, line = text.split(), [], "#"
    for w in words:
        if len(line) + 1 + len(w) > LINE_WIDTH and line != "#":
            lines.append(line)
            line = "#  "
        line += " " + w
    lines.append(line)
    return lines


def _reserved_names() -> set[str]:
    from .builtins import BUILTINS, CONTEXT_NAMES
    from .ops import PRIMITIVES
    from .resolve import stdlib_scope

    return set(_KEYWORDS) | set(BUILTINS) | set(CONTEXT_NAMES) | set(PRIMITIVES) | \
        stdlib_scope().all_names() | {"lambda"}


def _stdlib_defaults(function: str) -> dict[str, str]:
    """The literal defaults of a standard-library function's parameters, as text."""
    from . import ast
    from .resolve import stdlib_scope

    fn = stdlib_scope().functions.get(function)
    out: dict[str, str] = {}
    if fn is None:
        return out
    for p in fn.params:
        d = p.default
        if isinstance(d, ast.Number | ast.Bool | ast.String):
            out[p.name] = _literal(d.value)
        elif isinstance(d, ast.Unary) and d.op == "-" and isinstance(d.operand, ast.Number):
            out[p.name] = _literal(-d.operand.value)
    return out


__all__ = ["convert", "convert_file", "Conversion", "METHODS", "MERGEKIT_VERSION"]
