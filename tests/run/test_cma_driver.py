"""The pycma driver keeps the driver contract (tests/run/driver_contract.py),
and its own promise: it asks whole generations and resumes the one a killed
run asked."""

from driver_contract import DriverContract


class TestCmaDriver(DriverContract):
    settings = {"name": "cma", "sigma0": 0.3}

    def test_asks_a_whole_generation_of_the_configured_size(self, tmp_path):
        self.settings = {"name": "cma", "popsize": 5}
        driver, store = self.open(tmp_path / "run")
        try:
            assert not driver.asynchronous
            assert len(driver.ask()) == 5
        finally:
            store.close()

    def test_a_killed_generation_is_asked_again_and_its_scored_part_recognised(self, tmp_path):
        driver, store = self.open(tmp_path / "run")
        generation = driver.ask()
        first = generation[0]
        self.score(driver, [first], tell=False)  # recorded, then the process dies
        store.close()
        resumed, store = self.open(tmp_path / "run")
        try:
            again = resumed.ask()
            assert [c.recipe.fingerprint() for c in again] == [c.recipe.fingerprint() for c in generation]
            assert resumed.recorded(again[0]) is not None
            assert resumed.recorded(again[1]) is None
        finally:
            store.close()
