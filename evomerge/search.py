"""The search loop: baselines, ask, merge in place, score, tell, until the budget.

A run folder holds everything a run needs to continue after a crash or a
kill -9: ``run.yaml`` (the config and its fingerprint), the Optuna study
(``study.db``, SQLite, unless the config names another storage) and the pycma
checkpoint. Running the same command again continues the run.

Conventions (one place):

- fitness is "higher is better": the weighted sum of the objectives, each
  signed by its direction. pycma minimises ``-fitness``.
- a failed candidate (an exception, out of memory, NaN or inf weights or
  metrics) is recorded with ``status: failed`` and its reason; the optimizer
  gets ``PENALTY``: the worst fitness (per objective for NSGA-II) seen so far
  in the run, baselines included, or 0 when nothing has been scored yet.
- results are cached by recipe fingerprint: a duplicate candidate is recorded
  as a trial with ``cached: true`` and costs no merge and no evaluation.
"""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import SearchConfig, load_config, load_fixed_merge, resolve_path
from evomerge.drivers import Candidate
from evomerge.errors import EvomergeError
from evomerge.executors import Executor, make_executor
from evomerge.executors.worker import Worker, WorkerSpec, build_evaluators, source_digests
from evomerge.recipe import MERGED, Recipe, Source

STUDY_NAME = "evomerge"
RUN_FILE = "run.yaml"
OWN_FILES = (RUN_FILE, "study.db", "cma_state.pkl", "cma_state.tmp")
HEARTBEAT_S = 30.0  # on a shared storage; a trial is stale after 120 s without one
ELAPSED_EVERY_S = 5.0  # how often the search stores its elapsed time (for budget.minutes across resumes)
CLAIM_EXPIRES_S = 600.0  # a baseline claim not renewed this long belongs to a dead driver
CLAIM_STAMP_S = 30.0  # how long a new claim may go without its first stamp


@dataclass
class Outcome:
    """What one candidate scored, as the run records it."""

    values: list[float]  # what the optimizer is told
    attrs: dict[str, Any]  # what the trial stores


class Run:
    """One experiment in one run folder. Opens (or creates) the study,
    the live model and the evaluators; ``search()`` runs the loop."""

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
        from evomerge.merge import _referenced, open_sources, plan_merge
        from evomerge.space import SearchSpace, load_space_spec

        self.config_path = Path(config_path)
        self.cfg, self.root = load_config(config_path, executor)
        self.progress = progress
        cfg, root = self.cfg, self.root
        refs = [*([cfg.base_model] if cfg.base_model else []), *cfg.models]
        if len(set(refs)) != len(refs):
            raise EvomergeError("a model is listed twice (or is also the base_model); list each model once")
        probe = Recipe(method="linear", sources=[Source(model=r) for r in refs])
        sources = open_sources(probe, root, allow_outside_paths)
        first = sources[refs[0]]
        spec, where = load_space_spec(cfg.space, root)
        self.fixed_merge = load_fixed_merge(cfg, root, allow_outside_paths)
        depths = {r: sources[r].num_layers for r in refs}
        if self.fixed_merge is not None:
            fixed_sources = open_sources(self.fixed_merge, root, allow_outside_paths)
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
            sizes = {r: sources[r].config.get("hidden_size") for r in refs}
            if len(set(sizes.values())) > 1:
                a = refs[0]
                b = next(r for r in refs if sizes[r] != sizes[a])
                raise EvomergeError(
                    f"models {a} and {b} have different hidden sizes ({sizes[a]} and {sizes[b]}); a route passes one hidden "
                    "state between layers, so route models of one hidden size"
                )
        self.depths = {**depths, MERGED: depths.get(MERGED, first.num_layers)}
        self.objectives = list(cfg.eval.objectives)
        tokenizer = resolve_path(root, cfg.tokenizer or refs[0], "tokenizer", allow_outside_paths)
        # The live model: a template over every source loads every tensor any
        # candidate or baseline can need.
        template = Recipe(
            method="linear",
            sources=[Source(model=r, parameters={"weight": 1.0}) for r in refs],
            dtype=self.space.dtype,
        )
        if self.routing and self.fixed_merge is not None:
            template = self.fixed_merge
        elif self.routing and len(set(depths.values())) > 1 and not self.space.methods:
            template = None  # sources of different depths: routed, never merged
        self.spec = WorkerSpec(
            config=cfg.model_dump(mode="json"),
            root=str(root),
            tokenizer=str(tokenizer),
            template=template.model_dump(mode="json", exclude_none=True) if template is not None else None,
            routed=refs if self.routing else None,
            max_depth=self.space.max_depth if self.routing else None,
            device=cfg.device,
            allow_outside=allow_outside_paths,
            allow_test_sets=allow_test_sets,
        )
        # Build evaluators (tasks, metrics, test-set checks) before touching the
        # run folder. The local executor's worker lives here; Ray workers build
        # their own, and check their sources' sha256 against these.
        self.worker: Worker | None = None
        if cfg.executor.name == "local":
            self.worker = Worker(self.spec)
        else:
            build_evaluators(self.spec, "cpu")
            used = [*refs, *(_referenced(self.fixed_merge) if self.fixed_merge is not None else [])]
            digests = source_digests(used, root, allow_outside_paths)
            self.spec = dataclasses.replace(self.spec, sha256=digests)
        self.executor: Executor | None = None
        # Only now, with everything validated, touch the run folder.
        self.run_dir = Path(run_dir)
        self._open_run_dir(force)
        self.study = self._open_study()
        self._mark_study_ready()
        self.cache: dict[str, Outcome] = {}
        for t in self._trials():
            a = t.user_attrs
            if a.get("fingerprint") and (a.get("status") == "ok" or a.get("reason", "").startswith("non-finite")):
                self.cache.setdefault(a["fingerprint"], Outcome(list(t.values), a))

    # -- run folder and study -----------------------------------------------

    def _open_run_dir(self, force: bool) -> None:
        d = self.run_dir
        if d.exists() and not d.is_dir():
            raise EvomergeError(f"run folder {d} is a file; pick another --run-dir")
        d.mkdir(parents=True, exist_ok=True)
        self._lock = open(d / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EvomergeError(f"another evomerge process is running {d}; wait for it or stop it") from None
        run_file = d / RUN_FILE
        record = {
            "config_fingerprint": self.cfg.fingerprint(),
            "space_fingerprint": self.space.fingerprint(),
            "config_path": str(self.config_path.resolve()),
            "storage": self.cfg.storage or f"sqlite:///{(d / 'study.db').resolve()}",
            "config": self.cfg.model_dump(mode="json"),
        }
        if run_file.is_file():
            old = yaml.safe_load(run_file.read_text()) or {}
            if old.get("config_fingerprint") != record["config_fingerprint"]:
                if not force:
                    raise EvomergeError(
                        f"run folder {d} belongs to a different config ({old.get('config_path')}); "
                        "use another --run-dir, or pass --force to start this config there afresh"
                    )
                for name in OWN_FILES:
                    (d / name).unlink(missing_ok=True)
            else:
                record["storage"] = old.get("storage", record["storage"])
                if old.get("study_ready"):
                    record["study_ready"] = True
        elif any(p.name != ".lock" for p in d.iterdir()) and not force:
            raise EvomergeError(f"run folder {d} is not empty and holds no evomerge run; use an empty --run-dir")
        self.storage_url = record["storage"]
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))
        tmp.replace(run_file)

    def _mark_study_ready(self) -> None:
        # Readers (status, export) wait for this mark: opening an Optuna
        # storage stamps its schema version, which would race the search's
        # own stamping of a new database.
        run_file = self.run_dir / RUN_FILE
        record = yaml.safe_load(run_file.read_text())
        if not record.get("study_ready"):
            record["study_ready"] = True
            tmp = run_file.with_suffix(".tmp")
            tmp.write_text(yaml.safe_dump(record, sort_keys=False))
            tmp.replace(run_file)

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        own = self.cfg.storage is None
        storage = self._rdb_storage(own)
        multi = self.cfg.driver.name == "nsga2"
        directions = [o.direction for o in self.objectives] if multi else ["maximize"]
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions, load_if_exists=True)
        if own:
            # This process holds the run folder's lock, so a RUNNING trial
            # belongs to a process that died (kill -9): mark it failed.
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        else:
            optuna.storages.fail_stale_trials(study)
        study.set_user_attr("objectives", [o.name for o in self.objectives])
        study.set_user_attr("space_fingerprint", self.space.fingerprint())
        study.set_user_attr("config_fingerprint", self.cfg.fingerprint())
        return study

    def _rdb_storage(self, own: bool, attempts: int = 5):
        import optuna
        import sqlalchemy.exc

        options = {} if own else {"heartbeat_interval": int(HEARTBEAT_S), "grace_period": 4 * int(HEARTBEAT_S)}
        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(self.storage_url, **options)
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                # Two drivers starting at once on a new shared database both
                # create its tables and stamp its schema version; the loser
                # finds them made when it tries again.
                if own or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    def _trials(self):
        import optuna

        return self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))

    # -- scoring -----------------------------------------------------------

    def _penalty(self) -> list[float]:
        scored = [t for t in self._trials() if t.user_attrs.get("status") == "ok"]
        if not scored:
            return [0.0] * len(self.study.directions)
        if len(self.study.directions) == 1:
            return [min(t.values[0] for t in scored)]
        out = []
        for i, o in enumerate(self.objectives):
            column = [t.values[i] for t in scored]
            out.append(min(column) if o.direction == "maximize" else max(column))
        return out

    def _values(self, score) -> list[float]:
        if len(self.study.directions) == 1:
            return [score.fitness(self.objectives)]
        return [score.values[o.name] for o in self.objectives]

    def _cached(self, recipe: Recipe, kind: str, name: str | None = None) -> Outcome | None:
        """A finished score of the same recipe, as a new trial's outcome (or None)."""
        fp = recipe.fingerprint()
        hit = self.cache.get(fp)
        if hit is None:
            return None
        attrs: dict[str, Any] = {"kind": kind, "fingerprint": fp, **({"name": name} if name else {})}
        keep = ("status", "reason", "values", "metrics", "fitness", "recipe", "heldout", "heldout_fitness")
        attrs.update({k: hit.attrs[k] for k in keep if k in hit.attrs})
        attrs.update(cached=True, seconds=0.0, merge_seconds=0.0, eval_seconds=0.0)
        return Outcome(list(hit.values), attrs)

    def _outcome(self, recipe: Recipe, kind: str, name: str | None, result: dict[str, Any]) -> Outcome:
        """Turn a worker's result into what the optimizer is told and the trial stores."""
        from evomerge.evaluate import Score

        fp = recipe.fingerprint()
        attrs: dict[str, Any] = {"kind": kind, "fingerprint": fp, **({"name": name} if name else {})}
        attrs["recipe"] = recipe.model_dump(mode="json", exclude_none=True)
        score = Score(
            values=result["values"],
            metrics=result["metrics"],
            status=result["status"],
            reason=result["reason"],
            seconds=result["seconds"],
            eval_seconds=result["eval_seconds"],
        )
        attrs.update(
            status=score.status,
            values=score.values,
            metrics=score.metrics,
            seconds=score.seconds,
            merge_seconds=result.get("merge_seconds", 0.0),
            eval_seconds=score.eval_seconds,
        )
        if result.get("attempts", 1) > 1:
            attrs["attempts"] = result["attempts"]
        if score.status == "ok":
            values = self._values(score)
            attrs["fitness"] = score.fitness(self.objectives)
            if not all(math.isfinite(v) for v in values):
                score.status, score.reason = "failed", "non-finite fitness"
        if score.status != "ok":
            attrs.update(status="failed", reason=score.reason or "unknown")
            values = self._penalty()
            attrs.pop("fitness", None)
        if "heldout" in result:
            attrs.update(self._heldout_attrs(result["heldout"]))
        outcome = Outcome(values, attrs)
        if score.status == "ok" or (score.reason or "").startswith("non-finite"):
            self.cache[fp] = outcome
        return outcome

    def _heldout_attrs(self, result: dict[str, Any]) -> dict[str, Any]:
        from evomerge.evaluate import Score

        if result["status"] != "ok":
            return {"heldout_status": f"failed: {result['reason']}"[:300]}
        score = Score(values=result["values"], metrics=result["metrics"])
        return {
            "heldout": score.values,
            "heldout_fitness": score.fitness(list(self.cfg.heldout.objectives)),
            "heldout_metrics": score.metrics,
        }

    def score_now(self, recipe: Recipe, which: str = "dev") -> dict[str, Any]:
        """Score one recipe on the executor and wait for it (baselines, held-out)."""
        self.executor.submit("now", recipe, which)
        while True:
            for key, result in self.executor.wait():
                if key == "now":
                    return result

    # -- baselines -----------------------------------------------------------

    def baseline_recipes(self) -> list[tuple[str, Recipe]]:
        """Every source alone, then the default merges the sources allow (in a
        routing run: as identity routes, and, for a fixed merge, that merge)."""
        plain = self._plain_baselines()
        if not self.routing:
            return plain
        from evomerge.recipe import Route, RouteStep

        def identity(model: str) -> Route:
            return Route(layers=[RouteStep(model=model, layer=i) for i in range(self.depths[model])])

        can_merge = self.spec.template is not None and "method" in self.spec.template
        out = []
        for name, recipe in plain:
            if recipe.method == "passthrough":
                ref = recipe.sources[0].model
                out.append((name, Recipe(sources=recipe.sources, route=identity(ref), **self._common())))
            elif can_merge and self.fixed_merge is None:
                out.append((name, recipe.model_copy(update={"route": identity(MERGED)})))
        if self.fixed_merge is not None:
            out.append(("the fixed merge", self.fixed_merge.model_copy(update={"route": identity(MERGED)})))
        return out

    def _plain_baselines(self) -> list[tuple[str, Recipe]]:
        cfg = self.cfg
        out: list[tuple[str, Recipe]] = []
        refs = [*([cfg.base_model] if cfg.base_model else []), *cfg.models]
        for r in refs:
            out.append(
                (f"source {Path(r).name}", Recipe(method="passthrough", sources=[Source(model=r)], **self._common()))
            )
        if len(cfg.models) < 2 and not cfg.base_model:
            return out
        every = [Source(model=m, parameters={"weight": 1.0}) for m in cfg.models]
        out.append(("linear (equal weights)", Recipe(method="linear", sources=every, **self._common())))
        if cfg.base_model:
            base = [Source(model=cfg.base_model)]
            ta = [Source(model=m, parameters={"weight": 1.0}) for m in cfg.models]
            sparse = [Source(model=m, parameters={"weight": 1.0, "density": 0.5}) for m in cfg.models]
            for name, method, srcs in (
                ("task_arithmetic (weight 1)", "task_arithmetic", ta),
                ("ties (density 0.5)", "ties", sparse),
                ("dare_ties (density 0.5)", "dare_ties", sparse),
            ):
                out.append(
                    (name, Recipe(method=method, sources=base + srcs, base_model=cfg.base_model, **self._common()))
                )
        return out

    def _common(self) -> dict[str, Any]:
        return {"dtype": self.space.dtype, "seed": self.cfg.seed}

    def run_baselines(self, bar=None) -> list[tuple[str, Outcome, dict | None]]:
        """Score the baselines not yet in the study, on every free worker at
        once, recording each as it finishes."""
        import optuna

        self.open_executor(log=bar.write if bar is not None else print)
        done = {t.user_attrs.get("name") for t in self._trials() if t.user_attrs.get("kind") == "baseline"}
        todo = [(name, recipe) for name, recipe in self.baseline_recipes() if name not in done]
        which = "both" if self.cfg.heldout is not None else "dev"
        dists = self.space.distributions()
        results = []

        def record(i: int, outcome: Outcome) -> None:
            name, recipe = todo[i]
            params = self.space.encode(recipe)
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=params or {},
                    distributions={k: dists[k] for k in params or {}},
                    values=outcome.values,
                    user_attrs=outcome.attrs,
                )
            )
            if bar is not None:
                bar.write(f"baseline {name}: {_fmt(outcome.attrs)}")
            results.append((name, outcome, params))

        queue = list(range(len(todo)))
        inflight = 0
        while queue or inflight:
            while queue and self.executor.free() > 0:
                i = queue.pop(0)
                hit = self._cached(todo[i][1], "baseline", todo[i][0])
                if hit is not None:
                    record(i, hit)
                else:
                    self.executor.submit(i, todo[i][1], which)
                    inflight += 1
            if inflight:
                for i, result in self.executor.wait():
                    inflight -= 1
                    record(i, self._outcome(todo[i][1], "baseline", todo[i][0], result))
        return results

    # -- the loop ------------------------------------------------------------

    def search(self) -> dict[str, Any]:
        """Run (or continue) the search until the budget is spent."""
        from tqdm.auto import tqdm

        done = sum(1 for t in self._trials() if t.user_attrs.get("kind") == "search")
        bar = tqdm(
            total=self.cfg.budget.trials,
            initial=done,
            desc="search",
            unit="trial",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.open_executor(log=bar.write)
        self._inflight: dict[int, Candidate] = {}
        beat = _Heartbeat(self.study, self._inflight) if self.cfg.storage is not None else None
        try:
            if self.executor.workers > 1:
                bar.write(f"{self.executor.name} executor: {self.executor.workers} workers")
            if self.cfg.baselines and self._baselines_are_mine(bar):
                if beat is not None:
                    beat.claim = self._claim  # stamped while the baselines run, however long one takes
                self.run_baselines(bar)
                if beat is not None:
                    beat.claim = None
            self._loop(bar, done)
            bar.close()
            return self.finish()
        except KeyboardInterrupt:
            bar.close()
            self._interrupted()
            raise
        finally:
            if beat is not None:
                beat.stop()
            self.executor.close()
            self.executor = None

    def _baselines_are_mine(self, bar) -> bool:
        """On a shared storage, one driver runs the baselines: the one that
        creates the claim (a second Optuna study, whose unique name makes the
        claim atomic), or any driver once the claimer has been silent for
        ``CLAIM_EXPIRES_S`` (it died before finishing them)."""
        import optuna

        if self.cfg.storage is None:
            return True
        name = f"{STUDY_NAME}-baselines"
        try:
            claim = optuna.create_study(storage=self.study._storage, study_name=name)
        except optuna.exceptions.DuplicatedStudyError:
            claim = optuna.load_study(study_name=name, storage=self.study._storage)
            # The claimer stamps its claim just after creating it: a claim
            # without a stamp yet is fresh, not dead. Wait for the stamp.
            waited = time.monotonic()
            while "alive" not in claim.user_attrs and time.monotonic() - waited < CLAIM_STAMP_S:
                time.sleep(0.2)
            if time.time() - float(claim.user_attrs.get("alive", 0)) < CLAIM_EXPIRES_S:
                bar.write("another driver runs the baselines")
                return False
        self._claim = claim
        claim.set_user_attr("alive", time.time())
        return True

    def open_executor(self, log=print) -> Executor:
        """The run's executor (local, or Ray workers started now)."""
        if self.executor is None:
            self.executor = make_executor(self.cfg.executor, self.spec, self.worker, log=log)
        return self.executor

    def _loop(self, bar, done: int) -> None:
        """Keep every worker busy until the budget is spent.

        Asynchronous drivers (Optuna) are asked for a new candidate as soon as
        a worker frees up. Generation drivers (pycma) hand out a whole
        population, which the workers share; the next generation is asked
        once the last candidate of this one is scored.
        """
        from evomerge.drivers import make_driver

        budget = self.cfg.budget
        elapsed0 = float(self.study.user_attrs.get("elapsed_s", 0.0))
        t_start = time.monotonic()

        def elapsed() -> float:
            return elapsed0 + time.monotonic() - t_start

        shared = self.cfg.storage is not None  # other drivers may add trials to this study
        # Drivers sharing a study must not propose the same points: salt the seed.
        seed = self.cfg.seed + (os.getpid() if shared else 0)
        driver = make_driver(self.cfg.driver, self.space, self.study, self.run_dir, seed, self.executor.workers)
        starts = []
        for t in sorted(self._trials(), key=lambda t: -t.user_attrs.get("fitness", -math.inf)):
            if t.user_attrs.get("kind") == "baseline" and t.user_attrs.get("status") == "ok" and t.params:
                starts.append(dict(t.params))
        driver.start_from(starts)

        def spent(started: int) -> bool:
            if budget.trials is not None and started >= budget.trials:
                return True
            return budget.minutes is not None and elapsed() >= budget.minutes * 60

        best = self.best_fitness()
        inflight = self._inflight
        generation: list[Candidate] | None = None  # the population being scored (pycma)
        scored: dict[int, Outcome] = {}  # its finished members, by index
        queue: deque[int] = deque()  # its members not yet handed out
        exhausted = False
        keys = itertools.count()
        saved = [time.monotonic()]  # when elapsed_s was last stored
        others = 0  # trials other drivers sharing the study are scoring now

        def finished(c: Candidate, outcome: Outcome, fresh: bool) -> None:
            nonlocal done, best
            if fresh:
                driver.record(c, outcome.values, outcome.attrs)
                done += 1
                bar.update(1)
            f = outcome.attrs.get("fitness")
            if f is not None and (best is None or f > best):
                best = f
            last = _fmt(outcome.attrs)
            bar.set_postfix_str(f"best {best:.4f}  last {last}" if best is not None else last)
            if time.monotonic() - saved[0] >= ELAPSED_EVERY_S:  # a storage write; not per candidate
                self.study.set_user_attr("elapsed_s", elapsed())
                saved[0] = time.monotonic()

        unrecorded: list[tuple[Candidate, Outcome]] = []  # scored, recorded after the next hand-out
        while True:
            if generation is not None and len(scored) == len(generation):
                driver.tell(generation, [scored[i].values for i in range(len(generation))])
                generation = None
            if shared and self.executor.free() > 0:
                # The budget counts every driver's trials, finished and running.
                total, others = self._shared_count()
                bar.update(max(0, total - done))
                done = max(done, total)
            while (
                not exhausted
                and self.executor.free() > 0
                and not spent(done + len(unrecorded) + len(inflight) + others)
            ):
                if driver.asynchronous:
                    if driver.should_stop():
                        exhausted = True
                        break
                    c = driver.ask()[0]
                else:
                    if not queue:
                        if generation is not None:
                            break  # the rest of this generation is being scored
                        asked = driver.ask()
                        if not asked:
                            exhausted = True
                            break
                        for i, member in enumerate(asked):
                            member.extra["index"] = i
                        generation, scored, queue = asked, {}, deque(range(len(asked)))
                    c = generation[queue.popleft()]
                seen = driver.recorded(c)
                hit = None if seen is not None else self._cached(c.recipe, "search")
                if seen is not None or hit is not None:
                    if generation is not None:
                        scored[c.extra["index"]] = Outcome(*seen) if seen is not None else hit
                    finished(c, Outcome(*seen) if seen is not None else hit, fresh=seen is None)
                    continue
                key = next(keys)
                inflight[key] = c
                self.executor.submit(key, c.recipe, "dev")
                if shared and c.trial is not None:  # stale (failed by others) only if this driver dies
                    self.study._storage.record_heartbeat(c.trial._trial_id)
            # A generation driver's results are recorded only now, after the
            # workers got their next candidates: a generation's last result is
            # told, and the next generation handed out, before the storage write.
            for c, outcome in unrecorded:
                finished(c, outcome, fresh=True)
            unrecorded = []
            if generation is not None and len(scored) == len(generation):
                continue  # (cached or recorded members completed it)
            if not inflight:
                break
            for key, result in self.executor.wait():
                c = inflight.pop(key)
                outcome = self._outcome(c.recipe, "search", None, result)
                if driver.asynchronous:
                    finished(c, outcome, fresh=True)  # the sampler learns it before the next ask
                    continue
                scored[c.extra["index"]] = outcome
                unrecorded.append((c, outcome))
        self.study.set_user_attr("elapsed_s", elapsed())
        if exhausted and budget.trials is not None and done < budget.trials and not spent(done):
            print(
                f"the {self.cfg.driver.name} driver converged after {done} of {budget.trials} trials; "
                "raise driver.restarts (cma) to keep searching",
                file=sys.stderr,
            )

    def _shared_count(self) -> tuple[int, int]:
        """Search trials finished in the study, and trials running that this
        driver is not scoring (other drivers' on a shared storage)."""
        import optuna

        mine = {c.trial._trial_id for c in self._inflight.values() if c.trial is not None}
        finished = running = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("kind") == "search":
                finished += 1
            elif t.state == optuna.trial.TrialState.RUNNING and t._trial_id not in mine:
                running += 1
        return finished, running

    def _interrupted(self) -> None:
        """Ctrl-C: mark the candidates being scored, so a resumed run is clean."""
        import optuna

        marked = 0
        for c in self._inflight.values():
            if c.trial is not None:  # an Optuna trial: fail it, with the reason
                try:
                    c.trial.set_user_attr("status", "interrupted")
                    self.study.tell(c.trial, state=optuna.trial.TrialState.FAIL)
                    marked += 1
                except Exception:  # noqa: BLE001 - a second Ctrl-C mid-write; resume fails it as stale
                    pass
        # pycma candidates are not in the study until scored: a resumed run
        # asks the same generation again and scores only those.
        if self._inflight:
            print(
                f"evomerge: stopped with {len(self._inflight)} candidates being scored"
                f"{f' ({marked} marked as interrupted)' if marked else ''}; run the same command to resume",
                file=sys.stderr,
            )
        self._inflight = {}

    def best_fitness(self) -> float | None:
        scored = [t.user_attrs["fitness"] for t in self._trials() if "fitness" in t.user_attrs]
        return max(scored) if scored else None

    def best_trial(self):
        return best_trial(self.study)

    def finish(self) -> dict[str, Any]:
        """Score the best recipe, and the ``budget.heldout_top`` best search
        trials, on the held-out set (each once); return a summary."""
        if self.cfg.heldout is not None:
            self._score_heldout(self._heldout_picks())
        return {"best": best_trial(self.study), "study": self.study}

    def _heldout_picks(self) -> list:
        """The best trial, then the best search trials by fitness, not yet
        scored on the held-out set."""
        ok = [t for t in self._trials() if t.user_attrs.get("status") == "ok" and "fitness" in t.user_attrs]
        ranked = sorted(
            (t for t in ok if t.user_attrs.get("kind") == "search"), key=lambda t: (-t.user_attrs["fitness"], t.number)
        )
        best = self.best_trial()
        picks = ([best] if best is not None else []) + ranked[: self.cfg.budget.heldout_top]
        seen, out = set(), []
        for t in picks:
            if t.number not in seen and "heldout" not in trial_attrs(self.study, t):
                seen.add(t.number)
                out.append(t)
        return out

    def _score_heldout(self, trials: list) -> None:
        # Submitted together, so that every worker of a Ray run takes one. A
        # finished Optuna trial cannot be updated: each held-out score goes
        # into the study's attributes (read through trial_attrs).
        if not trials:
            return
        from tqdm.auto import tqdm

        self.open_executor()
        for t in trials:
            self.executor.submit(("heldout", t.number), Recipe.model_validate(t.user_attrs["recipe"]), "heldout")
        with tqdm(total=len(trials), desc="held-out", unit="trial", disable=not self.progress) as bar:
            while self.executor.pending():
                for (_, number), result in self.executor.wait():
                    self.study.set_user_attr(f"heldout_{number}", self._heldout_attrs(result))
                    bar.update()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        self._lock.close()


class _Heartbeat:
    """On a shared storage, beats for the Optuna trials being scored, so that
    another driver's ``fail_stale_trials`` fails them only if this driver
    dies (Optuna beats only inside ``study.optimize``, which we do not use),
    and stamps the baseline claim while ``claim`` is set."""

    def __init__(self, study, inflight: dict, every: float = HEARTBEAT_S):
        import threading

        self.study, self.inflight, self.every = study, inflight, every
        self.claim = None  # the baseline claim (an Optuna study) while this driver runs the baselines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        storage = self.study._storage
        while not self._stop.wait(self.every):
            claim = self.claim
            if claim is not None:
                try:
                    claim.set_user_attr("alive", time.time())
                except Exception:  # noqa: BLE001 - a busy storage; the next beat is soon
                    pass
            for c in list(self.inflight.values()):
                if c.trial is not None:
                    try:
                        storage.record_heartbeat(c.trial._trial_id)
                    except Exception:  # noqa: BLE001 - a trial finished meanwhile; the next beat is soon
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def trial_attrs(study, trial) -> dict[str, Any]:
    """A trial's user attributes, with a held-out score added after it finished."""
    return {**trial.user_attrs, **study.user_attrs.get(f"heldout_{trial.number}", {})}


def best_trial(study):
    """The complete, successful trial with the highest fitness (None if none)."""
    import optuna

    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if t.user_attrs.get("status") == "ok" and "fitness" in t.user_attrs
    ]
    return max(trials, key=lambda t: (t.user_attrs["fitness"], -t.number)) if trials else None


def _fmt(attrs: dict) -> str:
    if attrs.get("status") != "ok":
        return f"failed ({attrs.get('reason', '?')[:40]})"
    text = f"{attrs['fitness']:.4f}"
    return text + (" (cached)" if attrs.get("cached") else "")


def open_study(run_dir: str | Path):
    """The study of an existing run folder, read-only use (status, export)."""
    import optuna
    import sqlalchemy.exc

    run_dir = Path(run_dir)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        raise EvomergeError(f"{run_dir} holds no evomerge run (no {RUN_FILE}); pass the --run-dir of a search")
    record = yaml.safe_load(run_file.read_text())
    if not record.get("study_ready"):
        raise EvomergeError(f"run folder {run_dir} has no study yet; run the search first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # Readers never create tables: a reader that did, while a new search
        # was creating them, could make that search fail.
        storage = optuna.storages.RDBStorage(record["storage"], skip_table_creation=True)
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except (KeyError, sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError):
        raise EvomergeError(f"run folder {run_dir} has no study yet; run the search first") from None
    return study, record


__all__ = ["Run", "SearchConfig", "best_trial", "open_study", "trial_attrs"]
