"""The baselines of a search (``Run.run_baselines``): every source alone and
the default merges the sources allow, scored on every free worker before the
search starts, and, on a shared storage, the claim that lets one driver run
them. Each function takes the :class:`~evomerge.run.run.Run` whose phase it is."""

from __future__ import annotations

import math
from collections.abc import Iterator

from evomerge.engine.recipe import Recipe
from evomerge.errors import EvomergeError
from evomerge.fitness.baselines import is_source, plain_baselines, routed_baselines
from evomerge.fitness.score import Score
from evomerge.fitness.spec import ObjectiveSpec
from evomerge.run._outcomes import Outcome, describe


def baselines_are_mine(run, bar) -> bool:
    """On a shared storage, one driver runs the baselines (see
    :meth:`~evomerge.run.store.RunStore.claim_baselines`)."""
    if run.cfg.storage is None or run.store.claim_baselines():
        return True
    bar.write("another driver runs the baselines")
    return False


def baseline_recipes(run) -> list[tuple[str, Recipe]]:
    """Every source alone, then the default merges the sources allow (in a
    routing run: as identity routes, and, for a fixed merge, that merge)."""
    common = {"dtype": run.space.dtype, "seed": run.cfg.seed}
    plain = plain_baselines(run.cfg.base_model, run.cfg.models, common)
    if not run.routing:
        return plain
    can_merge = run.spec.template is not None and "method" in run.spec.template
    return routed_baselines(plain, run.depths, common, can_merge=can_merge, fixed_merge=run.fixed_merge)


def run_baselines(run, bar=None) -> list[tuple[str, Outcome, dict | None]]:
    """Score the baselines not yet in the study, on every free worker at
    once, recording each as it finishes. With objectives normalized by the
    expert, the sources come first, and are recorded once their scores have
    set the references (every fitness depends on them)."""
    run.open_executor(log=bar.write if bar is not None else print)
    done = {record.name for record in run.store.trials("baseline")}
    todo = [(name, recipe) for name, recipe in run.baseline_recipes() if name not in done]
    which = "both" if run.cfg.heldout is not None else "dev"
    results = []

    def record(name: str, recipe: Recipe, outcome: Outcome) -> None:
        params = run.space.encode(recipe)
        run.store.add(outcome.record, outcome.values, params or {}, run.space.distributions())
        if bar is not None:
            bar.write(f"baseline {name}: {describe(outcome.record)}")
        results.append((name, outcome, params))

    if pending_experts(run):
        sources = [(name, recipe) for name, recipe in todo if is_source(name)]
        scores = dict(_scored(run, sources, which))
        set_expert_references(run, [scores[i] for i in range(len(sources))])
        for i, (name, recipe) in enumerate(sources):
            record(name, recipe, run.outcomes.from_score(recipe, "baseline", name, scores[i]))
        todo = [(name, recipe) for name, recipe in todo if not is_source(name)]
    for index, got in _scored(run, todo, which):
        name, recipe = todo[index]
        outcome = got if isinstance(got, Outcome) else run.outcomes.from_score(recipe, "baseline", name, got)
        record(name, recipe, outcome)
    return results


def _scored(run, todo: list[tuple[str, Recipe]], which: str) -> Iterator[tuple[int, Outcome | Score]]:
    """Each of ``todo``'s index and its cached outcome or new score, as they come."""
    queue, inflight = list(range(len(todo))), 0
    while queue or inflight:
        while queue and run.executor.free() > 0:
            index = queue.pop(0)
            name, recipe = todo[index]
            hit = run.outcomes.cached(recipe, "baseline", name)
            if hit is not None:
                yield index, hit
            else:
                run.executor.submit(index, recipe, which)
                inflight += 1
        if inflight:
            for index, score in run.executor.wait():
                inflight -= 1
                yield index, score


def pending_experts(run) -> dict[str, list[ObjectiveSpec]]:
    """Per section (``eval``, ``heldout``), its objectives normalized by
    the expert whose reference is not stored yet."""
    known = run.store.references()
    out = {}
    for section, spec in (("eval", run.cfg.eval), ("heldout", run.cfg.heldout)):
        if spec is not None:
            todo = [o for o in spec.objectives if o.normalize == "expert" and o.name not in known.get(section, {})]
            if todo:
                out[section] = todo
    return out


def set_expert_references(run, scores: list[Score]) -> None:
    """Store each expert reference (the best source's value: the highest,
    or the lowest for a minimised objective) from the sources' ``scores``
    and the sources already recorded, and give the run its fitness rules."""
    references = run.store.references()
    stored = [r for r in run.store.trials("baseline") if is_source(r.name)]
    for section, objectives in pending_experts(run).items():
        values = [r.values if section == "eval" else r.heldout_values for r in stored]
        if section == "eval":
            values += [s.values for s in scores if s.ok]
        else:
            values += [s.heldout.values for s in scores if s.heldout is not None and s.heldout.ok]
        for o in objectives:
            got = [v[o.name] for v in values if v and math.isfinite(v.get(o.name, math.nan))]
            if not got:
                raise EvomergeError(
                    f"objective {o.name} is normalized by the expert, but no source was scored on it; "
                    "see the sources' failures above, or give normalize a number"
                )
            best = max(got) if o.direction == "maximize" else min(got)
            if not best > 0:
                raise EvomergeError(
                    f"objective {o.name} is normalized by the expert, but the best source scores {best:g} on it; "
                    "give normalize a number"
                )
            references.setdefault(section, {})[o.name] = best
    run.store.set_references(references)
    run.set_fitness()
