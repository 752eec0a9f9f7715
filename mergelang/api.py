"""The Python API (LANGUAGE.md §7): compile once, then check, graph, run or evaluate.

`Program` strings the stages together; each stage stays a plain function in its own
module, so an embedding tool can also call them one by one.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .bind import NUM_LAYERS_KEYS, bind
from .builtins import DTYPES
from .compiled import Expression
from .devices import parse_devices
from .diagnostics import Diagnostic, MergeError, Source, Span, error, move_to_script
from .execute import execute
from .extraction.form import layout
from .io.adapter import writer as adapter_writer
from .io.errors import ModelFileError
from .io.hf import OutputFolder, check_target, write_donor_files, write_model_card
from .io.tokenizer import vocab_size_updates, write_output_tokenizer
from .io.write import OutputTensor, ShardedWriter, parse_size
from .lower import Lowered, lower
from .params import Override, Value, overrides_of, with_overrides_noted
from .plan import Plan, TensorPlan, plan
from .resolve import resolve
from .schedule import DEFAULT_BUDGET, Order, schedule
from .syntax import parse

if TYPE_CHECKING:
    import networkx

    from .cluster import Cluster

DEFAULT_SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class Summary:
    """What `check` reports: the plan in numbers, nothing loaded."""

    tensors: int
    outputs: int
    models: list[str]
    donor: str | None
    input_bytes: int
    output_bytes: int
    peak_bytes: int
    copied: int  # non-float tensors copied as they are
    warnings: tuple[Diagnostic, ...] = ()  # found binding and planning (check prints them)


class Program:
    """A compiled script: parsed, resolved and lowered; models not opened yet.

    `params` gives script parameters (`param NAME = literal`) other values than their
    defaults: a mapping of names to numbers, strings, booleans, None or lists."""

    def __init__(self, source_text: str, path: str | Path | None = None,
                 params: Mapping[str, object] | Iterable[Override] | None = None):
        self.path = Path(path) if path is not None else None
        name = str(path) if path is not None else "<script>"
        self.module = parse(source_text, name, self.path.resolve() if self.path else None)
        self.resolved = resolve(self.module)
        overrides = overrides_of(params)
        with with_overrides_noted(overrides):
            self.lowered = lower(self.resolved, overrides=overrides)

    @property
    def params(self) -> dict[str, Value]:
        """Each script parameter's value in this compilation (its override or default)."""
        return dict(self.lowered.script_params)

    @property
    def source_text(self) -> str:
        return self.module.source.text

    def _lowered(self, seed: int | None, dtype: str | None, out_dtype: str | None) -> Lowered:
        if self.lowered.output is None:
            raise error("the script has no `output`", _end_of(self.module.source),
                        hint="add a line such as `output base + ties(a - base, b - base)`")
        changes = {k: v for k, v in (("seed", seed), ("dtype", dtype), ("out_dtype", out_dtype))
                   if v is not None}
        for key in ("dtype", "out_dtype"):
            _check_dtype(key, changes.get(key))
        return dataclasses.replace(self.lowered, **changes)

    def plan(self, seed: int | None = None, dtype: str | None = None,
             out_dtype: str | None = None) -> Plan:
        """Bind the models (headers only) and plan every output tensor. The plan holds
        the model files open: use it in a `with` block, or close() it."""
        bound = bind(self._lowered(seed, dtype, out_dtype))
        try:
            p = plan(bound)
            if self.lowered.form is not None:
                layout(self.lowered.form, p)  # the rank against the shapes, from headers
            return p
        except MergeError as exc:
            bound.close()
            raise MergeError(self.in_script(exc.diagnostics)) from None
        except BaseException:
            bound.close()
            raise

    def in_script(self, diagnostics: list[Diagnostic]) -> list[Diagnostic]:
        """Diagnostics raised past lowering (plan, execute, a writer) located in this
        script: one at no place, or inside the standard library, points at the output."""
        return move_to_script(diagnostics, self.lowered.output_span)

    def check(self) -> Summary:
        """Everything short of loading a tensor. Raises MergeError."""
        with self.plan() as p:
            return summarize(p)

    def graph(self) -> networkx.DiGraph:
        """The plan as one networkx.DiGraph (see plan.build_graph)."""
        with self.plan() as p:
            return p.graph

    def run(self, out: str | Path, device: str = "cpu", *, force: bool = False,
            shard_size: int | str = DEFAULT_SHARD_SIZE, strict: bool = False,
            seed: int | None = None, dtype: str | None = None, out_dtype: str | None = None,
            max_memory: int | str = DEFAULT_BUDGET,
            progress: Callable[[TensorPlan], None] | None = None,
            on_plan: Callable[[Plan], None] | None = None,
            order: Order | None = None, cluster: Cluster | None = None) -> list[Diagnostic]:
        """Merge into the Hugging Face folder `out`. Returns warnings; raises MergeError.

        `max_memory` bounds the tensor data held at once (large tensors are computed in
        row blocks to stay under it). The folder appears only when the merge is
        complete; on any error nothing is left at `out`. `cluster`: a
        `mergelang.cluster.Cluster`, to compute the shards on its Dask workers
        (the same bytes; `max_memory` then bounds each task)."""
        out = Path(out)
        shard_bytes = _size(shard_size, "--shard-size 5GB")
        budget = _size(max_memory, "--max-memory 2GB")
        if cluster is None:
            parse_devices(device)
        else:  # the workers compute: their devices count, not this machine's
            cluster.check_device(device)
        reads = [*self.lowered.models, *([self.path] if self.path else [])]
        _check_target(out, force, reads)
        form = self.lowered.form  # an adapter takes the deltas at compute precision
        with self.plan(seed, dtype, out_dtype if form is None else
                       dtype or self.lowered.dtype) as p:
            if on_plan is not None:
                on_plan(p)
            try:
                output = OutputFolder(out, force, protect=[*reads, *p.bound.input_paths()])
                with output as folder:
                    write = _write if cluster is None else cluster.write
                    if form is not None:
                        write = adapter_writer(form, out_dtype, cluster)
                    warnings = write(self, p, folder, device, shard_bytes, strict, progress,
                                     budget, order)
                return [Diagnostic(n, severity="warning") for n in output.notes] \
                    + p.warnings + warnings
            except ModelFileError as exc:
                raise error(exc.message, None, hint=exc.hint) from None


def _size(value: int | str, example: str) -> int:
    try:
        return parse_size(value if isinstance(value, str) else str(value), minimum=1)
    except ValueError as exc:
        raise error(str(exc), None, hint=f"e.g. {example}") from None


def _end_of(source: Source) -> Span:
    """Just after the last line with text: where a missing statement would go."""
    lines = source.text.splitlines()
    line = next((i for i in range(len(lines), 0, -1) if lines[i - 1].strip()), 1)
    col = len(lines[line - 1]) + 1 if lines else 1
    return Span(source, line, col, line, col + 1)


def _check_dtype(key: str, value: str | None) -> None:
    if value is not None and value not in DTYPES:
        raise error(f'unknown {key} "{value}"', None, hint=f"use one of {', '.join(DTYPES)}")


def _check_target(out: Path, force: bool, reads: list) -> None:
    try:
        check_target(out, force, reads)
    except ModelFileError as exc:
        raise error(exc.message, None, hint=exc.hint) from None


def _write(program: Program, p: Plan, folder: Path, device: str, shard_bytes: int,
           strict: bool, progress, budget: int, order: Order | None) -> list[Diagnostic]:
    layout = [OutputTensor(t.name, t.shape, t.out_dtype) for t in p.tensors]
    writer = ShardedWriter(folder, layout, shard_bytes,
                           {"mergelang_script": program.source_text})
    try:
        warnings = program.in_script(execute(p, writer.write_rows, device, strict, progress,
                                              budget, order))
    except MergeError as exc:
        raise MergeError(program.in_script(exc.diagnostics)) from None
    writer.close()
    write_folder_files(program, p, folder)
    return warnings


def write_folder_files(program: Program, p: Plan, folder: Path) -> None:
    """Everything in the output folder but the shards and index: config, tokenizer and
    generation files from the donor, and the model card."""
    script_name = program.path.name if program.path else "merge.merge"
    donor = p.bound.donor
    updates: dict = {"torch_dtype": _main_dtype(p.tensors)}
    if donor is not None and p.num_layers != donor.num_layers:  # a stack
        key = next((k for k in NUM_LAYERS_KEYS if k in (donor.source.config or {})),
                   "num_hidden_layers")
        updates[key] = p.num_layers
    if p.bound.vocab is not None:   # `set vocab`: the tokenizer and rows of the output's
        updates.update(vocab_size_updates(donor.source.config if donor else None,
                                          p.bound.vocab.rows))
    write_donor_files(folder, donor.source.folder if donor else None, updates)
    if p.bound.vocab is not None:
        write_output_tokenizer(folder, p.bound.vocab, donor.source.folder if donor else None)
    write_model_card(folder, program.source_text, script_name)


def _main_dtype(tensors: list[TensorPlan]) -> str:
    counts = Counter(t.out_dtype for t in tensors if t.out_dtype.is_floating_point)
    dtype = counts.most_common(1)[0][0] if counts else torch.float32
    return str(dtype).removeprefix("torch.")


def summarize(p: Plan) -> Summary:
    donor = p.bound.donor
    return Summary(
        tensors=sum(1 for t in p.tensors for n in t.nodes if not n.is_const),
        outputs=len(p.tensors),
        models=[m.display for m in p.bound.models.values()],
        donor=donor.display if donor else None,
        input_bytes=p.input_bytes,
        output_bytes=p.output_bytes,
        peak_bytes=max((k.working_set(p.compute_dtype.itemsize) for k in schedule(p)),
                       default=0),
        copied=sum(t.copy_only for t in p.tensors),
        warnings=tuple(p.warnings),
    )


def compile(source_text: str, path: str | Path | None = None,  # noqa: A001
            params: Mapping[str, object] | None = None) -> Program:
    """Compile a script (parse, resolve, lower); `params` overrides its `param`
    defaults, e.g. {"density": 0.3}. Raises MergeError."""
    return Program(source_text, path, params)


def load(path: str | Path, params: Mapping[str, object] | None = None) -> Program:
    """Compile a `.merge` file; relative model paths resolve against its folder;
    `params` overrides its `param` defaults, e.g. {"density": 0.3}."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}", None,
                    hint="check the script's path") from None
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {path}: it is not UTF-8 text (byte {exc.start})", None,
                    hint="save the script as UTF-8") from None
    return Program(text, path, params)


def expression(text: str, /, library: str | Path | None = None) -> Expression:
    """Compile an expression once, to call on tensors or state dicts many times:

        merge = mergelang.expression("base + ties(a - base, b - base, density=d)")
        merge(base=..., a=..., b=..., d=0.3)

    Its free names are its inputs: tensors or state dicts (models), or numbers and
    strings (values known at each call). `library` names a .merge file of `fn`
    definitions the expression may call. Raises MergeError."""
    return Expression(text, library)


def evaluate(text: str, /, *, seed: int = 0, device: str = "cpu",
             dtype: str = "float32", **inputs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
    """Evaluate an expression once on tensors or state dicts held in memory; no files.

    Each keyword names an input: a tensor, or a state dict (name -> tensor), or a
    number or string. Tensors give a tensor back; state dicts give a state dict with
    every name the expression defines. `seed`, `device` and `dtype` are reserved
    keywords. See `expression` to compile once and call many times."""
    return Expression(text)(seed=seed, device=device, dtype=dtype, **inputs)


__all__ = ["Program", "Summary", "compile", "load", "evaluate", "expression", "MergeError"]
