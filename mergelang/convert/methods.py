"""mergekit 0.1.5's merge methods, and what each becomes in mergelang.

`METHODS` is the one place that says which stdlib function a mergekit method calls, how
its inputs are passed (`form`), which of its parameters map to which keyword, and which
have no counterpart; docs/convert.md is its prose form. A test checks every keyword here
against the standard library's signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MERGEKIT_VERSION = "0.1.5"
REQUIRED = object()  # the default of a parameter mergekit requires


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
    in_dtype: bool = False        # mergekit makes it a tensor of the compute dtype (rounded)


@dataclass(frozen=True)
class MkMethod:
    """A mergekit merge method: its inputs, as mergekit counts them, and its parameters."""

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
_WEIGHT = MkParam("weight", float, per_model=True, keyword="weights", in_dtype=True)


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
        MkParam("weight", float, per_model=True, keyword="weights", in_dtype=True),
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
NOT_IN_0_1_5 = {
    "ranked_ties": "it is not a merge method of mergekit 0.1.5",
    "dare": "mergekit 0.1.5 calls it dare_ties or dare_linear",
    "task_arithmetic_ties": "mergekit 0.1.5 calls it ties",
}
