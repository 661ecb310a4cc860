"""A shared storage opens with heartbeats, without Optuna's experimental-feature warning."""

import warnings

import optuna

from evomerge.run._shared_storage import rdb_storage


def test_heartbeats_are_chosen_knowingly_so_optunas_warning_is_silenced_and_no_other(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        storage = rdb_storage(f"sqlite:///{tmp_path / 'shared.db'}", shared=True)
        warnings.warn("a warning of the project's own", UserWarning, stacklevel=1)
    assert storage.heartbeat_interval is not None  # heartbeats on
    categories = [w.category for w in caught]
    assert optuna.exceptions.ExperimentalWarning not in categories, [str(w.message) for w in caught]
    assert UserWarning in categories  # the filter is narrow


def test_asking_a_heartbeat_storage_outside_optimize_is_quiet(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # below the filter the storage adds
        storage = rdb_storage(f"sqlite:///{tmp_path / 'shared.db'}", shared=True)
        study = optuna.create_study(storage=storage, study_name="s")
        study.ask()
    assert not [w for w in caught if "Heartbeat" in str(w.message)], [str(w.message) for w in caught]
