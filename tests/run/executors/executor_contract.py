"""The contract every executor keeps (evomerge/run/executors/base.py), as a
class of tests each executor's test file subclasses. A subclass sets
``executor_settings`` (the config's ``executor`` section) and may add
fixtures its executor needs (a Ray instance). Not collected on its own."""

import pytest
from helpers import write_config

from evomerge.engine.recipe import Recipe
from evomerge.run.executors.base import Executor
from evomerge.run.run import Run


class ExecutorContract:
    executor_settings: dict = {}

    @pytest.fixture
    def run(self, experiment, tmp_path):
        name = f"contract_{self.executor_settings.get('name', 'local')}.yaml"
        config = write_config(experiment, name, executor=self.executor_settings)
        run = Run(config, tmp_path / "run", progress=False)
        try:
            yield run
        finally:
            run.close()

    def recipes(self, run: Run) -> list[Recipe]:
        return [recipe for _, recipe in run.baseline_recipes()][:2]

    def drain(self, executor: Executor) -> dict:
        results = {}
        while executor.pending():
            for key, score in executor.wait():
                assert key not in results, "each submitted candidate comes back once"
                results[key] = score
        return results

    def test_is_an_executor_with_room_for_work(self, run):
        executor = run.open_executor(log=lambda *a: None)
        assert isinstance(executor, Executor)
        assert executor.free() >= 1
        assert executor.pending() == 0

    def test_every_submitted_candidate_comes_back_once_scored(self, run):
        executor = run.open_executor(log=lambda *a: None)
        recipes = self.recipes(run)
        for i, recipe in enumerate(recipes):
            executor.submit(("baseline", i), recipe, "dev")
        assert executor.pending() == len(recipes)
        results = self.drain(executor)
        assert set(results) == {("baseline", i) for i in range(len(recipes))}
        assert executor.pending() == 0
        for score in results.values():
            assert score.status == "ok", score.reason
            assert len(score.values) == 1 and all(0.0 <= v <= 1.0 for v in score.values.values())

    def test_a_candidate_that_cannot_merge_comes_back_failed_with_its_reason(self, run):
        executor = run.open_executor(log=lambda *a: None)
        good = self.recipes(run)[0]
        bad = good.model_copy(update={"base_model": "models/not_a_source"})
        executor.submit("bad", bad, "dev")
        executor.submit("good", good, "dev")
        results = self.drain(executor)
        assert results["bad"].status == "failed" and results["bad"].reason
        assert results["good"].status == "ok", "a failed candidate does not take the next one down"

    def test_close_is_safe_twice(self, run):
        executor = run.open_executor(log=lambda *a: None)
        executor.close()
        executor.close()
