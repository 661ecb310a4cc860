"""The registry of merge methods: one explicit dict, name -> MergeMethod.

Parameters are declared here, once per method family. Everything else (recipe
validation, the search space) reads them from this registry.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.errors import EvomergeError

__all__ = ["METHODS", "MergeMethod", "Param", "TensorInputs", "get_method"]

# Search ranges follow the Evolutionary Model Merge paper: weights in [0, 1],
# densities in (0, 1]. Every search range is non-negative. A recipe may go
# outside them (a negative weight, slerp t < 0 or > 1) as mergekit allows;
# only ``limits`` and finiteness (checked in Param.validate) hold there.
_WEIGHT = Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="scale of this model's task vector")
_DENSITY = Param(
    "density",
    float,
    "per_model",
    default=1.0,
    limits=(0.0, 1.0),
    open_low=True,
    bounds=(0.1, 1.0),
    doc="fraction of the task vector kept",
)
_LAMBDA = Param("lambda", float, default=1.0, bounds=(0.5, 1.5), doc="scale of the combined task vector")
_INT8_MASK = Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no numeric effect")
_GAMMA = Param(
    "gamma", float, "per_model", default=0.01, limits=(0.0, 1.0), bounds=(0.0, 0.1), doc="largest fraction removed"
)
_EPSILON = Param(
    "epsilon",
    float,
    "per_model",
    default=0.15,
    limits=(0.0, 1.0),
    bounds=(0.01, 0.3),
    doc="spread of keep probabilities",
)
_RAM_EPSILON = Param(
    "epsilon",
    float,
    default=1e-5,
    limits=(0.0, math.inf),
    doc="changes of at most this size count as none",
)

_REFS = {
    "task_arithmetic": "https://arxiv.org/abs/2212.04089",
    "ties": "https://arxiv.org/abs/2306.01708",
    "dare": "https://arxiv.org/abs/2311.03099",
    "breadcrumbs": "https://arxiv.org/abs/2312.06795",
    "della": "https://arxiv.org/abs/2406.11617",
}


def _task_arithmetic_family(
    name: str, consensus: bool, sparsify: str | None, normalize: bool, rescale: bool, ref: str
) -> MergeMethod:
    from evomerge.engine.methods.task_arithmetic import generalized_task_arithmetic

    params = [
        _INT8_MASK,
        Param("normalize", bool, default=normalize, doc="divide by the sum of the weights kept"),
        Param("rescale", bool, default=rescale, doc="rescale sparsified vectors to their original L1 norm"),
        _LAMBDA,
        _WEIGHT,
        _DENSITY,
    ]
    if sparsify == "magnitude_outliers":
        params.append(_GAMMA)
    if sparsify == "della":
        params.append(_EPSILON)
    return MergeMethod(
        name=name,
        fn=partial(generalized_task_arithmetic, consensus=consensus, sparsify=sparsify),
        params=tuple(params),
        base="required",
        random=sparsify in ("random", "della"),
        options={"consensus": consensus, "sparsify": sparsify},
        reference=_REFS[ref],
    )


def _build() -> dict[str, MergeMethod]:
    from evomerge.engine.methods import linear, sce, selective, slerp

    family = [
        # name, TIES consensus, sparsification, default normalize, default rescale, reference
        ("task_arithmetic", False, None, False, False, "task_arithmetic"),
        ("ties", True, "magnitude", True, False, "ties"),
        ("dare_ties", True, "random", False, True, "dare"),
        ("dare_linear", False, "random", False, True, "dare"),
        ("breadcrumbs", False, "magnitude_outliers", False, False, "breadcrumbs"),
        ("breadcrumbs_ties", True, "magnitude_outliers", False, False, "breadcrumbs"),
        ("della", True, "della", True, True, "della"),
        ("della_linear", False, "della", False, True, "della"),
    ]
    methods = [_task_arithmetic_family(*row) for row in family]
    methods += [
        MergeMethod(
            "linear",
            linear.linear,
            (
                Param("weight", float, "per_input", bounds=(0.0, 1.0), doc="weight of this model"),
                Param("normalize", bool, default=True, doc="divide by the sum of the weights"),
            ),
            reference="https://arxiv.org/abs/2203.05482",
            check=linear.check_weights,
        ),
        MergeMethod(
            "slerp",
            slerp.slerp,
            (Param("t", float, bounds=(0.0, 1.0), doc="0 gives the base, 1 the other model"),),
            base="required",
            min_inputs=2,
            max_inputs=2,
            base_is_endpoint=True,
        ),
        MergeMethod(
            "nuslerp",
            slerp.nuslerp,
            (
                Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="relative weight of this model"),
                Param("nuslerp_row_wise", bool, default=False, doc="slerp columns instead of rows"),
                Param("nuslerp_flatten", bool, default=True, doc="slerp the whole tensor as one vector"),
            ),
            base="optional",
            exact_non_base=2,
        ),
        MergeMethod(
            "model_stock",
            linear.model_stock,
            (Param("filter_wise", bool, default=False, doc="one ratio per row instead of per tensor"),),
            base="required",
            min_inputs=3,
            reference="https://arxiv.org/abs/2403.19522",
        ),
        MergeMethod(
            "passthrough",
            linear.passthrough,
            (Param("scale", float, "per_input", default=None, bounds=(0.0, 2.0), doc="multiply the tensor"),),
            max_inputs=1,
        ),
        MergeMethod(
            "multislerp",
            slerp.multislerp,
            (
                Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="weight of this model"),
                Param("normalize_weights", bool, default=True, doc="divide the weights by their sum"),
                Param(
                    "eps",
                    float,
                    default=1e-8,
                    limits=(0.0, math.inf),
                    open_low=True,
                    doc="added to norms against division by zero",
                ),
            ),
            base="optional",
            min_non_base=1,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            check=slerp.check_multislerp_weights,
        ),
        MergeMethod(
            "nearswap",
            selective.nearswap,
            (
                Param(
                    "t",
                    float,
                    limits=(0.0, math.inf),
                    bounds=(0.0, 0.01),
                    doc="how far each entry moves from the base toward the other model, at most",
                ),
            ),
            base="required",
            min_inputs=2,
            max_inputs=2,
            base_is_endpoint=True,
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
        MergeMethod(
            "karcher",
            slerp.karcher,
            (
                Param("max_iter", int, default=10, limits=(0, math.inf), doc="most Riemannian steps taken"),
                Param("tol", float, default=1e-5, limits=(0.0, math.inf), doc="stop once a step is shorter"),
            ),
            reference="https://arxiv.org/abs/2603.04972",
        ),
        MergeMethod(
            "sce",
            sce.sce,
            (
                _INT8_MASK,
                Param(
                    "select_topk",
                    float,
                    default=1.0,
                    limits=(0.0, 1.0),
                    bounds=(0.1, 1.0),
                    doc="fraction of the entries kept, those varying most across models",
                ),
            ),
            base="required",
            reference="https://arxiv.org/abs/2408.07990",
        ),
        MergeMethod(
            "arcee_fusion",
            selective.arcee_fusion,
            (),
            base="required",
            min_inputs=2,
            max_inputs=2,
            reference="https://arcee.ai",
        ),
        MergeMethod(
            "ram",
            selective.ram,
            (_RAM_EPSILON,),
            base="required",
            reference="https://arxiv.org/abs/2601.13572",
        ),
        MergeMethod(
            "ramplus_tl",
            selective.ramplus_tl,
            (
                Param(
                    "r", float, default=0.1, limits=(0.0, math.inf), bounds=(0.0, 1.0), doc="boost of unique changes"
                ),
                Param("alpha", float, default=0.2, limits=(0.0, math.inf), bounds=(0.0, 1.0), doc="cap on rho"),
                dataclasses.replace(_RAM_EPSILON, open_low=True),
            ),
            base="required",
            reference="https://arxiv.org/abs/2601.13572",
        ),
    ]
    return {m.name: m for m in methods}


METHODS: dict[str, MergeMethod] = _build()


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(f"unknown merge method {name!r}; use one of: {', '.join(sorted(METHODS))}") from None
