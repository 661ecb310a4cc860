"""The search loop: one line at the start on which limit ends the run, and when."""

import datetime

import pytest
from helpers import trials, write_config

from evomerge.app.cli import main
from evomerge.run._loop import HUGE_TRIALS, budget_line
from evomerge.run.config import Budget

NOW = datetime.datetime(2026, 12, 7, 22, 0)


def test_the_budget_line_names_each_limit_and_when_the_time_runs_out():
    assert budget_line(Budget(trials=50), 3, 0.0, NOW) == "budget: the search ends after 50 search trials (3 done)"
    line = budget_line(Budget(trials=50, minutes=90), 0, 30 * 60.0, NOW)
    assert "50 search trials" in line and "90 minutes" in line and "whichever comes first" in line
    assert "2026-12-07 23:00" in line and "60 min from now" in line  # 30 of the 90 minutes were spent before
    assert "1,000 dev documents" in budget_line(Budget(trials=None, documents=1000), 0, 0.0, NOW)


def test_a_budget_no_search_can_spend_says_what_will_end_the_run():
    huge = budget_line(Budget(trials=10**30), 0, 0.0, NOW)
    assert "will not finish" in huge and "Ctrl-C" in huge and "budget.minutes" in huge
    assert "will not finish" not in budget_line(Budget(trials=HUGE_TRIALS), 0, 0.0, NOW)
    assert "will not finish" not in budget_line(Budget(trials=10**30, minutes=60), 0, 0.0, NOW)  # time ends it
    endless = budget_line(Budget(trials=None), 0, 0.0, NOW)
    assert "no limit" in endless and "Ctrl-C" in endless


@pytest.mark.slow
def test_a_search_starts_with_its_budget_line_and_a_time_limit_ends_a_huge_trial_count(experiment, tmp_path, capsys):
    config = write_config(experiment, "huge.yaml", budget={"trials": 10**30, "minutes": 0.02})
    run_dir = tmp_path / "run"
    assert main(["search", str(config), "--run-dir", str(run_dir), "--no-progress"]) == 0
    printed = capsys.readouterr()
    first = printed.out.splitlines()[0]
    assert first.startswith("budget:") and "0.02 minutes" in first, first
    assert len(trials(run_dir, "search")) < 1000  # ended by time, not by the trial count
    assert "ExperimentalWarning" not in printed.err
