"""What a config's ``eval`` (and ``heldout``, ``select``) section says: the
objectives a candidate is scored on and how their documents are chosen."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import ValidationError, model_serializer, model_validator

from evomerge.errors import EvomergeError, field_error
from evomerge.schema import Strict

KINDS = ("task", "perplexity", "custom")


class ObjectiveSpec(Strict):
    """One term of the fitness: exactly one of

    - ``task``: an lm-eval task or group (built in, or from ``include_path``)
      and its ``metric`` (``acc``, or ``exact_match,strict-match`` to pick a
      filter; without one the task's first filter is used);
    - ``perplexity``: a local UTF-8 text file (relative to the config's
      folder); metric ``perplexity``, minimised by default;
    - ``custom``: ``"package.module:function"``, called as
      ``function(model, tokenizer) -> dict[str, float]``; ``metric`` names the
      key to use. A module file next to the config is importable.

    ``normalize``: divide the objective by a reference before it enters the
    fitness: ``expert``, the best source's score on it (the sources are
    scored as baselines before the search; the best is the highest, or the
    lowest for a minimised objective), so the objective becomes the share
    of the expert's skill a candidate keeps; or a positive number.
    """

    task: str | None = None
    perplexity: str | None = None
    custom: str | None = None
    metric: str | None = None
    weight: float = 1.0
    direction: Literal["maximize", "minimize"] = "maximize"
    normalize: Literal["expert"] | float | None = None

    @model_validator(mode="before")
    @classmethod
    def _perplexity_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("perplexity") is not None:
            data = dict(data)
            data["metric"] = data.get("metric") or "perplexity"
            data.setdefault("direction", "minimize")
        return data

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        kinds = [k for k in KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none"
            raise EvomergeError(
                f"an objective sets {got} of task/perplexity/custom; give exactly one of them per objective"
            )
        if self.task is not None and not self.metric:
            raise EvomergeError(f"the objective for task {self.task!r} has no metric; add e.g. 'metric: acc'")
        if self.perplexity is not None and self.metric != "perplexity":
            raise EvomergeError(
                f"perplexity objective {self.perplexity!r} has metric {self.metric!r}; "
                "use 'metric: perplexity' or leave it out"
            )
        if self.custom is not None:
            if not re.fullmatch(r"[\w.]+:\w+", self.custom):
                raise EvomergeError(
                    f"custom objective {self.custom!r} is not 'package.module:function'; write it in that form"
                )
            if not self.metric:
                raise EvomergeError(
                    f"custom objective {self.custom!r} has no metric; name the key of its returned dict "
                    "with 'metric: ...'"
                )
        if isinstance(self.normalize, float) and not (self.normalize > 0 and math.isfinite(self.normalize)):
            raise EvomergeError(
                f"objective {self.name} has normalize {self.normalize}; give a positive number or 'expert'"
            )
        if not math.isfinite(self.weight):
            raise EvomergeError(f"objective {self.name} has weight {self.weight}; give a finite number")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Without normalize, dumped as before the setting existed (configs'
        # fingerprints unchanged).
        data = handler(self)
        if self.normalize is None:
            data.pop("normalize", None)
        return data

    @property
    def name(self) -> str:
        """Stable key for display and storage, e.g. ``demo_a/acc``,
        ``perplexity:heldout.txt``, ``custom:mod:fn/score``."""
        if self.task is not None:
            return f"{self.task}/{self.metric}"
        if self.perplexity is not None:
            return f"perplexity:{self.perplexity}"
        return f"custom:{self.custom}/{self.metric}"


class EvalSpec(Strict):
    """The ``eval`` section of a search config.

    ``samples``: a fixed, seeded subset of that many documents per lm-eval
    task, the same for every candidate (and the number of perplexity chunks).
    ``num_fewshot`` overrides the tasks' own setting, as lm-eval's CLI does.
    """

    objectives: list[ObjectiveSpec]
    include_path: str | None = None
    samples: int | None = None
    seed: int = 0
    num_fewshot: int | None = None
    batch_size: int = 16

    @model_validator(mode="after")
    def _check(self) -> EvalSpec:
        if not self.objectives:
            raise EvomergeError("eval has no objectives; list at least one under 'objectives'")
        names = [o.name for o in self.objectives]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise EvomergeError(f"objective {twice[0]} is listed twice; remove one")
        for key in ("samples", "batch_size"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise EvomergeError(f"eval {key} is {value}; give a positive number")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise EvomergeError(f"eval num_fewshot is {self.num_fewshot}; give 0 or more")
        return self

    @classmethod
    def from_dict(cls, data: Any, where: str = "eval") -> EvalSpec:
        """Validate config data, turning pydantic's errors into one-line ones."""
        if not isinstance(data, dict):
            raise EvomergeError(f"{where} is not a YAML mapping; write it as 'key: value' lines")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise field_error(where, e) from None


__all__ = ["KINDS", "EvalSpec", "ObjectiveSpec"]
