"""The local executor keeps the executor contract
(tests/run/executors/executor_contract.py)."""

from executor_contract import ExecutorContract


class TestLocalExecutor(ExecutorContract):
    executor_settings = {"name": "local"}
