"""The baselines of a search (``Run.run_baselines``): every source alone and
the default merges the sources allow, scored on every free worker before the
search starts, and, on a shared storage, the claim that lets one driver run
them. Each function takes the :class:`~evomerge.run.run.Run` whose phase it is."""

from __future__ import annotations

from evomerge.engine.recipe import Recipe
from evomerge.fitness.baselines import plain_baselines, routed_baselines
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
    once, recording each as it finishes."""
    run.open_executor(log=bar.write if bar is not None else print)
    done = {record.name for record in run.store.trials("baseline")}
    todo = [(name, recipe) for name, recipe in run.baseline_recipes() if name not in done]
    which = "both" if run.cfg.heldout is not None else "dev"
    results = []

    def record(index: int, outcome: Outcome) -> None:
        name, recipe = todo[index]
        params = run.space.encode(recipe)
        run.store.add(outcome.record, outcome.values, params or {}, run.space.distributions())
        if bar is not None:
            bar.write(f"baseline {name}: {describe(outcome.record)}")
        results.append((name, outcome, params))

    queue, inflight = list(range(len(todo))), 0
    while queue or inflight:
        while queue and run.executor.free() > 0:
            index = queue.pop(0)
            name, recipe = todo[index]
            hit = run.outcomes.cached(recipe, "baseline", name)
            if hit is not None:
                record(index, hit)
            else:
                run.executor.submit(index, recipe, which)
                inflight += 1
        if inflight:
            for index, score in run.executor.wait():
                inflight -= 1
                name, recipe = todo[index]
                record(index, run.outcomes.from_score(recipe, "baseline", name, score))
    return results
