"""Parameters more than one merge method declares, declared once here."""

from __future__ import annotations

import math

from evomerge.engine.methods.base import Param

# Search ranges follow the Evolutionary Model Merge paper: weights in [0, 1],
# densities in (0, 1]. Every search range is non-negative. A recipe may go
# outside them (a negative weight, slerp t < 0 or > 1) as mergekit allows;
# only ``limits`` and finiteness (checked in Param.validate) hold there.
WEIGHT = Param("weight", float, "per_model", bounds=(0.0, 1.0), doc="scale of this model's task vector")
DENSITY = Param(
    "density",
    float,
    "per_model",
    default=1.0,
    limits=(0.0, 1.0),
    open_low=True,
    bounds=(0.1, 1.0),
    doc="fraction of the task vector kept",
)
LAMBDA = Param("lambda", float, default=1.0, bounds=(0.5, 1.5), doc="scale of the combined task vector")
INT8_MASK = Param("int8_mask", bool, default=False, doc="accepted for mergekit compatibility; no numeric effect")
GAMMA = Param(
    "gamma", float, "per_model", default=0.01, limits=(0.0, 1.0), bounds=(0.0, 0.1), doc="largest fraction removed"
)
EPSILON = Param(
    "epsilon",
    float,
    "per_model",
    default=0.15,
    limits=(0.0, 1.0),
    bounds=(0.01, 0.3),
    doc="spread of keep probabilities",
)
RAM_EPSILON = Param(
    "epsilon",
    float,
    default=1e-5,
    limits=(0.0, math.inf),
    doc="changes of at most this size count as none",
)
