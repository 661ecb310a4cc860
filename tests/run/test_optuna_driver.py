"""Every Optuna sampler driver keeps the driver contract
(tests/run/driver_contract.py)."""

from driver_contract import DriverContract


class TestTpeDriver(DriverContract):
    settings = {"name": "tpe", "startup_trials": 2}


class TestGpDriver(DriverContract):
    settings = {"name": "gp", "startup_trials": 2}


class TestCmaesDriver(DriverContract):
    settings = {"name": "cmaes", "popsize": 4}


class TestRandomDriver(DriverContract):
    settings = {"name": "random"}


class TestNsga2Driver(DriverContract):
    settings = {"name": "nsga2", "popsize": 4}
