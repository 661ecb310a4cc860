"""The end of a search (``Run.finish``): the selection race among the best
candidates on documents the search never saw, then the held-out scores of
the chosen best and the trials it is compared with. Each function takes
the :class:`~evomerge.run.run.Run` whose phase it is."""

from __future__ import annotations

from typing import Any

from evomerge.engine.progress import progress_bar
from evomerge.engine.recipe import Recipe
from evomerge.fitness.score import Score
from evomerge.run.executors.worker import Job
from evomerge.run.record import TrialRecord


def finish(run) -> TrialRecord | None:
    """Race the best candidates on the selection documents (with a
    ``select`` section), then score the chosen best, the best by dev
    fitness, the ``budget.heldout_top`` best search trials and the best
    default merge on the held-out set (each once); return the chosen best."""
    if run.cfg.select is not None:
        race(run)
    if run.cfg.heldout is not None:
        _score_heldout(run, _heldout_picks(run))
    return run.store.chosen()[0]


def _entrants(run) -> list[TrialRecord]:
    """The race's entrants: the baselines (unless ``select.baselines`` is
    off) and the ``select.top`` best search trials by dev fitness, one
    per recipe."""
    ranked = run.store.ranked()
    baselines = [record for record in ranked if record.kind == "baseline"] if run.cfg.select.baselines else []
    search = [record for record in ranked if record.kind == "search"]
    out, seen = [], set()
    for record in baselines + search:
        if record.fingerprint in seen:
            continue
        if record.kind == "search" and len(out) - len(baselines) >= run.cfg.select.top:
            break
        seen.add(record.fingerprint)
        out.append(record)
    return out


def race(run) -> dict[str, Any] | None:
    """Run (or continue) the selection race; store and return its summary."""

    from evomerge.fitness.race import Entrant, plan

    sel, ev = run.cfg.select, run.select_eval
    fingerprint = sel.fingerprint(run.cfg.eval)
    entrants = _entrants(run)
    records = {record.number: record for record in entrants}
    sizes = {t: len(o) for t, o in ev.order.items()}
    weights = run.select_fitness()
    doc_tasks = ev.doc_tasks if ev.per_doc else {}
    runners = [Entrant(record.number, record.fitness) for record in entrants]
    before = run.store.race() or {}
    documents = int(before.get("documents", 0)) if before.get("fp") == fingerprint else 0
    bar = progress_bar(enabled=run.progress, total=0, desc="selection race", unit="candidate")
    try:
        while True:
            stored = run.store.selections(fingerprint)
            step = plan(runners, stored, sizes, doc_tasks, weights, sel.min_docs)
            if not step.needs:
                break
            run.open_executor(log=bar.write)
            for number, part in step.needs.items():
                run.executor.submit(number, Recipe.model_validate(records[number].recipe), Job("select", part))
            bar.total += len(step.needs)
            bar.refresh()
            while run.executor.pending():
                for number, score in run.executor.wait():
                    documents += score.documents
                    run.store.set_selection(number, selection_entry(fingerprint, stored.get(number), score))
                    run.store.set_race({"fp": fingerprint, "documents": documents})  # no winner until it ends
                    bar.update()
    finally:
        bar.close()
    summary = {
        "fp": fingerprint,
        "winner": step.winner,
        "entrants": [record.number for record in entrants],
        "rounds": step.rounds,
        "documents": documents,
    }
    run.store.set_race(summary)
    return summary


def _heldout_picks(run) -> list[TrialRecord]:
    """The chosen best, the best by dev fitness, the best search trials
    by dev fitness and the best default merge by dev fitness, not yet
    scored on the held-out set."""
    from evomerge.fitness.baselines import is_source

    ranked = run.store.ranked()
    search = [record for record in ranked if record.kind == "search"][: run.cfg.budget.heldout_top]
    defaults = [record for record in ranked if record.kind == "baseline" and not is_source(record.name)][:1]
    winner = run.store.chosen()[0]
    picks = [*([winner] if winner is not None else []), *ranked[:1], *search, *defaults]
    seen, out = set(), []
    for record in picks:
        if record.number not in seen and record.heldout_values is None:
            seen.add(record.number)
            out.append(record)
    return out


def _score_heldout(run, picks: list[TrialRecord]) -> None:
    # Submitted together, so that every worker of a Ray run takes one.
    if not picks:
        return

    run.open_executor()
    for record in picks:
        run.executor.submit(record.number, Recipe.model_validate(record.recipe), "heldout")
    with progress_bar(enabled=run.progress, total=len(picks), desc="held-out", unit="trial") as bar:
        while run.executor.pending():
            for number, score in run.executor.wait():
                run.store.set_heldout(number, **run.outcomes.heldout_fields(score))
                bar.update()


def selection_entry(fingerprint: str, stored: dict[str, Any] | None, score: Score) -> dict[str, Any]:
    """A trial's selection scores (``stored``, before this round) with ``score`` (a part) added."""
    if not score.ok:
        return {"fp": fingerprint, "failed": (score.reason or "unknown")[:300]}
    if score.docs is None:
        return {"fp": fingerprint, "values": score.values}
    before = (stored or {}).get("docs", {})
    return {"fp": fingerprint, "docs": {k: list(before.get(k, [])) + list(v) for k, v in score.docs.items()}}
