"""A method's parameters: read from the YAML, then resolved per tensor mergekit's way.

A setting is what one `parameters:` mapping says about one parameter: a value, a
gradient (a list of numbers), or `{filter, value}` entries. Resolving a parameter for
one model walks mergekit's scopes (the model's, the slice's, the top level's, then the
default): the first scope that sets it wins, and filters that match nothing fall
through to the next scope. The result is a per-tensor value: `Const`, `Grad`, or `When`
a tensor name contains a filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ..diagnostics import did_you_mean
from .methods import REQUIRED, MkMethod, MkParam
from .reading import Reader, node_kind


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


@dataclass(frozen=True)
class Const:
    value: Any


@dataclass(frozen=True)
class Grad:
    values: tuple


@dataclass(frozen=True)
class When:
    """`then` for tensors whose name contains `filter`, else `orelse`."""

    filter: str
    then: Const | Grad
    orelse: Const | Grad | When


Value = Const | Grad | When


class Parameters:
    """Reads and resolves the parameters of one method."""

    def __init__(self, read: Reader, method: MkMethod):
        self.read = read
        self.method = method

    def settings(self, node: yaml.Node, what: str, per_model: bool) -> Params:
        """The settings of one `parameters:` mapping (`what` names it in messages)."""
        read, method = self.read, self.method
        if read.is_null(node):
            return {}
        names = tuple(p.name for p in method.params)
        hints = {"filter": "a filter goes inside a parameter: `weight: [{filter: mlp, "
                           "value: 0.5}, {value: 1.0}]`"}
        if not isinstance(node, yaml.MappingNode):
            raise read.fail(f"{what} must be a mapping of keys to values, not "
                            f"{node_kind(node)}", node, hint="e.g. `weight: 0.5`")
        out: Params = {}
        for key, value in node.value:
            name = read.scalar(key) if isinstance(key, yaml.ScalarNode) else None
            if not isinstance(name, str):
                raise read.fail(f"a key in {what} must be a word", key)
            if name in out:
                raise read.fail(f'"{name}" appears twice in {what}', key,
                                hint="keep one (mergekit would silently use the last)")
            param = method.param(name)
            if param is None:   # mergekit passes a method only the parameters it declares
                read.ignore(key, f'"{name}" in {what}',
                            f"mergekit's {method.name} has no parameter {name} and ignores it",
                            hint=hints.get(name) or did_you_mean(name, names))
                continue
            if per_model and not param.per_model:
                read.ignore(key, f"{name} in {what}",
                            f"{name} is one value for the whole merge, and mergekit ignores "
                            "it in a model's parameters",
                            hint="move it to the top-level `parameters:` (or a slice's) "
                                 "if it is meant")
                continue
            out[name] = Setting(name, self._entries(value, param), key)
        return out

    def _entries(self, node: yaml.Node, param: MkParam) -> tuple[Entry, ...]:
        read = self.read
        if isinstance(node, yaml.MappingNode):
            return (self._conditional(node, param),)
        if not isinstance(node, yaml.SequenceNode):
            return (Entry(None, self._value(node, param), node),)
        items = node.value
        if not items:
            raise read.fail(f"{param.name} is an empty list", node,
                            hint="give a number, or a list of numbers (a gradient)")
        if all(isinstance(i, yaml.MappingNode) for i in items):
            entries = tuple(self._conditional(i, param) for i in items)
            catch_all = [i for i, e in enumerate(entries) if e.filter in (None, "*")]
            if catch_all and catch_all[0] < len(entries) - 1:
                read.warn(f"the entries of {param.name} after the one without a filter "
                          "are never used (mergekit takes the first match)",
                          entries[catch_all[0] + 1].node)
            return entries
        if any(isinstance(i, yaml.MappingNode) for i in items):
            raise read.fail(f"{param.name} mixes `{{filter, value}}` entries with "
                            "plain values", node,
                            hint="write the plain value as `{value: ...}` last")
        return (Entry(None, self._gradient(node, param), node),)

    def _conditional(self, node: yaml.Node, param: MkParam) -> Entry:
        read = self.read
        entries = read.mapping(
            node, f"an entry of {param.name}", ("filter", "value"),
            {"pattern": "mergekit 0.1.5 reads `filter`, so as written this entry matches "
                        "every tensor: rename it `filter` if it is meant for those tensors "
                        "only"}, lenient=True)
        if "value" not in entries:
            raise read.fail(f"an entry of {param.name} has no `value:`", node,
                            hint="write `{filter: self_attn, value: 0.5}`")
        filt = None
        if "filter" in entries:
            filt = read.scalar(entries["filter"][1]) \
                if isinstance(entries["filter"][1], yaml.ScalarNode) else None
            if filt is not None and not isinstance(filt, str):
                filt = str(filt) if isinstance(filt, int) and not isinstance(filt, bool) else None
            if filt is None:
                raise read.fail("a filter is a piece of a tensor name, e.g. self_attn",
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
        """One scalar, validated the way mergekit validates the parameter's type."""
        wrong = f"{param.name} must be a {_type_word(param.type)}, not {node_kind(node)}"
        if not isinstance(node, yaml.ScalarNode):
            raise self.read.fail(wrong, node)
        value = self.read.scalar(node)
        if param.type is bool:   # as pydantic (mergekit's validator) reads a boolean
            if isinstance(value, bool):
                return value
            if isinstance(value, int | float) and value in (0, 1):
                return bool(value)
            if isinstance(value, str) and value.lower() in _BOOL_WORDS:
                return _BOOL_WORDS[value.lower()]
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
        raise self.read.fail(wrong, node)

    def resolve(self, param: MkParam, scopes: list[Params], owner: yaml.Node,
                who: str) -> Value:
        """A parameter's value per tensor, mergekit's way: the first scope that sets it;
        filters that match nothing fall through to the next scope, then the default.
        `owner` and `who` say whose value it is, for the error when there is none."""
        for i, params in enumerate(scopes):
            if param.name in params:
                setting = params[param.name]
                rest = scopes[i + 1:]

                def chain(j: int, entries=setting.entries, rest=rest, key=setting.key) -> Value:
                    if j == len(entries):
                        return self.resolve(param, rest, key, who)
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

    def _leaf(self, value: Any, param: MkParam, node: yaml.Node) -> Const | Grad:
        if param.unsupported is not None and value == param.unsupported:
            raise self.read.fail(f"{param.name}: {str(value).lower()} is not supported for "
                                 f"{self.method.name}", node, hint=param.why)
        if isinstance(value, tuple):
            return Grad(value) if len(set(value)) > 1 else Const(value[0])
        return Const(value)


_BOOL_WORDS = {**dict.fromkeys(("1", "on", "t", "true", "y", "yes"), True),
               **dict.fromkeys(("0", "off", "f", "false", "n", "no"), False)}


def _type_word(t: type) -> str:
    return {bool: "true or false", int: "whole number"}.get(t, "number")
