"""Drivers: ask/tell wrappers around the optimizers (pycma in ``cma_driver``,
Optuna's samplers in ``optuna_driver``), the settings each one reads
(declared once, in ``DRIVER_SETTINGS``) and ``make_driver``. The contract is
:class:`~evomerge.run.drivers.base.Driver`'s module docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.run.drivers.base import Candidate, Driver


@dataclass(frozen=True)
class Setting:
    """One knob a driver reads, declared once: its type, the value the driver
    uses when the config leaves it out (None: the optimizer's own default),
    and the values the optimizer accepts. ``low_open`` excludes ``low`` itself."""

    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    doc: str = ""

    def allowed(self) -> str:
        """The accepted values in words, e.g. ``an integer >= 2`` or ``a number in (0, 1]``."""
        what = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            return f"{what} in {'(' if self.low_open else '['}{self.low}, {self.high}]"
        return f"{what} {'>' if self.low_open else '>='} {self.low}"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True  # the declared default
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


_STARTUP = Setting(int, 10, low=0, doc="random trials before the sampler models the scores")

# What each driver reads, and what its optimizer accepts (pycma and Optuna's
# NSGA-II refuse populations under 2, the cmaes package fails at 1).
DRIVER_SETTINGS: dict[str, dict[str, Setting]] = {
    "cma": {
        "sigma0": Setting(float, 0.2, low=0, high=1, low_open=True, doc="initial step, a fraction of each range"),
        "popsize": Setting(int, None, low=2, doc="default: pycma's 4 + 3 ln(dimensions)"),
        "restarts": Setting(int, 9, low=0, doc="IPOP restarts, each doubling the population"),
    },
    "tpe": {"startup_trials": _STARTUP},
    "gp": {"startup_trials": _STARTUP},
    "cmaes": {"popsize": Setting(int, None, low=2, doc="default: Optuna's 4 + 3 ln(dimensions)")},
    "random": {},
    "nsga2": {"popsize": Setting(int, 16, low=2, doc="individuals per generation")},
}
OPTUNA_SAMPLERS = ("tpe", "gp", "cmaes", "random", "nsga2")
DRIVERS = ("cma", *OPTUNA_SAMPLERS)


def setting(settings, name: str) -> Any:
    """The value of ``name`` a driver uses: the config's, else its declared
    default. KeyError for a setting that driver does not read."""
    declared = DRIVER_SETTINGS[settings.name][name]
    value = getattr(settings, name)
    return declared.default if value is None else value


def setting_problem(driver: str, name: str, value: Any, stored_default: Any) -> str | None:
    """Why ``driver`` cannot take ``name: value`` (None when it can). A
    setting the driver does not read passes only at its stored default, the
    value every saved config (a run's record) carries for it."""
    declared = DRIVER_SETTINGS.get(driver)
    if declared is None:
        return None  # an unknown driver name is refused on its own
    if name not in declared:
        if value == stored_default:
            return None
        reads = f"its settings: {', '.join(declared)}" if declared else "it has no settings"
        return f"the {driver} driver does not read {name} ({reads}), so leave it out"
    if declared[name].accepts(value):
        return None
    return f"the {driver} driver needs {name} to be {declared[name].allowed()}, got {value}"


def make_driver(settings, space, store, run_dir: Path, seed: int, workers: int = 1) -> Driver:
    """Build the driver a config names, for ``workers`` parallel evaluations."""
    name = settings.name
    if name == "cma":
        from evomerge.run.drivers.cma_driver import CmaDriver

        return CmaDriver(space, store, run_dir / "cma_state.pkl", settings, seed, workers)
    if name in OPTUNA_SAMPLERS:
        from evomerge.run.drivers.optuna_driver import OptunaDriver

        return OptunaDriver(space, store, settings, seed, workers)
    raise EvomergeError(f"unknown driver {name!r}; use one of {', '.join(DRIVERS)}")


__all__ = [
    "DRIVERS",
    "DRIVER_SETTINGS",
    "OPTUNA_SAMPLERS",
    "Candidate",
    "Driver",
    "Setting",
    "make_driver",
    "setting",
    "setting_problem",
]
