"""The contract every driver keeps (evomerge/run/drivers/base.py), as a class
of tests that each driver's test file subclasses (as Optuna's samplers opt
into optuna/testing/pytest_samplers.py). A subclass sets ``settings``: the
driver section a config would write. Not collected on its own (its name does
not start with ``test_``)."""

import math
from pathlib import Path

from evomerge.engine.recipe import Recipe
from evomerge.run.drivers import driver_settings, make_driver
from evomerge.run.drivers.base import Driver
from evomerge.run.record import TrialRecord
from evomerge.run.store import RunStore
from evomerge.search.space import SearchSpace, load_space_spec

TENSORS = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
RECORD = {"config_fingerprint": "c0", "space_fingerprint": "s0", "config": {"storage": None}, "storage": "study.db"}


def tiny_space() -> SearchSpace:
    """A two-model layer-wise TIES space over 4 layers (no model is read)."""
    spec, where = load_space_spec("ties_layerwise", Path("."))
    return SearchSpace(spec, models=["m/a", "m/b"], base="m/base", num_layers=4, tensor_names=TENSORS, where=where)


def fitness_of(recipe: Recipe) -> float:
    """A made-up, deterministic score of a recipe: the mean of its numbers."""
    numbers = [float(v) for v in _numbers(recipe.model_dump(mode="json"))]
    return sum(numbers) / len(numbers) if numbers else 0.0


def _numbers(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


class DriverContract:
    settings: dict = {}

    def open(self, run_dir: Path, seed: int = 0) -> tuple[Driver, RunStore]:
        directions = ["maximize"]
        store = RunStore.create(run_dir, dict(RECORD), shared=False, directions=directions, attrs={"objectives": ["a"]})
        driver = make_driver(driver_settings(self.settings), tiny_space(), store, run_dir, seed)
        return driver, store

    def score(self, driver: Driver, candidates, fail: set[int] = frozenset(), tell: bool = True) -> list[list[float]]:
        """Record each candidate (failed ones with the documented penalty:
        the worst value, here 0) and tell the batch, as the search does."""
        values = []
        for i, candidate in enumerate(candidates):
            failed = i in fail
            value = 0.0 if failed else fitness_of(candidate.recipe)
            record = TrialRecord(
                kind="search",
                status="failed" if failed else "ok",
                reason="made to fail" if failed else None,
                fitness=value,
                values={"a": value},
                recipe=candidate.recipe.model_dump(mode="json"),
                fingerprint=candidate.recipe.fingerprint(),
            )
            driver.record(candidate, [value], record)
            values.append([value])
        if tell:
            driver.tell(candidates, values)
        return values

    def ask_some(self, driver: Driver, rounds: int, fail_first: bool = False) -> list:
        asked = []
        for r in range(rounds):
            candidates = driver.ask()
            assert candidates, "a driver that has not stopped returns candidates"
            self.score(driver, candidates, fail={0} if fail_first and r == 0 else set())
            asked += candidates
        return asked

    def test_is_a_driver_with_the_declared_flags(self, tmp_path):
        driver, store = self.open(tmp_path / "run")
        try:
            assert isinstance(driver, Driver)
            assert isinstance(driver.asynchronous, bool) and isinstance(driver.multi_objective, bool)
            if driver.asynchronous:
                assert len(driver.ask()) == 1, "an asynchronous driver asks one candidate per call"
        finally:
            store.close()

    def test_asks_recipes_the_space_can_express(self, tmp_path):
        space = tiny_space()
        driver, store = self.open(tmp_path / "run")
        try:
            for candidate in self.ask_some(driver, 2):
                assert isinstance(candidate.recipe, Recipe)
                assert candidate.recipe.method == "ties"
                assert space.encode(candidate.recipe) is not None
                assert all(math.isfinite(v) for v in space.params_to_unit(candidate.params))
        finally:
            store.close()

    def test_every_recorded_candidate_is_a_trial_failed_ones_too(self, tmp_path):
        driver, store = self.open(tmp_path / "run")
        try:
            asked = self.ask_some(driver, 2, fail_first=True)
            trials = store.trials("search")
            assert len(trials) == len(asked)
            assert sorted(t.status for t in trials).count("failed") == 1
            assert {t.fingerprint for t in trials} == {c.recipe.fingerprint() for c in asked}
        finally:
            store.close()

    def test_the_same_seed_asks_the_same_and_another_seed_does_not(self, tmp_path):
        runs = []
        for i, seed in enumerate((0, 0, 1)):
            driver, store = self.open(tmp_path / f"run{i}", seed=seed)
            try:
                runs.append([c.recipe.fingerprint() for c in self.ask_some(driver, 2)])
            finally:
                store.close()
        assert runs[0] == runs[1]
        assert runs[0] != runs[2]

    def test_a_reopened_run_goes_on_without_repeating_itself(self, tmp_path):
        driver, store = self.open(tmp_path / "run")
        first = {c.recipe.fingerprint() for c in self.ask_some(driver, 2)}
        store.close()
        reopened, store = self.open(tmp_path / "run")
        try:
            later = [c for c in reopened.ask() if reopened.recorded(c) is None]
            assert later, "a resumed driver proposes candidates it has not recorded"
            assert not {c.recipe.fingerprint() for c in later} & first
        finally:
            store.close()

    def test_stops_or_keeps_asking_but_never_raises_on_a_long_run(self, tmp_path):
        driver, store = self.open(tmp_path / "run")
        try:
            for _ in range(6):
                if driver.should_stop():
                    break
                self.score(driver, driver.ask())
            assert isinstance(driver.should_stop(), bool)
        finally:
            store.close()
