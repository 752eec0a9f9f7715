"""A mergekit config, read and checked: `read_config` turns the YAML into a `Config`.

Everything mergekit 0.1.5 would refuse, and everything the converter cannot reproduce,
is an error here, located at its YAML node; nothing is translated yet. The checks run in
the order of the keys a reader looks at first (the method, then the models, then the
rest), so the first error reported is the one to fix first.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from ..diagnostics import did_you_mean
from .methods import MERGEKIT_VERSION, METHODS, NOT_IN_0_1_5, MkMethod
from .params import Parameters, Params
from .reading import Reader

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype",
            "out_dtype", "tokenizer_source", "tokenizer", "chat_template", "name", "random_seed")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "residual_weight", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
MODULE_KEYS = ("models", "slices", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
# keys mergekit's schema lets through and ignores, with a word on each
_TOP_HINTS = {
    "int8_mask": "mergekit reads int8_mask only under `parameters:` (and there it only "
                 "changes how masks are stored)",
}
DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelRef:
    path: str
    revision: str | None
    node: yaml.Node
    lora: str | None = None   # mergekit's `model+lora`: a PEFT adapter applied to it

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.path, self.revision, self.lora)


@dataclass
class SourceDef:
    """A model of `models:`, or a source of a slice."""

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


@dataclass(frozen=True)
class Tokenizer:
    """`tokenizer_source` or `tokenizer.source`: "union", "base", or a model (`ref`)."""

    what: str           # the key, as the notes name it
    kind: str | None    # "union" or "base"; None: the model `ref`
    ref: ModelRef | None
    key: yaml.Node
    tokens: tuple[TokenSource, ...] = ()   # `tokenizer.tokens`
    pad_to: tuple[int, yaml.Node] | None = None   # `tokenizer.pad_to_multiple_of`


@dataclass(frozen=True)
class TokenSource:
    """One entry of `tokenizer.tokens`: where the token's embedding row comes from."""

    token: str
    ref: ModelRef | None   # None: mergekit's `kind: zero`
    force: bool
    node: yaml.Node
    other: str | int | None = None   # `kind: model_token`: the model's `token` or `token_id`


@dataclass
class Config:
    method: MkMethod
    method_node: yaml.Node
    params: Parameters
    base: ModelRef | None
    top_params: Params
    slices: list[SliceDef]   # `models:` is one slice of whole models
    dtype: tuple[str, yaml.Node] | None = None
    out_dtype: tuple[str, yaml.Node] | None = None
    seed: tuple[int, yaml.Node] | None = None
    name: str | None = None
    chat_template: tuple[str, yaml.Node] | None = None   # the value and its key
    tokenizer: Tokenizer | None = None
    module: str | None = None       # the one entry of `modules:`, when the config has it
    module_params: Params = field(default_factory=dict)   # its `parameters:`


def read_config(read: Reader) -> Config:
    """Read and check the config; raises MergeError at the first problem."""
    root = read.root()
    top = read.mapping(root, "a mergekit config", TOP_KEYS, _TOP_HINTS, lenient=True)
    if "merge_method" not in top:
        raise read.fail("the config has no merge_method", root,
                        hint=f"add e.g. `merge_method: ties`; mergekit {MERGEKIT_VERSION} "
                             f"has: {', '.join(METHODS)}")
    method_node = top["merge_method"][1]
    method_name = read.string(method_node, "merge_method")
    if method_name not in METHODS:
        why = NOT_IN_0_1_5.get(method_name)
        raise read.fail(f'unknown merge_method "{method_name}"' + (f": {why}" if why else ""),
                        method_node,
                        hint=did_you_mean(method_name, METHODS)
                        or f"mergekit {MERGEKIT_VERSION}'s methods: {', '.join(METHODS)}")
    method = METHODS[method_name]
    params = Parameters(read, method)

    given = [k for k in ("models", "slices", "modules") if k in top]
    if len(given) != 1:
        raise read.fail("a config has one of `models`, `slices` or `modules`" +
                        (f", not {' and '.join(given)}" if given else ""),
                        top[given[1]][0] if len(given) > 1 else root,
                        hint="list the models to merge under `models:`, or layer ranges "
                             "under `slices:`")
    body, module, module_params = top, None, {}
    if "modules" in top:
        module, body, module_params = _module(read, params, top["modules"][1])
    base = model_ref(read, top["base_model"][1]) if "base_model" in top else None
    top_params = (params.settings(top["parameters"][1], "the top-level parameters",
                                  per_model=False) if "parameters" in top else {})
    if "models" in body:
        slices = [_models(read, params, body["models"][1], base)]
    else:
        slices = _slices(read, params, body["slices"][1])
    config = Config(method, method_node, params, base, top_params, slices,
                    dtype=_dtype(read, top, "dtype"), out_dtype=_dtype(read, top, "out_dtype"),
                    module=module, module_params=module_params)

    if "random_seed" in top:
        node = top["random_seed"][1]
        value = read.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise read.fail("random_seed must be a whole number >= 0", node)
        config.seed = (value, node)
    if "name" in top:
        config.name = str(read.scalar(top["name"][1]))
    if "chat_template" in top:
        key, node = top["chat_template"]
        config.chat_template = (read.string(node, "chat_template"), key)
    config.tokenizer = _tokenizer(read, top)
    return config


def _module(read: Reader, params: Parameters, node: yaml.Node
            ) -> tuple[str, dict[str, tuple[yaml.Node, yaml.Node]], Params]:
    """mergekit's `modules: {NAME: {models|slices, parameters}}`: one module (the decoder
    of a one-module model, which is what real configs give) is the merge itself, its
    parameters a scope between the slice's and the top level's."""
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise read.fail("modules must map a module's name to its `models:` or `slices:`",
                        node, hint="e.g. `modules: {decoder: {models: [...]}}`")
    if len(node.value) > 1:
        names = ", ".join(str(read.scalar(k)) for k, _ in node.value)
        raise read.fail(f"modules lists {len(node.value)} modules ({names}): a separate merge "
                        "per module of a multi-module model cannot be reproduced",
                        node.value[1][0],
                        hint="mergelang merges one stack of layers: keep the module you "
                             "merge, and convert each module's merge on its own")
    key, value = node.value[0]
    name = str(read.scalar(key))
    what = f'the module "{name}"'
    body = read.mapping(value, what, MODULE_KEYS, lenient=True)
    if ("models" in body) == ("slices" in body):
        raise read.fail(f"{what} has either `models` or `slices`"
                        + (", not both" if "models" in body else ""), key)
    settings = (params.settings(body["parameters"][1], f"the parameters of {what}",
                                per_model=False) if "parameters" in body else {})
    return name, body, settings


def model_ref(read: Reader, node: yaml.Node) -> ModelRef:
    """`path`, `path@revision`, `path+lora` or `{model: {path, revision}, lora: ...}`."""
    lora = None
    if isinstance(node, yaml.MappingNode):
        entries = read.mapping(node, "a model reference",
                               ("model", "lora", "override_architecture"), lenient=True)
        if "lora" in entries:
            lora_node = entries["lora"][1]
            if isinstance(lora_node, yaml.MappingNode):
                lora_node = read.mapping(lora_node, "a LoRA path", ("path", "revision"),
                                         lenient=True).get("path", (None, lora_node))[1]
            lora = read.string(lora_node, "lora")
        if "override_architecture" in entries:
            raise read.fail("override_architecture is not supported",
                            entries["override_architecture"][0],
                            hint="mergelang finds layers from tensor names and config.json; "
                                 "remove the key")
        if "model" not in entries:
            raise read.fail("a model reference needs `model:`", node)
        inner = entries["model"][1]
        if isinstance(inner, yaml.MappingNode):
            path_entries = read.mapping(inner, "a model path", ("path", "revision"))
            if "path" not in path_entries:
                raise read.fail("a model path needs `path:`", inner)
            path = read.string(path_entries["path"][1], "path")
            revision = (read.string(path_entries["revision"][1], "revision")
                        if "revision" in path_entries else None)
            return ModelRef(path, revision, path_entries["path"][1], lora)
        node = inner
    text = read.string(node, "a model")
    if "+" in text:
        if text.count("+") > 1 or lora is not None:
            raise read.fail(f'"{text}" has more than one "+"', node,
                            hint="write MODEL+LORA: one model and one adapter")
        text, lora = text.split("+")
        if not text or not lora:
            raise read.fail("MODEL+LORA needs both a model and an adapter", node,
                            hint="e.g. `base_model+path/to/adapter`")
    if text.count("@") > 1:
        raise read.fail(f'"{text}" has more than one "@"', node, hint="write path@revision")
    path, _, revision = text.partition("@")
    return ModelRef(path, revision or None, node, lora)


def _models(read: Reader, params: Parameters, node: yaml.Node,
            base: ModelRef | None) -> SliceDef:
    sources = []
    for item in read.sequence(node, "models"):
        if isinstance(item, yaml.ScalarNode) and not read.is_null(item):
            raise read.fail("each entry of models is `- model: PATH`", item,
                            hint=f"write `- model: {read.scalar(item)}`")
        entries = read.mapping(item, "an entry of models", MODEL_KEYS, lenient=True)
        if "model" not in entries:
            raise read.fail("an entry of models has no `model:`", item)
        ref = model_ref(read, entries["model"][1])
        settings = (params.settings(entries["parameters"][1], f'the parameters of "{ref.path}"',
                                    per_model=True) if "parameters" in entries else {})
        sources.append(SourceDef(ref, None, settings, item))
    if not sources:
        raise read.fail("models is empty", node, hint="list the models to merge")
    _no_duplicates(read, sources)
    if base is not None and base.key not in {s.model.key for s in sources}:
        # mergekit adds the base model to the inputs, without parameters of its own
        sources.append(SourceDef(base, None, {}, base.node, added=True))
    return SliceDef(sources, base, {}, node)


def _slices(read: Reader, params: Parameters, node: yaml.Node) -> list[SliceDef]:
    slices = []
    for item in read.sequence(node, "slices"):
        entries = read.mapping(item, "a slice", SLICE_KEYS, lenient=True)
        if "sources" not in entries:
            raise read.fail("a slice has no `sources:`", item,
                            hint="list `- model: PATH` with `layer_range: [a, b]`")
        sources = []
        for src in read.sequence(entries["sources"][1], "sources"):
            s = read.mapping(src, "a slice source", SOURCE_KEYS, lenient=True)
            if "model" not in s:
                raise read.fail("a slice source has no `model:`", src)
            if "layer_range" not in s:
                raise read.fail("a slice source has no `layer_range:`", src,
                                hint="add e.g. `layer_range: [0, 16]` (layers 0 to 15)")
            ref = model_ref(read, s["model"][1])
            settings = (params.settings(s["parameters"][1], f'the parameters of "{ref.path}"',
                                        per_model=True) if "parameters" in s else {})
            sources.append(SourceDef(ref, _layer_range(read, s["layer_range"][1]), settings,
                                     src))
        if not sources:
            raise read.fail("a slice has no sources", entries["sources"][1])
        _no_duplicates(read, sources)
        lengths = {b - a for a, b in (s.layer_range for s in sources)}
        if len(lengths) > 1:
            raise read.fail("the sources of a slice have different numbers of layers: "
                            f"{sorted(lengths)}", entries["sources"][1],
                            hint="give every source a layer_range of the same length")
        base = model_ref(read, entries["base_model"][1]) if "base_model" in entries else None
        settings = (params.settings(entries["parameters"][1], "the parameters of a slice",
                                    per_model=False) if "parameters" in entries else {})
        if "residual_weight" in entries:
            read.warn("residual_weight is not used by mergekit 0.1.5; it is ignored",
                      entries["residual_weight"][0])
        slices.append(SliceDef(sources, base, settings, item))
    if not slices:
        raise read.fail("slices is empty", node, hint="list at least one slice")
    return slices


def _layer_range(read: Reader, node: yaml.Node) -> tuple[int, int]:
    items = read.sequence(node, "layer_range") if isinstance(node, yaml.SequenceNode) else None
    values = [read.scalar(i) if isinstance(i, yaml.ScalarNode) else None for i in items or ()]
    if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in values)
            or values[0] < 0):
        raise read.fail("layer_range must be two whole numbers [start, end]", node,
                        hint="e.g. `layer_range: [0, 16]`: layers 0 to 15")
    if values[1] <= values[0]:
        raise read.fail(f"layer_range [{values[0]}, {values[1]}] is empty", node,
                        hint="the end is not included: [0, 16] is layers 0 to 15")
    return values[0], values[1]


def _no_duplicates(read: Reader, sources: list[SourceDef]) -> None:
    seen: set[tuple] = set()
    for s in sources:
        if s.model.key in seen:
            raise read.fail(f'"{s.model.path}" is listed twice', s.model.node,
                            hint="mergekit refuses duplicate inputs; list it once")
        seen.add(s.model.key)


def _dtype(read: Reader, top: dict, key: str) -> tuple[str, yaml.Node] | None:
    if key not in top or read.is_null(top[key][1]):
        return None
    node = top[key][1]
    value = read.string(node, key)
    name = value.removeprefix("torch.")
    if name not in DTYPES:
        raise read.fail(f'unknown {key} "{value}"', node,
                        hint=did_you_mean(name, DTYPES) or f"mergekit takes: {', '.join(DTYPES)}")
    return name, node


def _tokenizer(read: Reader, top: dict) -> Tokenizer | None:
    if "tokenizer_source" in top and "tokenizer" in top:
        raise read.fail("give tokenizer_source or tokenizer, not both", top["tokenizer"][0])
    tokens: tuple[TokenSource, ...] = ()
    pad_to = None
    if "tokenizer" in top:
        key, node = top["tokenizer"]
        entries = read.mapping(node, "tokenizer", TOKENIZER_KEYS)
        if "tokens" in entries:
            tokens = _tokens(read, entries["tokens"][1])
        if "pad_to_multiple_of" in entries and not read.is_null(entries["pad_to_multiple_of"][1]):
            value_node = entries["pad_to_multiple_of"][1]
            value = read.scalar(value_node) if isinstance(value_node, yaml.ScalarNode) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise read.fail("pad_to_multiple_of must be a whole number >= 1", value_node)
            pad_to = (value, value_node)
        what = "tokenizer.source"
        if "source" not in entries:   # mergekit's default source is "union"
            return Tokenizer(what, "union", None, key, tokens, pad_to)
        source = entries["source"][1]
    elif "tokenizer_source" in top:
        key, source = top["tokenizer_source"]
        what = "tokenizer_source"
        if read.is_null(source):
            return None
    else:
        return None
    if isinstance(source, yaml.ScalarNode) and read.scalar(source) in ("union", "base"):
        return Tokenizer(what, read.scalar(source), None, key, tokens, pad_to)
    return Tokenizer(what, None, _legacy_model(model_ref(read, source)), key, tokens, pad_to)


def _legacy_model(ref: ModelRef) -> ModelRef:
    """mergekit's old spelling `model:PATH` of a tokenizer source: the prefix is dropped."""
    if ref.path.startswith("model:"):
        return dataclasses.replace(ref, path=ref.path.removeprefix("model:"))
    return ref


def _tokens(read: Reader, node: yaml.Node) -> tuple[TokenSource, ...]:
    """`tokens: {TOKEN: {source: MODEL | {kind: zero}, force: BOOL}}`."""
    if not isinstance(node, yaml.MappingNode):
        raise read.fail("tokenizer.tokens must map each token to its `source:`", node,
                        hint='e.g. `tokens: {"<|im_start|>": {source: chat_model}}`')
    found = []
    for key, value in node.value:
        token = read.string(key, "a token")
        entries = read.mapping(value, f'the token "{token}"', ("source", "force"))
        if "source" not in entries:
            raise read.fail(f'the token "{token}" has no `source:`', value,
                            hint="give a model, or `{kind: zero}`")
        force = read.scalar(entries["force"][1]) if "force" in entries else False
        if not isinstance(force, bool):
            raise read.fail("force must be true or false", entries["force"][1])
        source = entries["source"][1]
        ref = None
        if isinstance(source, yaml.MappingNode) and "kind" in {read.scalar(k) for k, _ in
                                                                source.value}:
            kind = read.mapping(source, "a token source", ("kind", "model", "token",
                                                             "token_id"))
            name = read.scalar(kind["kind"][1])
            if name == "model_token":
                ref, other = _model_token(read, kind, source)
                found.append(TokenSource(token, ref, force, key, other))
                continue
            if name != "zero":
                raise read.fail(f'unknown token source kind "{name}"', kind["kind"][1],
                                hint="mergekit takes: zero, model_token")
        else:
            ref = model_ref(read, source)
        found.append(TokenSource(token, ref, force, key))
    return tuple(found)


def _model_token(read: Reader, entries: dict, node: yaml.Node) -> tuple[ModelRef, str | int]:
    """`{kind: model_token, model: M, token: T}` or `token_id: N`: the row of another token
    of M (exactly one of the two, as mergekit requires)."""
    if "model" not in entries:
        raise read.fail("a model_token source needs `model:`", node,
                        hint="e.g. `{kind: model_token, model: chat_model, token: \"</s>\"}`")
    given = [k for k in ("token", "token_id") if k in entries]
    if len(given) != 1:
        raise read.fail("a model_token source takes one of `token:` or `token_id:`",
                        entries[given[1]][0] if given else node,
                        hint="give the token's string, or its id in that model")
    value_node = entries[given[0]][1]
    if given[0] == "token":
        return model_ref(read, entries["model"][1]), read.string(value_node, "a token")
    value = read.scalar(value_node) if isinstance(value_node, yaml.ScalarNode) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise read.fail("token_id must be a whole number >= 0", value_node)
    return model_ref(read, entries["model"][1]), value
