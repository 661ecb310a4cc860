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

import fcntl
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import SearchConfig, load_config, load_fixed_merge, resolve_path
from evomerge.errors import EvomergeError
from evomerge.recipe import MERGED, Recipe, Source

STUDY_NAME = "evomerge"
RUN_FILE = "run.yaml"
OWN_FILES = (RUN_FILE, "study.db", "cma_state.pkl", "cma_state.tmp")


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
        force: bool = False,
        allow_outside_paths: bool = False,
        allow_test_sets: bool = False,
        progress: bool = True,
    ):
        from evomerge.evaluate import Evaluator
        from evomerge.merge import InPlaceMerger, open_sources, plan_merge
        from evomerge.space import SearchSpace, load_space_spec

        self.config_path = Path(config_path)
        self.cfg, self.root = load_config(config_path)
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
        import torch

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # Build evaluators (tasks, metrics, test-set checks) before touching the run folder.
        self.dev = Evaluator(
            cfg.eval,
            tokenizer,
            root=root,
            device=device,
            allow_test_sets=allow_test_sets,
            allow_outside_paths=allow_outside_paths,
        )
        self.heldout = (
            Evaluator(
                cfg.heldout,
                tokenizer,
                root=root,
                device=device,
                allow_test_sets=allow_test_sets,
                allow_outside_paths=allow_outside_paths,
            )
            if cfg.heldout
            else None
        )
        # The live model: a template over every source loads every tensor any
        # candidate or baseline can need.
        template = Recipe(
            method="linear",
            sources=[Source(model=r, parameters={"weight": 1.0}) for r in refs],
            dtype=self.space.dtype,
        )
        if self.routing:
            from evomerge.routing import RouteMerger

            if self.fixed_merge is not None:
                template = self.fixed_merge
            elif len(set(depths.values())) > 1 and not self.space.methods:
                template = None  # sources of different depths: routed, never merged
            self.merger = RouteMerger(
                template,
                routed=refs,
                root=root,
                device=device,
                allow_outside=allow_outside_paths,
                max_depth=self.space.max_depth,
            )
        else:
            self.merger = InPlaceMerger(template, root=root, device=device, allow_outside=allow_outside_paths)
        # Only now, with everything validated, touch the run folder.
        self.run_dir = Path(run_dir)
        self._open_run_dir(force)
        self.study = self._open_study()
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
            elif old.get("storage") != record["storage"]:
                record["storage"] = old["storage"]
        elif any(p.name != ".lock" for p in d.iterdir()) and not force:
            raise EvomergeError(f"run folder {d} is not empty and holds no evomerge run; use an empty --run-dir")
        self.storage_url = record["storage"]
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(record, sort_keys=False))
        tmp.replace(run_file)

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        own = self.cfg.storage is None
        storage = optuna.storages.RDBStorage(
            self.storage_url,
            **({} if own else {"heartbeat_interval": 30, "grace_period": 120}),
        )
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

    def evaluate(self, recipe: Recipe, kind: str, name: str | None = None) -> Outcome:
        """Merge ``recipe`` in place and score it (or serve it from the cache)."""
        fp = recipe.fingerprint()
        hit = self.cache.get(fp)
        attrs: dict[str, Any] = {"kind": kind, "fingerprint": fp}
        if name:
            attrs["name"] = name
        if hit is not None:
            keep = ("status", "reason", "values", "metrics", "fitness", "recipe", "heldout", "heldout_fitness")
            attrs.update({k: hit.attrs[k] for k in keep if k in hit.attrs})
            attrs.update(cached=True, seconds=0.0, eval_seconds=0.0)
            return Outcome(list(hit.values), attrs)
        attrs["recipe"] = recipe.model_dump(mode="json", exclude_none=True)
        t0 = time.perf_counter()
        try:
            model = self.merger.apply(recipe)
            score = self.dev.score(model)
        except Exception as e:  # a failed candidate is data, not a crash
            from evomerge.evaluate import Score

            reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
            score = Score(values={}, metrics={}, status="failed", reason=reason)
        seconds = time.perf_counter() - t0
        attrs.update(
            status=score.status,
            values=score.values,
            metrics=score.metrics,
            seconds=seconds,
            eval_seconds=score.eval_seconds,
        )
        if score.status == "ok":
            values = self._values(score)
            attrs["fitness"] = score.fitness(self.objectives)
            if not all(math.isfinite(v) for v in values):
                score.status, score.reason = "failed", "non-finite fitness"
        if score.status != "ok":
            attrs.update(status="failed", reason=score.reason or "unknown")
            values = self._penalty()
            attrs.pop("fitness", None)
        outcome = Outcome(values, attrs)
        if score.status == "ok" or (score.reason or "").startswith("non-finite"):
            self.cache[fp] = outcome
        return outcome

    def score_heldout(self, recipe: Recipe) -> dict[str, Any]:
        if self.heldout is None:
            return {}
        try:
            score = self.heldout.score(self.merger.apply(recipe))
        except Exception as e:
            return {"heldout_status": f"failed: {type(e).__name__}: {e}"[:300]}
        if score.status != "ok":
            return {"heldout_status": f"failed: {score.reason}"}
        return {
            "heldout": score.values,
            "heldout_fitness": score.fitness(list(self.cfg.heldout.objectives)),
            "heldout_metrics": score.metrics,
        }

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

        merger = self.merger.merger
        out = []
        for name, recipe in plain:
            if recipe.method == "passthrough":
                ref = recipe.sources[0].model
                out.append((name, Recipe(sources=recipe.sources, route=identity(ref), **self._common())))
            elif merger is not None and self.fixed_merge is None:
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
        import optuna

        done = {t.user_attrs.get("name") for t in self._trials() if t.user_attrs.get("kind") == "baseline"}
        results = []
        for name, recipe in self.baseline_recipes():
            if name in done:
                continue
            outcome = self.evaluate(recipe, "baseline", name)
            if outcome.attrs["status"] == "ok" and "heldout" not in outcome.attrs:
                outcome.attrs.update(self.score_heldout(recipe))
            params = self.space.encode(recipe)
            dists = self.space.distributions()
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
        return results

    # -- the loop ------------------------------------------------------------

    def search(self) -> dict[str, Any]:
        """Run (or continue) the search until the budget is spent."""
        from tqdm.auto import tqdm

        from evomerge.drivers import make_driver

        budget = self.cfg.budget
        elapsed0 = float(self.study.user_attrs.get("elapsed_s", 0.0))
        t_start = time.monotonic()

        def elapsed() -> float:
            return elapsed0 + time.monotonic() - t_start

        # Counted once, then kept: re-reading the study per candidate costs
        # more than a tiny model's whole evaluation.
        done = sum(1 for t in self._trials() if t.user_attrs.get("kind") == "search")

        bar = tqdm(
            total=budget.trials,
            initial=done,
            desc="search",
            unit="trial",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        if self.cfg.baselines:
            self.run_baselines(bar)
        driver = make_driver(self.cfg.driver, self.space, self.study, self.run_dir, self.cfg.seed)
        starts = []
        for t in sorted(self._trials(), key=lambda t: -t.user_attrs.get("fitness", -math.inf)):
            if t.user_attrs.get("kind") == "baseline" and t.user_attrs.get("status") == "ok" and t.params:
                starts.append(dict(t.params))
        driver.start_from(starts)

        def spent() -> bool:
            if budget.trials is not None and done >= budget.trials:
                return True
            return budget.minutes is not None and elapsed() >= budget.minutes * 60

        best = self.best_fitness()
        while not spent() and not driver.should_stop():
            candidates = driver.ask()
            if not candidates:
                break
            told, values, attrs = [], [], []
            for c in candidates:
                if spent():
                    break
                seen = driver.recorded(c)
                outcome = Outcome(*seen) if seen else None
                if outcome is None:
                    outcome = self.evaluate(c.recipe, "search")
                    driver.record(c, outcome.values, outcome.attrs)
                    done += 1
                    bar.update(1)
                told.append(c)
                values.append(outcome.values)
                attrs.append(outcome.attrs)
                f = outcome.attrs.get("fitness")
                if f is not None and (best is None or f > best):
                    best = f
                bar.set_postfix_str(
                    f"best {best:.4f}  last {_fmt(outcome.attrs)}" if best is not None else _fmt(outcome.attrs)
                )
                self.study.set_user_attr("elapsed_s", elapsed())
            if len(told) == len(candidates):
                driver.tell(told, values)
        bar.close()
        self.study.set_user_attr("elapsed_s", elapsed())
        if budget.trials is not None and done < budget.trials and not spent():
            print(
                f"the {self.cfg.driver.name} driver converged after {done} of {budget.trials} trials; "
                "raise driver.restarts (cma) to keep searching",
                file=sys.stderr,
            )
        return self.finish()

    def best_fitness(self) -> float | None:
        scored = [t.user_attrs["fitness"] for t in self._trials() if "fitness" in t.user_attrs]
        return max(scored) if scored else None

    def best_trial(self):
        return best_trial(self.study)

    def finish(self) -> dict[str, Any]:
        """Score the best recipe on the held-out set (once) and return a summary."""
        best = self.best_trial()
        if best is not None and self.heldout is not None and "heldout" not in trial_attrs(self.study, best):
            # A finished Optuna trial cannot be updated: its held-out score
            # goes into the study's attributes (read through trial_attrs).
            recipe = Recipe.model_validate(best.user_attrs["recipe"])
            self.study.set_user_attr(f"heldout_{best.number}", self.score_heldout(recipe))
        return {"best": best_trial(self.study), "study": self.study}

    def close(self) -> None:
        self._lock.close()


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
