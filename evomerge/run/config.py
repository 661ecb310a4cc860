"""The search config: one YAML file per experiment.

Paths in a config resolve against the config's folder and may not leave it
unless ``--allow-outside-paths`` is given. The config's fingerprint ties a
run folder to the experiment it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError, field_error
from evomerge.fitness.spec import EvalSpec, ObjectiveSpec
from evomerge.run.drivers.registry import AnyDriverSettings, driver_settings
from evomerge.schema import Strict


class Budget(Strict):
    trials: int | None = None  # search trials (baselines not counted)
    minutes: float | None = None  # wall time, summed over resumed sessions
    # Dev documents scored by search trials (early stopping scores fewer per
    # trial, so more trials fit); baselines and the selection race not counted.
    documents: int | None = None
    # With a held-out set: how many of the best search trials (by dev fitness)
    # are scored on it at the end, besides the best trial. More than one shows
    # how far the dev ranking carries over to unseen data.
    heldout_top: int = 1

    @field_validator("trials", "minutes", "heldout_top", "documents")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v


class MemorySettings(Strict):
    """How the in-place merger holds the sources (evomerge.engine.memory):
    ``auto`` takes the fastest strategy that fits ``budget`` (a fraction of
    each device's free memory, at most 1, or bytes; default 0.9); ``cached``,
    ``lean`` and ``offload`` force one. Every strategy gives the same bits."""

    strategy: Literal["auto", "cached", "lean", "offload"] = "auto"
    budget: float | None = None  # written as 0.8, 70000000000 or 70GB

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v):
        from evomerge.engine.memory import parse_budget

        return None if v is None else parse_budget(v)


class ExecutorSettings(Strict):
    """Where candidates are scored: ``local`` (in process) or ``ray``.

    Ray: ``address`` is ``auto`` (the cluster this node belongs to),
    ``host:port``, or None to start a Ray instance on this machine. Each
    worker is a resident actor with ``num_cpus``, ``num_gpus`` (default: 1
    when the cluster has GPUs; more than 1 reserves them together on one node
    through a placement group) and ``memory`` (bytes). ``workers`` defaults
    to as many as the cluster's GPUs (or CPUs) allow. A candidate whose worker
    dies is retried ``retries`` times on another worker, then recorded as
    failed; a dead worker is restarted up to ``max_restarts`` times (-1: no
    limit). ``prefetch`` candidates wait in each worker's queue behind the
    one it scores, so it never waits for the driver to record a result and
    ask the next (0: ask only when a worker is free).
    """

    name: Literal["local", "ray"] = "local"
    address: str | None = None
    workers: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    memory: int | None = None
    retries: int = 2
    max_restarts: int = -1
    prefetch: int = 1  # candidates queued on each worker beyond the running one
    start_timeout: float = 900.0  # seconds for every worker to load its sources
    dashboard: bool = False
    metrics: bool = False
    log_to_driver: bool = False

    @field_validator("workers")
    @classmethod
    def _workers(cls, v):
        if v is not None and v < 1:
            raise ValueError("give at least 1 worker")
        return v

    @field_validator("num_cpus", "retries", "start_timeout", "prefetch")
    @classmethod
    def _non_negative(cls, v):
        if v < 0:
            raise ValueError("must be 0 or more")
        return v


class SelectSettings(Strict):
    """The selection split and race (``select:``; see :mod:`evomerge.fitness.race`).

    Documents the search never optimises on: ``objectives`` (default: the
    ``eval`` section's) scored on each task's documents that ``eval`` does
    not use, ``samples`` of them per task (default: all that are left),
    drawn with ``seed``. ``include_path``, ``num_fewshot`` and
    ``batch_size`` default to ``eval``'s. At the end of the budget the
    ``top`` best search trials by dev fitness, and the baselines (unless
    ``baselines: false``), race on these documents and the winner is the
    exported best. Changing ``samples`` or ``top`` on a finished run and
    running it again continues the race; the other settings start it anew.
    """

    objectives: list[ObjectiveSpec] | None = None
    include_path: str | None = None
    samples: int | None = None
    seed: int = 0
    num_fewshot: int | None = None
    batch_size: int | None = None
    top: int = 8
    baselines: bool = True
    min_docs: int = 16  # documents per task in the race's first round, at least

    @field_validator("samples", "top", "batch_size", "min_docs")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be positive")
        return v

    def spec(self, dev: EvalSpec) -> EvalSpec:
        """The selection documents' evaluation, with ``eval``'s defaults."""
        return EvalSpec(
            objectives=self.objectives or dev.objectives,
            include_path=self.include_path if self.include_path is not None else dev.include_path,
            samples=self.samples,
            seed=self.seed,
            num_fewshot=self.num_fewshot if self.num_fewshot is not None else dev.num_fewshot,
            batch_size=self.batch_size or dev.batch_size,
        )

    def fingerprint(self, dev: EvalSpec) -> str:
        """What the selection documents and their order depend on; not
        ``samples`` (a larger one extends the same order) or ``top``."""
        spec = self.spec(dev).model_dump(mode="json", exclude={"samples", "batch_size"})
        data = {"select": spec, "eval": dev.model_dump(mode="json", exclude={"batch_size"})}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class EarlyStop(Strict):
    """Early stopping (``early_stop:``): a candidate's dev documents are
    scored in steps, ending at the fractions ``looks`` of each task's
    documents, and scoring stops once a one-sided paired test shows it worse
    than the incumbent (the best fully scored trial so far) at level
    ``alpha``. Needs per-document scores (lm-eval tasks with a mean metric)
    and a single fitness (not NSGA-II); otherwise every candidate is scored
    in full. See :class:`evomerge.fitness.score.Versus` for the value a stopped
    candidate is given."""

    enabled: bool = False
    alpha: float = 0.05
    looks: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5])
    min_docs: int = 16

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        if not 0 < v < 1:
            raise ValueError("must be between 0 and 1")
        return v

    @field_validator("looks")
    @classmethod
    def _looks(cls, v):
        if any(not 0 < f < 1 for f in v):
            raise ValueError("give fractions between 0 and 1")
        return sorted(v)

    def versus(self, docs, aggregate=None):
        from evomerge.fitness.score import Versus

        return Versus(docs=docs, alpha=self.alpha, looks=tuple(self.looks), min_docs=self.min_docs, aggregate=aggregate)


class Fidelity(Strict):
    """Multi-fidelity scoring (``fidelity:``): each candidate is scored on
    its own random subset of every task's dev documents, growing in steps
    that end at the fractions ``rungs`` (then at all of them). After each
    step its full-dev fitness is estimated with the difference estimator
    (:mod:`evomerge.fitness.estimate`: predicted per document from the
    baselines and the earlier candidates, corrected by the candidate's own
    residuals), and scoring stops when the best fully scored trial beats
    the estimate by more than ``z`` standard errors (with NSGA-II: when a
    trial of the Pareto front does so on every objective). A stopped
    candidate is recorded, and told to the driver, with its estimate; only
    candidates scored on every document can be the incumbent, race or be
    exported. Needs per-document scores (lm-eval tasks with a mean
    metric); otherwise every candidate is scored in full. A step that
    would score fewer than ``min_docs`` of a task is skipped."""

    enabled: bool = False
    rungs: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5])
    z: float = 1.0
    min_docs: int = 16

    @field_validator("rungs")
    @classmethod
    def _rungs(cls, v):
        if not v or any(not 0 < f < 1 for f in v):
            raise ValueError("give at least one fraction between 0 and 1")
        return sorted(set(v))

    @field_validator("z")
    @classmethod
    def _z(cls, v):
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError("must be 0 or more")
        return v

    @field_validator("min_docs")
    @classmethod
    def _min_docs(cls, v):
        if v < 1:
            raise ValueError("must be positive")
        return v


class FitnessRule(Strict):
    """How the objectives' terms become one fitness (``fitness:``): ``sum``
    (the default, the weighted sum), ``mean``, ``min`` (the worst term: with
    ``normalize: expert`` on each skill, the worst-kept skill) or
    ``softmin`` (a smooth min at ``temperature``, in term units). See
    :mod:`evomerge.fitness.aggregate`."""

    aggregate: Literal["sum", "mean", "min", "softmin"] = "sum"
    temperature: float = 0.05

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError("must be a positive number")
        return v


class SearchConfig(Strict):
    """An experiment: sources, space, objectives, budget, driver, storage."""

    models: list[str]
    base_model: str | None = None
    space: str | dict[str, Any]
    eval: EvalSpec
    heldout: EvalSpec | None = None
    select: SelectSettings | None = None
    early_stop: EarlyStop = Field(default_factory=EarlyStop)
    fidelity: Fidelity = Field(default_factory=Fidelity)
    fitness: FitnessRule = Field(default_factory=FitnessRule)
    budget: Budget = Field(default_factory=lambda: Budget(trials=50))
    # Which optimizer proposes candidates, and its knobs: one settings model
    # per driver (evomerge.run.drivers.registry), told apart by name.
    driver: AnyDriverSettings = Field(default_factory=driver_settings)
    storage: str | None = None  # an Optuna RDB URL; default: SQLite in the run folder
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    seed: int = 0
    dtype: str | None = None
    device: str | None = None
    baselines: bool = True
    tokenizer: str | None = None
    # A fixed merge recipe (e.g. a previous run's exported best) that is the
    # routing source ``merge`` of a hybrid run; its paths are relative to it.
    merge: str | None = None

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_shorthand(cls, v):
        return {"strategy": v} if isinstance(v, str) else v  # memory: lean

    @field_validator("models")
    @classmethod
    def _models(cls, v):
        if not v:
            raise ValueError("list at least one model")
        return v

    @model_validator(mode="after")
    def _one_way_to_stop(self) -> SearchConfig:
        if self.fidelity.enabled and self.early_stop.enabled:
            raise EvomergeError(
                "early_stop and fidelity are both enabled; enable one of them "
                "(fidelity also stops candidates that are clearly worse, on fewer documents)"
            )
        return self

    @model_validator(mode="after")
    def _references(self) -> SearchConfig:
        expert = [o.name for o in self.eval.objectives if o.normalize == "expert"]
        if self.heldout is not None:
            expert += [o.name for o in self.heldout.objectives if o.normalize == "expert"]
        if expert and not self.baselines:
            raise EvomergeError(
                f"objective {expert[0]} is normalized by the expert, but baselines are off (the sources are "
                "scored as baselines); set baselines: true or give normalize a number"
            )
        if self.select is not None and self.select.objectives is not None:
            dev = {o.name for o in self.eval.objectives}
            for o in self.select.objectives:
                if o.normalize == "expert" and o.name not in dev:
                    raise EvomergeError(
                        f"select objective {o.name} is normalized by the expert but is not a dev objective "
                        "(its reference is the sources' dev score); give normalize a number"
                    )
        return self

    def aggregate(self, section: str, references: dict[str, dict[str, float]] | None = None):
        """The fitness rule of a section's objectives (``eval``, ``heldout``,
        or ``select``, whose normalized objectives take the dev references),
        with the expert references (section -> objective -> the best
        source's value; see :mod:`evomerge.fitness.aggregate`); an empty
        rule for a section the config lacks. Raises ValueError while an
        expert reference is not known yet."""
        from evomerge.fitness.aggregate import Aggregate

        spec = self.select.spec(self.eval) if section == "select" and self.select else getattr(self, section)
        if spec is None:
            return Aggregate({})
        experts = (references or {}).get("heldout" if section == "heldout" else "eval")
        return Aggregate.of_objectives(spec.objectives, self.fitness.aggregate, self.fitness.temperature, experts)

    def fingerprint(self) -> str:
        # Selection, early stopping and fidelity decide how candidates are scored and
        # chosen, not what is searched: a run may change them and continue.
        exclude = {"budget", "storage", "device", "executor", "select", "early_stop", "fidelity", "memory"}
        if self.fitness == FitnessRule():
            exclude.add("fitness")  # the weighted sum, as before the setting existed
        data = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resolve_path(root: Path, value: str, what: str, allow_outside: bool, must_exist: bool = True) -> Path:
    """``value`` relative to ``root``; refuse an escape unless allowed."""
    path = Path(value).expanduser()
    full = (root / path).resolve() if not path.is_absolute() else path.resolve()
    if not allow_outside and not full.is_relative_to(root.resolve()):
        raise EvomergeError(
            f"{what} {value} is outside the config's folder {root}; move it inside or pass --allow-outside-paths"
        )
    if must_exist and not full.exists():
        raise EvomergeError(f"{what} {value} does not exist (looked for {full}); check the path")
    return full


def load_fixed_merge(cfg: SearchConfig, root: Path, allow_outside: bool):
    """The config's fixed ``merge`` recipe, its model paths made relative to ``root``."""
    import os

    from evomerge.engine.recipe import load_recipe

    if cfg.merge is None:
        return None
    path = resolve_path(root, cfg.merge, "merge recipe", allow_outside)
    recipe = load_recipe(path)
    if recipe.method is None or recipe.route is not None:
        raise EvomergeError(
            f"merge recipe {cfg.merge} must be a parameter-space merge (a method, no route); "
            "export a parameter-space run's best"
        )

    def rebase(ref: str) -> str:
        candidate = (path.parent / ref).resolve()
        if Path(ref).is_absolute() or not candidate.exists():
            return ref  # absolute, or a hub id
        return os.path.relpath(candidate, root.resolve())

    return recipe.with_refs(rebase).model_copy(update={"metadata": {}})


def load_config(path: str | Path, executor: dict[str, Any] | None = None) -> tuple[SearchConfig, Path]:
    """Read and validate a search config (``executor``: settings that
    override its executor section); returns it and its folder."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"search config {path} does not exist; check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EvomergeError(f"search config {path} cannot be read ({first}); fix the file") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"search config {path} is not a YAML mapping; write it as 'key: value' lines")
    if executor:
        section = data.get("executor") or {}
        data["executor"] = {**(section if isinstance(section, dict) else {}), **executor}
    try:
        return SearchConfig.model_validate(data), path.resolve().parent
    except ValidationError as e:
        raise field_error(f"search config {path}", e, tagged={"driver": "name"}) from None
