"""What a driver's settings are made of: knobs (:func:`knob`) declared on a
pydantic model per driver (:class:`DriverSettings`), tagged by its ``name``.

Each driver module declares its own settings model beside its driver, and
:mod:`evomerge.run.drivers.registry` collects them into one table; the
config's ``driver`` section is the discriminated union of those models.

Configs written before the settings were split listed every knob of every
driver (``name, sigma0, popsize, restarts, startup_trials``), and the run
folders and studies made since carry fingerprints of that shape. A settings
model therefore still reads a knob of another driver at its stored value
(any other value is refused), and dumps in that shape again, so old runs
open, resume and export, and a config's fingerprint is what it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from evomerge.schema import Strict

_UNSET: Any = object()


@dataclass(frozen=True)
class Setting:
    """One knob a driver reads: its type, the value the driver uses when the
    config leaves it out (None: the optimizer's own default), and the values
    the optimizer accepts. ``low_open`` excludes ``low`` itself."""

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
        """Whether the optimizer takes ``value`` (None: the declared default)."""
        if value is None:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def knob(kind: type, default: Any, *, stored: Any = _UNSET, **limits: Any) -> Any:
    """The annotation of a settings field: ``kind`` with its :class:`Setting`.

    ``stored`` is the value a config carries when it leaves the knob out
    (default: ``default``); None there stands for ``default`` and keeps the
    stored shape of configs made before (``popsize: null``).
    """
    declared = Setting(kind, default, **limits)
    value = default if stored is _UNSET else stored
    return Annotated[kind | None if value is None else kind, declared, Field(default=value, description=declared.doc)]


class DriverSettings(Strict):
    """The settings of one driver: a subclass per driver, its ``name`` a
    ``Literal`` tag and its knobs declared with :func:`knob`."""

    name: str
    # Every knob a stored config lists, at its stored value (set by the registry).
    stored_shape: ClassVar[dict[str, Any]] = {}

    @classmethod
    def declared(cls) -> dict[str, Setting]:
        """The knobs this driver reads, by name, in declaration order."""
        out = {}
        for name, field in cls.model_fields.items():
            found = [m for m in field.metadata if isinstance(m, Setting)]
            if found:
                out[name] = found[0]
        return out

    def value(self, name: str) -> Any:
        """The value of knob ``name`` the driver uses: the config's, else its
        declared default. KeyError for a knob this driver does not read."""
        declared = self.declared()[name]
        given = getattr(self, name)
        return declared.default if given is None else given

    @model_validator(mode="before")
    @classmethod
    def _unread(cls, data: Any) -> Any:
        """Drop another driver's knob at its stored value; refuse it otherwise."""
        if not isinstance(data, dict):
            return data
        kept = dict(data)
        for key, value in data.items():
            if key in cls.model_fields or key not in cls.stored_shape:
                continue  # unknown keys are refused as any typo is
            if value == cls.stored_shape[key]:
                del kept[key]
                continue
            reads = cls.declared()
            what = f"its settings: {', '.join(reads)}" if reads else "it has no settings"
            raise PydanticCustomError(
                "driver_setting",
                "the {driver} driver does not read {at_field} ({what}), so leave it out",
                {"driver": data.get("name"), "at_field": key, "what": what},
            )
        return kept

    @field_validator("*")
    @classmethod
    def _accepted(cls, value: Any, info: ValidationInfo) -> Any:
        declared = cls.declared().get(info.field_name)
        if declared is not None and not declared.accepts(value):
            raise PydanticCustomError(
                "driver_setting",
                "the {driver} driver needs {name} to be {allowed}, got {value}",
                {
                    "driver": info.data.get("name"),
                    "name": info.field_name,
                    "allowed": declared.allowed(),
                    "value": value,
                },
            )
        return value

    @model_serializer(mode="wrap")
    def _stored(self, handler) -> dict[str, Any]:
        """The stored shape: every knob a config lists, this driver's own values in it."""
        own = handler(self)
        return {"name": own["name"], **{key: own.get(key, value) for key, value in self.stored_shape.items()}}


__all__ = ["DriverSettings", "Setting", "knob"]
