"""Drivers: ask/tell wrappers around the optimizers (pycma in ``cma_driver``,
Optuna's samplers in ``optuna_driver``), each with its settings model, all
listed in one table (:mod:`evomerge.run.drivers.registry`). The contract is
:class:`~evomerge.run.drivers.base.Driver`'s module docstring.
"""

from evomerge.run.drivers.base import Candidate, Driver
from evomerge.run.drivers.registry import DRIVERS, AnyDriverSettings, driver_settings, make_driver
from evomerge.run.drivers.settings import DriverSettings, Setting

__all__ = [
    "DRIVERS",
    "AnyDriverSettings",
    "Candidate",
    "Driver",
    "DriverSettings",
    "Setting",
    "driver_settings",
    "make_driver",
]
