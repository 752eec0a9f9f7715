"""Task files: JSONL, one `{"task", "prompt", "answer"}` object a line (LANGUAGE.md §6).

A bad line is an input error like any other in mergelang: it is reported with its
file:line:col, the line itself and a caret, and the command exits with status 2, before
any model is loaded. A file with no records is an error too: a sweep scored on an empty
task would compare zeros and pick a merge for no reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..diagnostics import Diagnostic, MergeError, Source, Span

FIELDS = ("task", "prompt", "answer")
EXAMPLE = '{"task": "math", "prompt": "12+30=", "answer": "42"}'


def load_tasks(paths: Iterable[str | Path]) -> list[dict]:
    """Every record of every file, in order, as `{"task", "prompt", "answer"}` dicts.

    Raises MergeError naming file:line for a line that is not a JSON object with string
    values for the three fields, and for a missing or empty file. Blank lines are skipped.
    """
    records: list[dict] = []
    problems: list[Diagnostic] = []
    for path in paths:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(Diagnostic(f"task file not found: {path}",
                                       hint="a task file is JSONL, one object a line: "
                                            + EXAMPLE))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Diagnostic(f"cannot read task file {path}: {exc}"))
            continue
        found, bad = _parse(path, text)
        problems += bad
        if not found and not bad:
            problems.append(Diagnostic(f"task file {path} is empty: it has no records",
                                       hint="one object a line: " + EXAMPLE))
        records += found
    if problems:
        raise MergeError(problems)
    return records


def check_records(records: Iterable[Mapping]) -> list[dict]:
    """Records given in memory, checked like a file's lines (`record N` instead of a line)."""
    out: list[dict] = []
    for i, rec in enumerate(records, 1):
        problem = _problem(rec)
        if problem:
            raise MergeError(Diagnostic(f"task record {i}: {problem}", hint="e.g. " + EXAMPLE))
        out.append({k: rec[k] for k in FIELDS})
    if not out:
        raise MergeError(Diagnostic("no tasks to score", hint="e.g. [" + EXAMPLE + "]"))
    return out


def _parse(path: Path, text: str) -> tuple[list[dict], list[Diagnostic]]:
    source = Source(str(path), text, path)
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        col = len(line) - len(line.lstrip()) + 1
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            col = exc.colno
            problem = f"not valid JSON ({exc.msg})"
        else:
            problem = _problem(rec)
        if problem:
            span = Span(source, number, col, number, max(col + 1, len(line.rstrip()) + 1))
            problems.append(Diagnostic(f"malformed task line: {problem}", span,
                                       hint="one object a line: " + EXAMPLE))
            if len(problems) >= 5:  # enough to show the pattern; the rest is noise
                break
            continue
        records.append({k: rec[k] for k in FIELDS})
    return records, problems


def _problem(rec: object) -> str | None:
    """What is wrong with one decoded record, or None."""
    if not isinstance(rec, Mapping):
        return f"expected a JSON object, found {type(rec).__name__}"
    missing = [k for k in FIELDS if k not in rec]
    if missing:
        return "missing " + ", ".join(f'"{k}"' for k in missing)
    wrong = [k for k in FIELDS if not isinstance(rec[k], str)]
    if wrong:
        return ", ".join(f'"{k}"' for k in wrong) + " must be a string"
    if not rec["task"].strip():
        return '"task" is empty'
    return None


def by_task(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by task name, tasks in order of first appearance."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(rec["task"], []).append(rec)
    return groups
