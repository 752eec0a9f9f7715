"""Reading YAML with line positions, so that every complaint points into the config.

The YAML is read with `yaml.compose`, not `yaml.safe_load`: every node keeps its line and
column, and a `Reader` turns a node into a `Span` of the config's `Source`. So an unknown
key, a wrong type or an impossible value is a `MergeError` shown with the YAML line and
a caret, like any error in a script; warnings are located the same way.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..diagnostics import Diagnostic, MergeError, Source, Span, did_you_mean, error

_CONSTRUCTOR = yaml.constructor.SafeConstructor()


class Reader:
    """Reads the nodes of one YAML config, and collects the warnings about it."""

    def __init__(self, source: Source):
        self.source = source
        self.warnings: list[Diagnostic] = []
        self.ignored: list[str] = []   # what mergekit ignores, for the script's head comments

    def root(self) -> yaml.Node:
        """The document's root node; invalid, empty and multi-document YAML are errors."""
        try:
            root = yaml.compose(self.source.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            raise self._yaml_error(exc) from None
        except yaml.YAMLError as exc:
            raise error(f"{self.source.name} is not valid YAML: {exc}") from None
        if root is None:
            raise error(f"{self.source.name} is empty",
                        hint="a mergekit config has at least merge_method and models")
        return root

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

    def span(self, node: yaml.Node) -> Span:
        """Where `node` is: a scalar whole, a block collection its first line."""
        start, end = node.start_mark, node.end_mark
        if isinstance(node, yaml.ScalarNode) or end.line == start.line:
            return Span(self.source, start.line + 1, start.column + 1, end.line + 1,
                        max(end.column, start.column + 1) + 1)
        return Span(self.source, start.line + 1, start.column + 1, start.line + 1,
                    len(self.source.line(start.line + 1)) + 1)

    def fail(self, message: str, node: yaml.Node | None, hint: str | None = None,
             notes: tuple[str, ...] = ()) -> MergeError:
        """An error at `node`, to raise."""
        return error(message, self.span(node) if node is not None else None, hint, notes)

    def warn(self, message: str, node: yaml.Node) -> None:
        self.warnings.append(Diagnostic(message, self.span(node), severity="warning"))

    def ignore(self, node: yaml.Node, what: str, effect: str = "mergekit ignores it",
               hint: str | None = None) -> None:
        """Something mergekit accepts and does nothing with (or nothing the result shows):
        a warning at `node`, and a note for the script's head, never an error."""
        line = node.start_mark.line + 1
        self.ignored.append(f"{what} (line {line}): {effect}; so does this script")
        self.warnings.append(Diagnostic(f"{what}: {effect}; so does this script",
                                        self.span(node), severity="warning",
                                        hint=hint))

    def scalar(self, node: yaml.Node) -> Any:
        return _CONSTRUCTOR.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...],
                hints: dict[str, str] | None = None, lenient: bool = False
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's (key node, value node) by key, checked against `allowed`. With
        `lenient` (where mergekit's schema lets extra keys through and ignores them), an
        unknown key is a warning and a note, not an error."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(f"{what} must be a mapping of keys to values, not "
                            f"{node_kind(node)}", node,
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
                if lenient:
                    self.ignore(key, f'unknown key "{name}" in {what}', hint=hint)
                    continue
                raise self.fail(f'unknown key "{name}" in {what}', key, hint=hint,
                                notes=(f"expected one of: {', '.join(allowed)}",))
            out[name] = (key, value)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(f"{what} must be a list, not {node_kind(node)}", node,
                            hint="write one `- ...` line per entry")
        return list(node.value)

    def string(self, node: yaml.Node, what: str) -> str:
        value = self.scalar(node) if isinstance(node, yaml.ScalarNode) else None
        if not isinstance(value, str) or not value:
            raise self.fail(f"{what} must be a string, not {node_kind(node)}", node)
        return value

    def is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and self.scalar(node) is None


def node_kind(node: yaml.Node) -> str:
    """What a node is, in words, for "must be ..., not ..." messages."""
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
