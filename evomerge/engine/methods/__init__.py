"""Merge methods: what a method is (``base``), the parameters several share
(``params``), one module per family declaring its methods beside their
kernels (``linear``, ``slerp``, ``task_arithmetic``, ``sce``,
``selective``), and the registry that collects them (``registry``).

Parameters are declared once, with their method. Everything else (recipe
validation, ``evomerge methods``, the search space) reads them from the
registry.
"""

from __future__ import annotations

from evomerge.engine.methods.base import MergeMethod, Param, TensorInputs
from evomerge.engine.methods.registry import METHODS, get_method

__all__ = ["METHODS", "MergeMethod", "Param", "TensorInputs", "get_method"]
