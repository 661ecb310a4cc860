"""The drivers, as a table: each name with its driver class and its settings model.

A new driver is one row here, beside its module (its ``Driver`` subclass and
its settings model, as :mod:`evomerge.run.drivers.optuna_driver` has them).
The config's ``driver`` section (:data:`AnyDriverSettings`) is the union of
the settings models, told apart by ``name`` (``cma`` when left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter

from evomerge.run.drivers.base import Driver
from evomerge.run.drivers.cma_driver import CmaDriver, CmaSettings
from evomerge.run.drivers.optuna_driver import (
    CmaEsSettings,
    GpSettings,
    Nsga2Settings,
    OptunaDriver,
    RandomSettings,
    TpeSettings,
)
from evomerge.run.drivers.settings import DriverSettings

DRIVERS: dict[str, tuple[type[Driver], type[DriverSettings]]] = {
    "cma": (CmaDriver, CmaSettings),
    "tpe": (OptunaDriver, TpeSettings),
    "gp": (OptunaDriver, GpSettings),
    "cmaes": (OptunaDriver, CmaEsSettings),
    "random": (OptunaDriver, RandomSettings),
    "nsga2": (OptunaDriver, Nsga2Settings),
}
DEFAULT_DRIVER = "cma"


def _stored_shape() -> dict[str, Any]:
    """Every knob of every driver at the value a config that leaves it out
    stores, in the order configs have always listed them."""
    shape: dict[str, Any] = {}
    for _, settings in DRIVERS.values():
        for name, field in settings.model_fields.items():
            if name != "name":
                shape.setdefault(name, field.default)
    return shape


DriverSettings.stored_shape.update(_stored_shape())


def _name(section: Any) -> str:
    if isinstance(section, dict):
        return section.get("name", DEFAULT_DRIVER)
    return getattr(section, "name", DEFAULT_DRIVER)


_NAMES = ", ".join(f"'{name}'" for name in DRIVERS)
AnyDriverSettings = Annotated[
    Union[tuple(Annotated[settings, Tag(name)] for name, (_, settings) in DRIVERS.items())],  # noqa: UP007
    Discriminator(
        _name,
        custom_error_type="driver_name",
        custom_error_message=f"Input should be {_NAMES.rsplit(', ', 1)[0]} or {_NAMES.rsplit(', ', 1)[1]}",
    ),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyDriverSettings)


def driver_settings(section: dict[str, Any] | None = None) -> DriverSettings:
    """The settings model a ``driver`` section stands for (the default driver's when None)."""
    return _ADAPTER.validate_python(section or {})


def make_driver(settings: DriverSettings, space, store, run_dir: Path, seed: int, workers: int = 1) -> Driver:
    """Build the driver ``settings`` name, for ``workers`` parallel evaluations."""
    driver, _ = DRIVERS[settings.name]
    return driver(space, store, settings, seed, workers, run_dir)


__all__ = ["DEFAULT_DRIVER", "DRIVERS", "AnyDriverSettings", "driver_settings", "make_driver"]
