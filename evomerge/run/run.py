"""The search loop: baselines, ask, merge in place, score, tell, until the budget.

:class:`Run` assembles a run from its config (the search space, the worker
spec, the executor), opens its run folder through :mod:`evomerge.run.store`,
scores the baselines and keeps every worker busy until the budget is spent
(the order of asks and tells is the driver's schedule,
:mod:`evomerge.run.schedulers`). Running the same command again continues the run.

Conventions (one place):

- fitness is "higher is better": the weighted sum of the objectives, each
  signed by its direction. pycma minimises ``-fitness``.
- a failed candidate (an exception, out of memory, NaN or inf weights or
  metrics) is recorded with ``status: failed`` and its reason; the optimizer
  gets the penalty: the worst fitness (per objective for NSGA-II) seen so far
  in the run, baselines included, or 0 when nothing has been scored yet.
- results are cached by recipe fingerprint: a duplicate candidate is recorded
  as a trial with ``cached: true`` and costs no merge and no evaluation.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.engine.recipe import MERGED, Recipe, Source
from evomerge.errors import EvomergeError
from evomerge.fitness.baselines import plain_baselines, routed_baselines
from evomerge.fitness.score import Score
from evomerge.run.config import load_config, load_fixed_merge, resolve_path
from evomerge.run.drivers import Candidate, Driver, make_driver
from evomerge.run.executors import Executor, make_executor
from evomerge.run.executors.worker import Job, Worker, WorkerSpec, build_evaluators, source_digests
from evomerge.run.record import TrialRecord
from evomerge.run.schedulers import make_schedule
from evomerge.run.store import OWN_STORAGE, Heartbeat, RunStore

ELAPSED_EVERY_S = 5.0  # how often the search stores its elapsed time (for budget.minutes across resumes)


@dataclass
class Outcome:
    """What one candidate scored, as the run records it."""

    values: list[float]  # what the optimizer is told
    record: TrialRecord  # what the trial stores


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
        self.progress = progress
        self.objectives = list(self.cfg.eval.objectives)
        self._build_space(allow_outside_paths)
        self._build_workers(allow_outside_paths, allow_test_sets)
        self.executor: Executor | None = None
        self._inflight: dict[int, Candidate] = {}
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
        self.outcomes = Outcomes(self.store, self.objectives, heldout)
        # Early stopping needs per-document dev scores and one fitness to compare.
        self.early_stop = self.cfg.early_stop.enabled and self.dev_eval.per_doc and len(self.store.directions) == 1

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
        record = {
            **fingerprints,
            "config_path": str(self.config_path.resolve()),
            "storage": self.cfg.storage or OWN_STORAGE,
            "config": self.cfg.model_dump(mode="json"),
        }
        multi = self.cfg.driver.name == "nsga2"
        return RunStore.create(
            self.run_dir,
            record,
            shared=self.cfg.storage is not None,
            directions=[o.direction for o in self.objectives] if multi else ["maximize"],
            force=force,
            attrs={"objectives": [o.name for o in self.objectives], **fingerprints},
        )

    def open_executor(self, log=print) -> Executor:
        """The run's executor (local, or Ray workers started now)."""
        if self.executor is None:
            self.executor = make_executor(self.cfg.executor, self.spec, self.worker, log=log, run_dir=self.run_dir)
        return self.executor

    # -- baselines -----------------------------------------------------------

    def baseline_recipes(self) -> list[tuple[str, Recipe]]:
        """Every source alone, then the default merges the sources allow (in a
        routing run: as identity routes, and, for a fixed merge, that merge)."""
        common = {"dtype": self.space.dtype, "seed": self.cfg.seed}
        plain = plain_baselines(self.cfg.base_model, self.cfg.models, common)
        if not self.routing:
            return plain
        can_merge = self.spec.template is not None and "method" in self.spec.template
        return routed_baselines(plain, self.depths, common, can_merge=can_merge, fixed_merge=self.fixed_merge)

    def run_baselines(self, bar=None) -> list[tuple[str, Outcome, dict | None]]:
        """Score the baselines not yet in the study, on every free worker at
        once, recording each as it finishes."""
        self.open_executor(log=bar.write if bar is not None else print)
        done = {r.name for r in self.store.trials("baseline")}
        todo = [(name, recipe) for name, recipe in self.baseline_recipes() if name not in done]
        which = "both" if self.cfg.heldout is not None else "dev"
        results = []

        def record(i: int, outcome: Outcome) -> None:
            name, recipe = todo[i]
            params = self.space.encode(recipe)
            self.store.add(outcome.record, outcome.values, params or {}, self.space.distributions())
            if bar is not None:
                bar.write(f"baseline {name}: {describe(outcome.record)}")
            results.append((name, outcome, params))

        queue, inflight = list(range(len(todo))), 0
        while queue or inflight:
            while queue and self.executor.free() > 0:
                i = queue.pop(0)
                hit = self.outcomes.cached(todo[i][1], "baseline", todo[i][0])
                if hit is not None:
                    record(i, hit)
                else:
                    self.executor.submit(i, todo[i][1], which)
                    inflight += 1
            if inflight:
                for i, score in self.executor.wait():
                    inflight -= 1
                    record(i, self.outcomes.of(todo[i][1], "baseline", todo[i][0], score))
        return results

    def _baselines_are_mine(self, bar) -> bool:
        """On a shared storage, one driver runs the baselines (see
        :meth:`RunStore.claim_baselines`)."""
        if self.cfg.storage is None or self.store.claim_baselines():
            return True
        bar.write("another driver runs the baselines")
        return False

    # -- the loop ------------------------------------------------------------

    def search(self) -> TrialRecord | None:
        """Run (or continue) the search until the budget is spent; return the
        best trial (held-out scored, when the config has a held-out set)."""
        from tqdm.auto import tqdm

        done = len(self.store.trials("search", heldout=False))
        bar = tqdm(
            total=self.cfg.budget.trials,
            initial=done,
            desc="search",
            unit="trial",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.open_executor(log=bar.write)
        self._inflight = {}
        beat = Heartbeat(self.store, self._inflight) if self.cfg.storage is not None else None
        try:
            if self.executor.workers > 1:
                bar.write(f"{self.executor.name} executor: {self.executor.workers} workers")
            if self.cfg.baselines and self._baselines_are_mine(bar):
                if beat is not None:
                    beat.stamping = True  # the claim stays alive however long one baseline takes
                self.run_baselines(bar)
                if beat is not None:
                    beat.stamping = False
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

    def _driver(self) -> Driver:
        """The config's driver, started from the baselines the space can express."""
        shared = self.cfg.storage is not None  # other drivers may add trials to this study
        # Drivers sharing a study must not propose the same points: salt the seed.
        seed = self.cfg.seed + (os.getpid() if shared else 0)
        driver = make_driver(self.cfg.driver, self.space, self.store, self.run_dir, seed, self.executor.workers)
        driver.start_from([r.params for r in self.store.ranked("baseline") if r.params])
        return driver

    def _known(self, driver: Driver, c: Candidate) -> tuple[Outcome, bool] | None:
        """A candidate's result without scoring it, and whether it is to be
        recorded: one the driver recorded before a crash, or a cached one."""
        seen = driver.recorded(c)
        if seen is not None:
            return Outcome(*seen), False
        hit = self.outcomes.cached(c.recipe, "search")
        return (hit, True) if hit is not None else None

    def _loop(self, bar, done: int) -> None:
        """Keep every worker busy until the budget is spent or the driver has
        nothing more to ask."""
        driver = self._driver()
        schedule = make_schedule(driver)
        per_candidate = sum(len(order) for order in self.dev_eval.order.values())
        tally = _Tally(bar, self.store, self.cfg.budget, done, per_candidate)
        shared, inflight, keys, others = self.cfg.storage is not None, self._inflight, itertools.count(), 0
        while True:
            schedule.tell_complete()
            if shared and self.executor.free() > 0:
                # The budget counts every driver's trials, finished and running.
                others = tally.sync(*self.store.count_shared([c.trial for c in inflight.values() if c.trial]))
            while self.executor.free() > 0 and not tally.spent(tally.done + schedule.held + len(inflight) + others):
                c = schedule.next()
                if c is None:
                    break
                known = self._known(driver, c)
                if known is not None:
                    schedule.known(c, known[0])
                    tally.finished(driver, c, *known)
                    continue
                key = next(keys)
                inflight[key] = c
                self.executor.submit(key, c.recipe, self._dev_job())
                if shared and c.trial is not None:  # stale (failed by others) only if this driver dies
                    self.store.heartbeat(c.trial)
            for c, outcome in schedule.flush():
                tally.finished(driver, c, outcome, True)
            if schedule.complete():
                continue  # (cached or recorded members completed it)
            if not inflight:
                break
            for key, score in self.executor.wait():
                c = inflight.pop(key)
                outcome = self.outcomes.of(c.recipe, "search", None, score)
                if schedule.take(c, outcome):
                    tally.finished(driver, c, outcome, True)
        tally.save()
        trials = self.cfg.budget.trials
        if schedule.exhausted and trials is not None and tally.done < trials and not tally.spent(tally.done):
            print(
                f"the {self.cfg.driver.name} driver converged after {tally.done} of {trials} trials; "
                "raise driver.restarts (cma) to keep searching",
                file=sys.stderr,
            )

    def _dev_job(self) -> Job:
        """How a search candidate is scored: against the incumbent, with early stopping on."""
        incumbent = self.outcomes.incumbent
        if not self.early_stop or incumbent is None:
            return Job("dev")
        return Job("dev", versus=self.cfg.early_stop.versus(incumbent.docs))

    def _interrupted(self) -> None:
        """Ctrl-C: mark the candidates being scored, so a resumed run is clean."""
        marked = 0
        for c in self._inflight.values():
            if c.trial is not None:  # an Optuna trial: fail it, with the reason
                try:
                    self.store.interrupt(c.trial)
                    marked += 1
                except Exception:  # noqa: BLE001 - a second Ctrl-C mid-write; resume fails it as stale
                    pass
        # pycma candidates are not in the study until scored: a resumed run
        # asks the same generation again and scores only those.
        if self._inflight:
            n = len(self._inflight)
            print(
                f"evomerge: stopped with {n} candidate{'s' if n != 1 else ''} being scored"
                f"{f' ({marked} marked as interrupted)' if marked else ''}; run the same command to resume",
                file=sys.stderr,
            )
        self._inflight = {}

    # -- the end: selection race and held-out ---------------------------------

    def finish(self) -> TrialRecord | None:
        """Race the best candidates on the selection documents (with a
        ``select`` section), then score the chosen best, the best by dev
        fitness, the ``budget.heldout_top`` best search trials and the best
        default merge on the held-out set (each once); return the chosen best."""
        if self.cfg.select is not None:
            self.race()
        if self.cfg.heldout is not None:
            self._score_heldout(self._heldout_picks())
        return self.store.chosen()[0]

    def _entrants(self) -> list[TrialRecord]:
        """The race's entrants: the baselines (unless ``select.baselines`` is
        off) and the ``select.top`` best search trials by dev fitness, one
        per recipe."""
        ranked = self.store.ranked()
        baselines = [r for r in ranked if r.kind == "baseline"] if self.cfg.select.baselines else []
        search = [r for r in ranked if r.kind == "search"]
        out, seen = [], set()
        for r in baselines + search:
            if r.fingerprint in seen:
                continue
            if r.kind == "search" and len(out) - len(baselines) >= self.cfg.select.top:
                break
            seen.add(r.fingerprint)
            out.append(r)
        return out

    def race(self) -> dict[str, Any] | None:
        """Run (or continue) the selection race; store and return its summary."""
        from tqdm.auto import tqdm

        from evomerge.fitness.paired import signed_weights
        from evomerge.fitness.race import Entrant, plan

        sel, ev = self.cfg.select, self.select_eval
        fp = sel.fingerprint(self.cfg.eval)
        entrants = self._entrants()
        records = {r.number: r for r in entrants}
        sizes = {t: len(o) for t, o in ev.order.items()}
        weights = signed_weights(ev.objectives)
        doc_tasks = ev.doc_tasks if ev.per_doc else {}
        runners = [Entrant(r.number, r.fitness) for r in entrants]
        before = self.store.race() or {}
        documents = int(before.get("documents", 0)) if before.get("fp") == fp else 0
        bar = tqdm(total=0, desc="selection race", unit="candidate", disable=not self.progress)
        try:
            while True:
                stored = self.store.selections(fp)
                step = plan(runners, stored, sizes, doc_tasks, weights, sel.min_docs)
                if not step.needs:
                    break
                self.open_executor(log=bar.write)
                for number, part in step.needs.items():
                    self.executor.submit(number, Recipe.model_validate(records[number].recipe), Job("select", part))
                bar.total += len(step.needs)
                bar.refresh()
                while self.executor.pending():
                    for number, score in self.executor.wait():
                        documents += score.documents
                        self.store.set_selection(number, _selection_entry(fp, stored.get(number), score))
                        self.store.set_race({"fp": fp, "documents": documents})  # no winner until it ends
                        bar.update()
        finally:
            bar.close()
        summary = {
            "fp": fp,
            "winner": step.winner,
            "entrants": [r.number for r in entrants],
            "rounds": step.rounds,
            "documents": documents,
        }
        self.store.set_race(summary)
        return summary

    def _heldout_picks(self) -> list[TrialRecord]:
        """The chosen best, the best by dev fitness, the best search trials
        by dev fitness and the best default merge by dev fitness, not yet
        scored on the held-out set."""
        from evomerge.fitness.baselines import is_source

        ranked = self.store.ranked()
        search = [r for r in ranked if r.kind == "search"][: self.cfg.budget.heldout_top]
        defaults = [r for r in ranked if r.kind == "baseline" and not is_source(r.name)][:1]
        winner = self.store.chosen()[0]
        picks = [*([winner] if winner is not None else []), *ranked[:1], *search, *defaults]
        seen, out = set(), []
        for r in picks:
            if r.number not in seen and r.heldout_values is None:
                seen.add(r.number)
                out.append(r)
        return out

    def _score_heldout(self, picks: list[TrialRecord]) -> None:
        # Submitted together, so that every worker of a Ray run takes one.
        if not picks:
            return
        from tqdm.auto import tqdm

        self.open_executor()
        for r in picks:
            self.executor.submit(r.number, Recipe.model_validate(r.recipe), "heldout")
        with tqdm(total=len(picks), desc="held-out", unit="trial", disable=not self.progress) as bar:
            while self.executor.pending():
                for number, score in self.executor.wait():
                    self.store.set_heldout(number, **self.outcomes.heldout_fields(score))
                    bar.update()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
            self.executor = None
        self.store.close()


def _selection_entry(fp: str, stored: dict[str, Any] | None, score: Score) -> dict[str, Any]:
    """A trial's selection scores (``stored``, before this round) with ``score`` (a part) added."""
    if not score.ok:
        return {"fp": fp, "failed": (score.reason or "unknown")[:300]}
    if score.docs is None:
        return {"fp": fp, "values": score.values}
    before = (stored or {}).get("docs", {})
    return {"fp": fp, "docs": {k: list(before.get(k, [])) + list(v) for k, v in score.docs.items()}}


class Outcomes:
    """Turns workers' scores into trial outcomes, and caches them by recipe
    fingerprint (successes and non-finite failures: both are properties of
    the recipe)."""

    def __init__(self, store: RunStore, objectives: list, heldout_objectives: list):
        self.store, self.objectives, self.heldout_objectives = store, objectives, heldout_objectives
        self.cache: dict[str, Outcome] = {}
        # The best trial scored on every dev document, with per-document
        # scores: what early stopping compares a candidate with.
        self.incumbent: TrialRecord | None = None
        for r in store.trials(heldout=False):
            if r.fingerprint and (r.status == "ok" or r.non_finite):
                self.cache.setdefault(r.fingerprint, Outcome(r.told, r))
            self._consider(r)

    def _consider(self, record: TrialRecord) -> None:
        if record.complete and record.docs and (self.incumbent is None or record.fitness > self.incumbent.fitness):
            self.incumbent = record

    def _values(self, score: Score) -> list[float]:
        if len(self.store.directions) == 1:
            return [score.fitness(self.objectives)]
        return [score.values[o.name] for o in self.objectives]

    def cached(self, recipe: Recipe, kind: str, name: str | None = None) -> Outcome | None:
        """A finished score of the same recipe, as a new trial's outcome (or None)."""
        hit = self.cache.get(recipe.fingerprint())
        if hit is None:
            return None
        r = hit.record
        keep = ("status", "reason", "non_finite", "values", "metrics", "fitness", "recipe", "fingerprint", "stopped")
        record = TrialRecord(kind=kind, name=name, cached=True, **{k: getattr(r, k) for k in keep})
        record.heldout_values, record.heldout_fitness = r.heldout_values, r.heldout_fitness
        record.heldout_docs = r.heldout_docs
        return Outcome(list(hit.values), record)

    def of(self, recipe: Recipe, kind: str, name: str | None, score: Score) -> Outcome:
        """A worker's score as what the optimizer is told and the trial stores:
        a failure (or a non-finite fitness) is told the penalty."""
        fp = recipe.fingerprint()
        record = TrialRecord(
            kind=kind,
            name=name,
            fingerprint=fp,
            recipe=recipe.model_dump(mode="json", exclude_none=True),
            status=score.status,
            reason=score.reason,
            non_finite=score.non_finite,
            values=score.values,
            metrics=score.metrics,
            seconds=score.seconds,
            merge_seconds=score.merge_seconds,
            eval_seconds=score.eval_seconds,
            attempts=score.attempts,
            docs=score.docs,
            documents=score.documents,
            stopped=score.stopped,
        )
        if score.ok:
            values = self._values(score)
            record.fitness = score.fitness(self.objectives)
            if not all(math.isfinite(v) for v in values):
                record.status, record.reason, record.non_finite, record.fitness = (
                    "failed",
                    "non-finite fitness",
                    True,
                    None,
                )
        if record.status != "ok":
            record.status, record.reason = "failed", record.reason or "unknown"
            values = self.store.penalty()
        if score.heldout is not None:
            record = dataclasses.replace(record, **self.heldout_fields(score.heldout))
        outcome = Outcome(values, record)
        if record.status == "ok" or record.non_finite:
            self.cache[fp] = outcome
        self._consider(record)
        return outcome

    def heldout_fields(self, score: Score) -> dict[str, Any]:
        """A held-out score as ``TrialRecord``'s ``heldout_*`` fields."""
        if not score.ok:
            return {"heldout_status": f"failed: {score.reason}"[:300]}
        fitness = score.fitness(self.heldout_objectives)
        return {
            "heldout_values": score.values,
            "heldout_fitness": fitness,
            "heldout_metrics": score.metrics,
            "heldout_docs": score.docs,
        }


class _Tally:
    """The loop's bookkeeping: finished search trials, the best fitness, the
    time searched (stored every few seconds, for ``budget.minutes`` across
    resumes) and the progress bar."""

    def __init__(self, bar, store: RunStore, budget, done: int, per_candidate: int = 0):
        self.bar, self.store, self.budget, self.done = bar, store, budget, done
        # Dev documents scored by search trials, and what one candidate scores at most.
        self.documents = sum(r.documents or 0 for r in store.trials("search", heldout=False) if not r.cached)
        self.per_candidate = per_candidate
        best = store.best()
        self.best = best.fitness if best is not None else None
        self.elapsed0, self.started = store.elapsed, time.monotonic()
        self.saved = time.monotonic()

    def elapsed(self) -> float:
        return self.elapsed0 + time.monotonic() - self.started

    def spent(self, started: int) -> bool:
        """Whether ``started`` trials (finished or running) spend the budget."""
        if self.budget.trials is not None and started >= self.budget.trials:
            return True
        if self.budget.documents is not None:
            # Running candidates count in full: the budget is never overshot.
            if self.documents + (started - self.done) * self.per_candidate >= self.budget.documents:
                return True
        return self.budget.minutes is not None and self.elapsed() >= self.budget.minutes * 60

    def sync(self, total: int, others: int) -> int:
        """Count the search trials other drivers finished; return ``others``."""
        self.bar.update(max(0, total - self.done))
        self.done = max(self.done, total)
        return others

    def finished(self, driver: Driver, c: Candidate, outcome: Outcome, fresh: bool) -> None:
        """One candidate done; ``fresh``: record it (not a resumed record)."""
        if fresh:
            driver.record(c, outcome.values, outcome.record)
            self.done += 1
            self.documents += 0 if outcome.record.cached else outcome.record.documents or 0
            self.bar.update(1)
        f = outcome.record.fitness if outcome.record.complete else None
        if f is not None and (self.best is None or f > self.best):
            self.best = f
        last = describe(outcome.record)
        self.bar.set_postfix_str(f"best {self.best:.4f}  last {last}" if self.best is not None else last)
        if time.monotonic() - self.saved >= ELAPSED_EVERY_S:  # a storage write; not per candidate
            self.save()

    def save(self) -> None:
        self.store.save_elapsed(self.elapsed())
        self.saved = time.monotonic()


def describe(record: TrialRecord) -> str:
    """A trial's score in a few characters, for the progress bar and log."""
    if record.status != "ok":
        return f"failed ({(record.reason or '?')[:40]})"
    return f"{record.fitness:.4f}" + (" (cached)" if record.cached else "")


__all__ = ["Outcome", "Outcomes", "Run", "describe"]
