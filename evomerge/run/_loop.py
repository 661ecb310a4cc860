"""The ask/tell loop of a search (``Run.search``): baselines, then every
worker kept busy with the driver's candidates until the budget is spent, and
the tally of that budget. Each function takes the
:class:`~evomerge.run.run.Run` whose phase it is."""

from __future__ import annotations

import datetime
import itertools
import os
import sys
import time

from evomerge.engine.progress import progress_bar
from evomerge.run._baselines import baselines_are_mine
from evomerge.run._outcomes import Outcome, describe
from evomerge.run.drivers import Candidate, Driver, make_driver
from evomerge.run.executors.worker import Job
from evomerge.run.record import TrialRecord
from evomerge.run.schedulers import make_schedule
from evomerge.run.store import Heartbeat, RunStore

HUGE_TRIALS = 100_000  # more search trials than a night of even the tiniest models holds
ELAPSED_EVERY_S = 5.0  # how often the search stores its elapsed time (for budget.minutes across resumes)


def search(run) -> TrialRecord | None:
    """Run (or continue) the search until the budget is spent; return the
    best trial (held-out scored, when the config has a held-out set)."""
    done = len(run.store.trials("search", heldout=False))
    bar = progress_bar(enabled=run.progress, total=run.cfg.budget.trials, initial=done, desc="search", unit="trial")
    bar.write(budget_line(run.cfg.budget, done, run.store.elapsed))
    for line in (run.memory_line(), run.fidelity_line()):
        if line:
            bar.write(line)
    run.open_executor(log=bar.write)
    run.inflight = {}
    beat = Heartbeat(run.store, run.inflight) if run.cfg.storage is not None else None
    try:
        if run.executor.workers > 1:
            bar.write(f"{run.executor.name} executor: {run.executor.workers} workers")
        if run.cfg.baselines and baselines_are_mine(run, bar):
            if beat is not None:
                beat.stamping = True  # the claim stays alive however long one baseline takes
            run.run_baselines(bar)
            if beat is not None:
                beat.stamping = False
        if run.outcomes.fitness is None:
            _wait_for_references(run, bar)
        _loop(run, bar, done)
        bar.close()
        return run.finish()
    except KeyboardInterrupt:
        bar.close()
        _interrupted(run)
        raise
    finally:
        if beat is not None:
            beat.stop()
        run.executor.close()
        run.executor = None


def _wait_for_references(run, bar, poll_s: float = 2.0) -> None:
    """On a shared storage, wait for the driver running the baselines to
    store the expert references every fitness needs."""
    from evomerge.run._baselines import pending_experts

    bar.write("waiting for the sources' scores (another driver runs the baselines): the expert references")
    while pending_experts(run):
        time.sleep(poll_s)
    run.set_fitness()


def budget_line(budget, done: int, elapsed_s: float, now: datetime.datetime | None = None) -> str:
    """One line, at the start, on which limit ends the search and when."""
    limits = []
    if budget.trials is not None:
        limits.append(f"{budget.trials:,} search trials ({done:,} done)")
    if budget.documents is not None:
        limits.append(f"{budget.documents:,} dev documents scored")
    if budget.minutes is not None:
        left = max(0.0, budget.minutes * 60 - elapsed_s)
        end = (now or datetime.datetime.now()) + datetime.timedelta(seconds=left)
        limits.append(f"{budget.minutes:g} minutes searched (about {end:%Y-%m-%d %H:%M}, {left / 60:.0f} min from now)")
    forever = "it runs until the driver converges or you stop it (Ctrl-C; the same command resumes)"
    if not limits:
        return f"budget: no limit is set, so {forever}; set budget.trials or budget.minutes"
    line = f"budget: the search ends after {' or '.join(limits)}, whichever comes first"
    if len(limits) == 1:
        line = line.removesuffix(", whichever comes first")
    if budget.minutes is None and budget.documents is None and budget.trials > HUGE_TRIALS:
        line += f"; that many trials will not finish, so {forever}; set budget.minutes to end it on time"
    return line


def _make_driver(run) -> Driver:
    """The config's driver, started from the baselines the space can express."""
    shared = run.cfg.storage is not None  # other drivers may add trials to this study
    # Drivers sharing a study must not propose the same points: salt the seed.
    seed = run.cfg.seed + (os.getpid() if shared else 0)
    driver = make_driver(run.cfg.driver, run.space, run.store, run.run_dir, seed, run.executor.workers)
    driver.start_from([r.params for r in run.store.ranked("baseline") if r.params])
    return driver


def _known(run, driver: Driver, candidate: Candidate) -> tuple[Outcome, bool] | None:
    """A candidate's result without scoring it, and whether it is to be
    recorded: one the driver recorded before a crash, or a cached one."""
    seen = driver.recorded(candidate)
    if seen is not None:
        return Outcome(*seen), False
    hit = run.outcomes.cached(candidate.recipe, "search")
    return (hit, True) if hit is not None else None


def _loop(run, bar, done: int) -> None:
    """Keep every worker busy until the budget is spent or the driver has
    nothing more to ask."""
    driver = _make_driver(run)
    schedule = make_schedule(driver)
    per_candidate = sum(len(order) for order in run.dev_eval.order.values())
    tally = BudgetTally(bar, run.store, run.cfg.budget, done, per_candidate)
    shared, inflight, keys, others = run.cfg.storage is not None, run.inflight, itertools.count(), 0
    while True:
        schedule.tell_complete()
        if shared and run.executor.free() > 0:
            # The budget counts every driver's trials, finished and running.
            others = tally.sync(
                *run.store.count_shared([candidate.trial for candidate in inflight.values() if candidate.trial])
            )
        while run.executor.free() > 0 and not tally.spent(tally.done + schedule.held + len(inflight) + others):
            candidate = schedule.next()
            if candidate is None:
                break
            known = _known(run, driver, candidate)
            if known is not None:
                schedule.known(candidate, known[0])
                tally.finished(driver, candidate, *known)
                continue
            key = next(keys)
            inflight[key] = candidate
            run.executor.submit(key, candidate.recipe, _dev_job(run, candidate.recipe))
            if shared and candidate.trial is not None:  # stale (failed by others) only if this driver dies
                run.store.heartbeat(candidate.trial)
        for candidate, outcome in schedule.flush():
            tally.finished(driver, candidate, outcome, True)
        if schedule.complete():
            continue  # (cached or recorded members completed it)
        if not inflight:
            break
        for key, score in run.executor.wait():
            candidate = inflight.pop(key)
            outcome = run.outcomes.from_score(candidate.recipe, "search", None, score)
            if schedule.take(candidate, outcome):
                tally.finished(driver, candidate, outcome, True)
    tally.save()
    trials = run.cfg.budget.trials
    if schedule.exhausted and trials is not None and tally.done < trials and not tally.spent(tally.done):
        print(
            f"the {run.cfg.driver.name} driver converged after {tally.done} of {trials} trials; "
            "raise driver.restarts (cma) to keep searching",
            file=sys.stderr,
        )


def _dev_job(run, recipe) -> Job:
    """How a search candidate is scored: on its rungs with fidelity on;
    against the incumbent with early stopping on; else on every document."""
    if run.fidelity:
        return Job("dev", rungs=run.outcomes.rungs(recipe, run.cfg.fidelity, run.cfg.seed))
    incumbent = run.outcomes.incumbent
    if not run.early_stop or incumbent is None:
        return Job("dev")
    return Job("dev", versus=run.cfg.early_stop.versus(incumbent.docs, run.outcomes.fitness))


def _interrupted(run) -> None:
    """Ctrl-C: mark the candidates being scored, so a resumed run is clean."""
    marked = 0
    for candidate in run.inflight.values():
        if candidate.trial is not None:  # an Optuna trial: fail it, with the reason
            try:
                run.store.interrupt(candidate.trial)
                marked += 1
            except Exception:  # noqa: BLE001 - a second Ctrl-C mid-write; resume fails it as stale
                pass
    # pycma candidates are not in the study until scored: a resumed run
    # asks the same generation again and scores only those.
    if run.inflight:
        n = len(run.inflight)
        print(
            f"evomerge: stopped with {n} candidate{'s' if n != 1 else ''} being scored"
            f"{f' ({marked} marked as interrupted)' if marked else ''}; run the same command to resume",
            file=sys.stderr,
        )
    run.inflight = {}


class BudgetTally:
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

    def finished(self, driver: Driver, candidate: Candidate, outcome: Outcome, fresh: bool) -> None:
        """One candidate done; ``fresh``: record it (not a resumed record)."""
        if fresh:
            driver.record(candidate, outcome.values, outcome.record)
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
