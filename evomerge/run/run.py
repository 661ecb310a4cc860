"""The search loop: baselines, ask, merge in place, score, tell, until the budget.

:class:`Run` assembles a run from its config (the search space, the worker
spec, the executor), opens its run folder through :mod:`evomerge.run.store`
and scores the baselines; it hands its phases to private modules, as
Optuna's ``Study`` hands its loop to ``_optimize``: :mod:`evomerge.run._loop`
keeps every worker busy until the budget is spent (the order of asks and
tells is the driver's schedule, :mod:`evomerge.run.schedulers`), and
:mod:`evomerge.run._finish` runs the selection race and the held-out scores.
:mod:`evomerge.run._outcomes` turns scores into trial records. Running the
same command again continues the run.

Conventions (one place):

- fitness is "higher is better": by default the weighted sum of the
  objectives, each signed by its direction (``fitness:`` and each
  objective's ``normalize`` choose another rule, :mod:`evomerge.fitness.aggregate`).
  pycma minimises ``-fitness``.
- a failed candidate (an exception, out of memory, NaN or inf weights or
  metrics) is recorded with ``status: failed`` and its reason; the optimizer
  gets the penalty: the worst fitness (per objective for NSGA-II) seen so far
  in the run, baselines included, or 0 when nothing has been scored yet.
- results are cached by recipe fingerprint: a duplicate candidate is recorded
  as a trial with ``cached: true`` and costs no merge and no evaluation.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from evomerge.engine.recipe import MERGED, Recipe, Source
from evomerge.errors import EvomergeError
from evomerge.fitness.aggregate import Aggregate
from evomerge.fitness.estimate import Pool
from evomerge.run import _baselines, _finish, _loop
from evomerge.run._outcomes import Outcome, Outcomes, describe
from evomerge.run._run_folder import check_run_folder, masked
from evomerge.run.config import load_config, load_fixed_merge, resolve_path
from evomerge.run.drivers import Candidate
from evomerge.run.executors import Executor, make_executor
from evomerge.run.executors.worker import Worker, WorkerSpec, build_evaluators, source_digests
from evomerge.run.record import TrialRecord
from evomerge.run.store import OWN_STORAGE, RunStore


class Run:
    """One experiment in one run folder: assembles it, scores the baselines
    and runs the loop (``search()``)."""

    def __init__(
        self,
        config_path: str | Path,
        run_dir: str | Path,
        *,
        executor: dict[str, Any] | None = None,
        force: bool = False,
        allow_outside_paths: bool = False,
        allow_test_sets: bool = False,
        progress: bool = True,
    ):
        self.config_path = Path(config_path)
        self.cfg, self.root = load_config(config_path, executor)
        if not force:  # before any model is read
            check_run_folder(Path(run_dir), own_storage=self.cfg.storage is None)
        self.progress = progress
        self.objectives = list(self.cfg.eval.objectives)
        self._build_space(allow_outside_paths)
        self._build_workers(allow_outside_paths, allow_test_sets)
        self.executor: Executor | None = None
        self.inflight: dict[int, Candidate] = {}  # key -> candidate being scored (the loop fills it)
        # Only now, with everything validated, touch the run folder.
        self.run_dir = Path(run_dir)
        self.store = self._open_store(force)
        if self.store.stale:
            print(
                f"evomerge: {self.store.stale} trials left running by a driver that stopped were marked failed "
                "(status: stale); new candidates are scored in their place",
                file=sys.stderr,
            )
        heldout = list(self.cfg.heldout.objectives) if self.cfg.heldout is not None else []
        # Early stopping needs per-document dev scores and one fitness to
        # compare; fidelity needs per-document scores.
        self.early_stop = self.cfg.early_stop.enabled and self.dev_eval.per_doc and len(self.store.directions) == 1
        self.fidelity = self.cfg.fidelity.enabled and self.dev_eval.per_doc
        pool = None
        if self.fidelity:
            order, tasks = self.dev_eval.order, self.dev_eval.doc_tasks
            pool = Pool({name: len(order[task]) for name, task in tasks.items()}, tasks)
        self.outcomes = Outcomes(self.store, self.objectives, heldout, pool)
        self.set_fitness()

    def set_fitness(self) -> None:
        """Give the outcomes the fitness rules of the dev and held-out
        objectives (``fitness:``, each ``normalize``), with the stored expert
        references; while an expert reference waits for the sources' scores,
        dev has none, and nothing is scored but the sources."""
        from evomerge.run._baselines import pending_experts

        pending, references = pending_experts(self), self.store.references()
        self.outcomes.fitness = self.cfg.aggregate("eval", references) if "eval" not in pending else None
        self.outcomes.heldout = self.cfg.aggregate("heldout", references) if "heldout" not in pending else None

    def select_fitness(self) -> Aggregate:
        """The selection race's fitness rule: the dev one's, over the select objectives."""
        return self.cfg.aggregate("select", self.store.references())

    # -- assembly ------------------------------------------------------------

    @property
    def refs(self) -> list[str]:
        """The base model (if any), then the models."""
        return [*([self.cfg.base_model] if self.cfg.base_model else []), *self.cfg.models]

    def _build_space(self, allow_outside: bool) -> None:
        """Open the sources' headers and build the search space over them."""
        from evomerge.engine.merge import open_sources, plan_merge
        from evomerge.engine.routing import check_same_width
        from evomerge.search.space import SearchSpace, load_space_spec

        cfg, root, refs = self.cfg, self.root, self.refs
        if len(set(refs)) != len(refs):
            raise EvomergeError("a model is listed twice (or is also the base_model); list each model once")
        sources = open_sources(Recipe(method="linear", sources=[Source(model=r) for r in refs]), root, allow_outside)
        first = sources[refs[0]]
        spec, where = load_space_spec(cfg.space, root)
        self.fixed_merge = load_fixed_merge(cfg, root, allow_outside)
        depths = {r: sources[r].num_layers for r in refs}
        if self.fixed_merge is not None:
            fixed_sources = open_sources(self.fixed_merge, root, allow_outside)
            depths[MERGED] = len(plan_merge(self.fixed_merge, fixed_sources).layer_origin)
        self.space = SearchSpace(
            spec,
            models=cfg.models,
            base=cfg.base_model,
            num_layers=first.num_layers,
            tensor_names=first.names,
            seed=cfg.seed,
            dtype=cfg.dtype,
            where=where,
            depths=depths,
            fixed_merge=self.fixed_merge,
            relaxed=cfg.driver.name == "cmaes",
        )
        self.routing = spec.routing is not None
        if self.routing:
            check_same_width({r: sources[r].config for r in refs})
        self._depths_differ = len(set(depths.values())) > 1 and not self.space.methods
        self.depths = {**depths, MERGED: depths.get(MERGED, first.num_layers)}

    def _template(self) -> Recipe | None:
        """The recipe whose sources the live model is built from: one over
        every source loads every tensor any candidate or baseline can need."""
        if self.routing and self.fixed_merge is not None:
            return self.fixed_merge
        if self.routing and self._depths_differ:
            return None  # sources of different depths: routed, never merged
        sources = [Source(model=r, parameters={"weight": 1.0}) for r in self.refs]
        return Recipe(method="linear", sources=sources, dtype=self.space.dtype)

    def memory_record(self) -> dict[str, Any] | None:
        """The local worker's memory strategy and plan (for run.yaml; Ray workers log theirs)."""
        return self.worker.memory_record() if self.worker is not None else None

    def memory_line(self) -> str | None:
        """The local worker's memory line, printed at start."""
        return self.worker.memory_line() if self.worker is not None else None

    def fidelity_line(self) -> str | None:
        """One line on multi-fidelity scoring, printed at start when it is asked for."""
        f = self.cfg.fidelity
        if not f.enabled:
            return None
        if not self.fidelity:
            no = next(o.name for o in self.objectives if o.name not in self.dev_eval.doc_tasks)
            return (
                f"fidelity: off, since objective {no} has no per-document scores "
                "(only lm-eval tasks with a mean metric do); every candidate is scored in full"
            )
        rungs = ", ".join(f"{r:g}" for r in f.rungs)
        return (
            f"fidelity: each candidate is scored on its own documents at {rungs}, then all, "
            f"and stopped when the best beats its estimate by more than {f.z:g} standard errors"
        )

    def _memory_recipes(self) -> list[Recipe]:
        """What the merger's memory plan must hold besides the template: the
        default merges and the space's first candidate (their caches)."""
        from evomerge.fitness.baselines import plain_baselines
        from evomerge.search.genes import bin_centre

        out = []
        if not self.routing:
            common = {"dtype": self.space.dtype, "seed": self.cfg.seed}
            out += [r for _, r in plain_baselines(self.cfg.base_model, self.cfg.models, common)]
        k = len(self.space.methods)
        for i in range(k):  # one candidate per method of a choice (its gene is the first, in k bins)
            x = self.space.x0()
            if k > 1:
                x[0] = bin_centre(i, k)
            out.append(self.space.decode(x))
        return out

    @classmethod
    def memory_plan(cls, config_path: str | Path, device: str | None = None, allow_outside_paths: bool = False):
        """The memory plan of a search's in-place merger (``evomerge plan``):
        the space and the recipes it holds, from the headers alone; nothing
        is loaded and no run folder is touched. Returns the plan and the
        config's memory settings."""
        from evomerge.engine.devices import parse_devices
        from evomerge.engine.memory import recipe_plan

        run = cls.__new__(cls)  # the assembly's first half only: no workers, no store
        run.config_path = Path(config_path)
        run.cfg, run.root = load_config(config_path)
        run._build_space(allow_outside_paths)
        template = run._template()
        if template is None or template.method is None:
            raise EvomergeError(
                f"search config {config_path} routes sources of different depths: nothing is merged in place, "
                "so there is no memory plan; run the search"
            )
        recipes = [r.merge_part() for r in [template, *run._memory_recipes()] if r.method is not None]
        devices = parse_devices(device or run.cfg.device)
        return recipe_plan(recipes, run.root, devices, allow_outside_paths), run.cfg.memory

    def _build_workers(self, allow_outside: bool, allow_test_sets: bool) -> None:
        """The worker spec; the local worker (the local executor's), or, for
        Ray, the evaluators' checks and the sources' sha256 here and now."""
        from evomerge.engine.merge import referenced

        cfg, root = self.cfg, self.root
        tokenizer = resolve_path(root, cfg.tokenizer or self.refs[0], "tokenizer", allow_outside)
        template = self._template()
        self.spec = WorkerSpec(
            config=cfg.model_dump(mode="json"),
            root=str(root),
            tokenizer=str(tokenizer),
            template=template.model_dump(mode="json", exclude_none=True) if template is not None else None,
            routed=self.refs if self.routing else None,
            max_depth=self.space.max_depth if self.routing else None,
            device=cfg.device,
            also=[r.model_dump(mode="json", exclude_none=True) for r in self._memory_recipes()],
            allow_outside=allow_outside,
            allow_test_sets=allow_test_sets,
        )
        # Build evaluators (tasks, metrics, test-set checks) before touching the
        # run folder. Ray workers build their own, and check their sources'
        # sha256 against these.
        self.worker: Worker | None = None
        if cfg.executor.name == "local":
            self.worker = Worker(self.spec)
            self.dev_eval, self.select_eval = self.worker.dev, self.worker.select
            return
        _, self.dev_eval, _, self.select_eval = build_evaluators(self.spec, "cpu")
        used = [*self.refs, *(referenced(self.fixed_merge) if self.fixed_merge is not None else [])]
        self.spec = dataclasses.replace(self.spec, sha256=source_digests(used, root, allow_outside))

    def _open_store(self, force: bool) -> RunStore:
        fingerprints = {"config_fingerprint": self.cfg.fingerprint(), "space_fingerprint": self.space.fingerprint()}
        config = self.cfg.model_dump(mode="json")
        if self.cfg.storage:  # run.yaml never holds a database password
            config["storage"] = masked(self.cfg.storage)
        record = {
            **fingerprints,
            "config_path": str(self.config_path.resolve()),
            "storage": config["storage"] or OWN_STORAGE,
            "config": config,
        }
        memory = self.memory_record()
        if memory is not None:
            record["memory"] = memory
        multi = self.cfg.driver.name == "nsga2"
        return RunStore.create(
            self.run_dir,
            record,
            shared=self.cfg.storage is not None,
            directions=[o.direction for o in self.objectives] if multi else ["maximize"],
            force=force,
            url=self.cfg.storage,
            attrs={"objectives": [o.name for o in self.objectives], **fingerprints},
        )

    def open_executor(self, log=print) -> Executor:
        """The run's executor (local, or Ray workers started now)."""
        if self.executor is None:
            self.executor = make_executor(self.cfg.executor, self.spec, self.worker, log=log, run_dir=self.run_dir)
        return self.executor

    # -- baselines -----------------------------------------------------------

    def baseline_recipes(self) -> list[tuple[str, Recipe]]:
        """Every source alone, then the default merges the sources allow (see
        :func:`evomerge.run._baselines.baseline_recipes`)."""
        return _baselines.baseline_recipes(self)

    def run_baselines(self, bar=None) -> list[tuple[str, Outcome, dict | None]]:
        """Score the baselines not yet in the study, on every free worker at
        once, recording each as it finishes."""
        return _baselines.run_baselines(self, bar)

    # -- the phases (each in its own module) -----------------------------------

    def search(self) -> TrialRecord | None:
        """Run (or continue) the search until the budget is spent; return the
        best trial (held-out scored, when the config has a held-out set)."""
        return _loop.search(self)

    def finish(self) -> TrialRecord | None:
        """The end of a search: the selection race and the held-out scores;
        return the chosen best (see :func:`evomerge.run._finish.finish`)."""
        return _finish.finish(self)

    def race(self) -> dict[str, Any] | None:
        """Run (or continue) the selection race; store and return its summary."""
        return _finish.race(self)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        self.store.close()


__all__ = ["Outcome", "Outcomes", "Run", "describe"]
