"""What drivers sharing one storage need: the database opened with Optuna's
heartbeats, the trials a dead driver left running failed, the claim that
lets one driver run the baselines, and the thread that keeps both alive."""

from __future__ import annotations

import threading
import time
import warnings

STUDY_NAME = "evomerge"
HEARTBEAT_S = 30.0  # on a shared storage; a trial is stale after 120 s without one
CLAIM_EXPIRES_S = 600.0  # a baseline claim not renewed this long belongs to a dead driver
CLAIM_STAMP_S = 30.0  # how long a new claim may go without its first stamp
STALE_REASON = "its driver stopped (kill -9, a crash or a lost node) while it was being scored"


def rdb_storage(url: str, shared: bool, attempts: int = 5):
    """The Optuna storage at ``url``; on a shared one, with heartbeats, and
    retried while another driver is creating the same new database."""
    import optuna
    import sqlalchemy.exc

    options = {"heartbeat_interval": int(HEARTBEAT_S), "grace_period": 4 * int(HEARTBEAT_S)} if shared else {}
    if shared:
        # The search beats for its own trials (Heartbeat), so asking with a
        # heartbeat storage outside Study.optimize is meant.
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                # Heartbeats are chosen knowingly; Optuna calls them experimental.
                warnings.filterwarnings(
                    "ignore", r".*(heartbeat_interval|grace_period)", optuna.exceptions.ExperimentalWarning
                )
                return optuna.storages.RDBStorage(url, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # Two drivers starting at once on a new shared database both
            # create its tables and stamp its schema version; the loser finds
            # them made when it tries again.
            if not shared or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def driver_id(run_dir) -> str:
    """The id a run folder's search writes on the trials it starts on a
    shared storage: its host and path. Only one search drives a folder at a
    time (its lock), so a trial with this folder's id still running when
    the folder's search starts again was left by one that died."""
    import hashlib
    import socket
    from pathlib import Path

    return hashlib.sha256(f"{socket.gethostname()}:{Path(run_dir).resolve()}".encode()).hexdigest()[:16]


def fail_stale(study, shared: bool, mine: str | None = None) -> int:
    """Fail the trials of ``study`` a dead driver left running, marked ``status:
    stale`` with the reason; return how many. On the run's own storage
    this process holds the folder's lock, so every running trial is
    stale; on a shared one, those whose heartbeat stopped, and those this
    folder's earlier search left (``mine``, its :func:`driver_id`): a
    driver killed and started again takes its budget back at once, without
    waiting for the heartbeat to expire."""
    import optuna

    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if shared:
        ids = storage._get_stale_trial_ids(study._study_id)
        ids += [t._trial_id for t in running if mine and t.user_attrs.get("driver") == mine and t._trial_id not in ids]
    else:
        ids = [trial._trial_id for trial in running]
    failed = 0
    for trial_id in ids:
        try:
            storage.set_trial_user_attr(trial_id, "status", "stale")
            storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
            failed += bool(storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL))
        except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            pass  # another driver failed or finished it meanwhile
    return failed


def claim_baselines(study):
    """The baseline claim on ``study``'s storage, when this driver gets it
    (see :meth:`evomerge.run.store.RunStore.claim_baselines`); None when
    another live driver holds it."""
    import optuna

    name = f"{STUDY_NAME}-baselines"
    storage = study._storage
    try:
        return optuna.create_study(storage=storage, study_name=name)
    except optuna.exceptions.DuplicatedStudyError:
        claim = optuna.load_study(study_name=name, storage=storage)
    # The claimer stamps its claim just after creating it: a claim
    # without a stamp yet is fresh, not dead. Wait for the stamp.
    waited = time.monotonic()
    while "alive" not in claim.user_attrs and time.monotonic() - waited < CLAIM_STAMP_S:
        time.sleep(0.2)
    if time.time() - float(claim.user_attrs.get("alive", 0)) < CLAIM_EXPIRES_S:
        return None
    return claim


class Heartbeat:
    """On a shared storage, beats for the Optuna trials being scored, so that
    another driver's ``fail_stale_trials`` fails them only if this driver dies
    (Optuna beats only inside ``study.optimize``, which we do not use), and
    stamps the baseline claim while ``stamping`` is set."""

    def __init__(self, store, inflight: dict, every: float = HEARTBEAT_S):
        self.store, self.inflight, self.every = store, inflight, every
        self.stamping = False  # True while this driver runs the baselines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evomerge-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            if self.stamping:
                try:
                    self.store.stamp_claim()
                except Exception:  # noqa: BLE001 - a busy storage; the next beat is soon
                    pass
            for candidate in list(self.inflight.values()):
                if candidate.trial is not None:
                    try:
                        self.store.heartbeat(candidate.trial)
                    except Exception:  # noqa: BLE001 - a trial finished meanwhile; the next beat is soon
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
