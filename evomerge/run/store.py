"""The run store: a run's Optuna study, and its trials as typed records.

A trial's record (:class:`TrialRecord`) is stored as the Optuna trial's user
attributes. :class:`RunStore` is the one reader and writer of a run's trials
and attributes, and, with its private helpers (:mod:`evomerge.run._run_folder`
for the folder and its ``run.yaml``, :mod:`evomerge.run._shared_storage` for
drivers sharing one database, :mod:`evomerge.run._study_attrs` for the
study's own attributes), the only code that opens a study or touches Optuna's
private API; the search, the drivers, ``status``, ``export``, ``report`` and
the demo read and write runs through it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, first_line
from evomerge.run._run_folder import (
    OWN_STORAGE,
    RUN_FILE,
    RunFolder,
    connect_url,
    corrupt_study,
    masked,
    own_study_problem,
    storage_url,
)
from evomerge.run._shared_storage import (
    STALE_REASON,
    STUDY_NAME,
    Heartbeat,
    claim_baselines,
    driver_id,
    fail_stale,
    rdb_storage,
)
from evomerge.run._study_attrs import StudyAttributes
from evomerge.run.record import TrialRecord, best_of, chosen, rank_key, with_heldout

INTERRUPTED_REASON = "the search was stopped (Ctrl-C) while it was being scored"


def _storage_failures() -> tuple[type[Exception], ...]:
    """What opening a storage raises when its URL, driver or server is wrong (see :func:`storage_error`)."""
    import sqlalchemy.exc

    return (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.DatabaseError, ImportError)


def reachable(url: str) -> None:
    """Connect to the database at ``url`` once; one line (see
    :func:`open_storage`) when it cannot be reached."""
    import sqlalchemy

    engine = None
    try:
        engine = sqlalchemy.create_engine(connect_url(url))
        engine.connect().close()
    except _storage_failures() as e:
        raise storage_error(url, e) from None
    finally:
        if engine is not None:
            engine.dispose()


def storage_error(url: str, error: Exception) -> EvomergeError:
    """The one line for a storage that cannot be opened, its password masked."""
    import sqlalchemy.exc

    if isinstance(error, (sqlalchemy.exc.NoSuchModuleError, ImportError)):
        return EvomergeError(
            f"storage {masked(url)} needs a database driver that is not installed ({masked(first_line(error))}); "
            "install it (psycopg[binary] for postgresql+psycopg) or fix the URL"
        )
    if isinstance(error, sqlalchemy.exc.ArgumentError):
        return EvomergeError(
            f"storage {masked(url)} is not a database URL; write it as dialect+driver://user@host/database"
        )
    return EvomergeError(
        f"cannot open the storage {masked(url)} ({masked(first_line(error))}); check the server and the user, "
        "and give the password as ${VAR} in the URL, in PGPASSWORD or in a password file"
    )


def open_storage(url: str, shared: bool):
    """The Optuna storage at ``url`` (see :func:`connect_url`); a URL that
    is no database URL, or a database that cannot be reached, is one line
    naming it with its password masked."""

    try:
        return rdb_storage(connect_url(url), shared)
    except _storage_failures() as e:
        raise storage_error(url, e) from None


class RunStore(StudyAttributes):
    """A run's study: the one reader and writer of its trials and attributes.

    Open a finished or running run to read it with :meth:`open`; a search
    opens (or creates) its own with :meth:`create`.
    """

    def __init__(self, run_dir: Path, record: dict[str, Any], study, folder: RunFolder | None = None):
        self.run_dir = Path(run_dir)
        self.record = record  # run.yaml
        self.study = study  # the Optuna study (its public API: ask, tell, sampler)
        self.folder = folder  # the locked folder, for the search that owns it
        self.claim: Any = None  # the baseline claim (an Optuna study) while this driver holds it
        self.stale = 0  # trials a dead driver left running, failed when this search opened the store
        self.shared = False  # the config's storage, which other drivers may share (heartbeats)

    # -- opening ------------------------------------------------------------

    @classmethod
    def open(cls, run_dir: str | Path) -> RunStore:
        """An existing run, to read (status, export, report): never creates anything."""
        import optuna
        import sqlalchemy.exc

        run_dir = Path(run_dir)
        folder = RunFolder(run_dir)
        if not folder.run_file.is_file():
            raise EvomergeError(f"{run_dir} holds no evomerge run (no {RUN_FILE}); pass the --run-dir of a search")
        problem = own_study_problem(run_dir)
        if problem:
            raise corrupt_study(run_dir, problem, search=False)
        record = folder.read()
        if not record.get("study_ready"):
            raise EvomergeError(f"run folder {run_dir} has no study yet; run the search first")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        url = storage_url(run_dir, record)
        if (record.get("config") or {}).get("storage"):
            reachable(url)  # a shared database: its server and password, before the study
        try:
            # Readers never create tables: a reader that did, while a new
            # search was creating them, could make that search fail.
            storage = optuna.storages.RDBStorage(connect_url(url), skip_table_creation=True)
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        except (KeyError, sqlalchemy.exc.OperationalError, optuna.exceptions.StorageInternalError):
            raise EvomergeError(f"run folder {run_dir} has no study yet; run the search first") from None
        return cls(run_dir, record, study)

    @classmethod
    def create(
        cls,
        run_dir: str | Path,
        record: dict[str, Any],
        *,
        shared: bool,
        directions: list[str],
        attrs: dict[str, Any],
        force: bool = False,
        url: str | None = None,
    ) -> RunStore:
        """Claim ``run_dir`` for a search and open (or create) its study.

        ``record`` is the run's ``run.yaml`` content (its ``storage`` the URL
        to use for a new run). ``shared``: the storage is the config's own URL,
        which other drivers may use too (heartbeats, stale trials); otherwise
        it is this folder's, and a trial left running belongs to a dead process.
        ``attrs``: the study's own attributes (objective names, fingerprints).
        ``url``: the config's storage as written (its password, which
        ``record`` holds masked, included); None for the folder's own.
        """
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # A shared database is reached before the folder is touched: a
        # wrong URL or password leaves nothing behind.
        storage = open_storage(url, shared) if url else None
        folder = RunFolder(run_dir)
        record = folder.claim(record, force)
        if storage is None:
            storage = open_storage(storage_url(run_dir, record), shared)
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions, load_if_exists=True)
        store = cls(run_dir, record, study, folder)
        store.shared = shared
        store.stale = fail_stale(study, shared, driver_id(run_dir))
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        folder.mark_ready()
        return store

    def close(self) -> None:
        if self.folder is not None:
            self.folder.release()

    # -- reading trials -------------------------------------------------------

    def trials(self, kind: str | None = None, *, heldout: bool = True, everything: bool = False) -> list[TrialRecord]:
        """The complete trials (of one kind), by number. ``heldout``: with the
        held-out scores added after they finished; ``everything``: failed,
        interrupted and running trials too (with no ``told`` values)."""
        import optuna

        attrs = self.study.user_attrs if heldout else {}
        states = None if everything else (optuna.trial.TrialState.COMPLETE,)
        out = []
        for trial in self.study.get_trials(deepcopy=False, states=states):
            if kind is not None and trial.user_attrs.get("kind") != kind:
                continue
            told = list(trial.values) if trial.values is not None else None
            record = TrialRecord.from_attrs(trial.user_attrs, number=trial.number, told=told, params=dict(trial.params))
            later = attrs.get(f"heldout_{trial.number}")
            out.append(with_heldout(record, later) if later else record)
        return out

    def best(self, kind: str | None = None) -> TrialRecord | None:
        """The successful trial (of one kind) with the highest fitness; the
        earliest among equals. None when there is none."""
        return best_of(self.trials(kind))

    def ranked(self, kind: str | None = None) -> list[TrialRecord]:
        """The complete trials (of one kind), best first."""
        return sorted((record for record in self.trials(kind) if record.complete), key=rank_key)

    def chosen(self) -> tuple[TrialRecord | None, str]:
        """The exported best and the rule that chose it (see :func:`chosen`)."""
        return chosen(self.trials(), self.race())

    def trial(self, number: int) -> TrialRecord | None:
        return next((record for record in self.trials() if record.number == number), None)

    def penalty(self) -> list[float]:
        """What the optimizer is told for a failed candidate: the worst value
        seen so far, per optimizer value (in its direction), or 0 with none."""
        directions = self.directions
        scored = [record.told for record in self.trials(heldout=False) if record.status == "ok"]
        if not scored:
            return [0.0] * len(directions)
        worst = {"maximize": min, "minimize": max}
        return [worst[d](values[i] for values in scored) for i, d in enumerate(directions)]

    def other_states(self) -> dict[str, int]:
        """Trials that are not complete, counted by Optuna state ("fail",
        "pruned", "running"); a trial a Ctrl-C interrupted is a failed one."""
        import optuna

        counts: dict[str, int] = {}
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state != optuna.trial.TrialState.COMPLETE:
                state = trial.state.name.lower()
                counts[state] = counts.get(state, 0) + 1
        return counts

    def count_shared(self, mine: list) -> tuple[int, int]:
        """Search trials finished in the study, and trials running that are not
        ``mine`` (Optuna trials this driver is scoring): other drivers'."""
        import optuna

        ids = {trial._trial_id for trial in mine}
        finished = running = 0
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs.get("kind") == "search":
                finished += 1
            elif trial.state == optuna.trial.TrialState.RUNNING and trial._trial_id not in ids:
                running += 1
        return finished, running

    # -- writing ------------------------------------------------------------

    def add(self, record: TrialRecord, values: list[float], params: dict[str, Any], distributions: dict) -> None:
        """Store a finished trial that no Optuna sampler asked for (a baseline,
        a pycma candidate). ``values``: what the optimizer is told."""
        import optuna

        self.study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: distributions[k] for k in params},
                values=values,
                user_attrs=record.to_attrs(),
            )
        )

    def tell(self, trial, record: TrialRecord, values: list[float]) -> None:
        """Finish an Optuna trial the study asked for with its record."""
        for key, value in record.to_attrs().items():
            trial.set_user_attr(key, value)
        self.study.tell(trial, values if len(values) > 1 else values[0])

    def interrupt(self, trial) -> None:
        """Fail an Optuna trial being scored when the search stopped (Ctrl-C)."""
        import optuna

        trial.set_user_attr("status", "interrupted")
        trial.set_user_attr("reason", INTERRUPTED_REASON)
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)

    def heartbeat(self, trial) -> None:
        """Mark a running Optuna trial alive (shared storage)."""
        self.study._storage.record_heartbeat(trial._trial_id)

    def started(self, trial) -> None:
        """A trial this driver has asked for (on a shared storage; elsewhere
        nothing): marked alive, and as this run folder's (see
        :func:`driver_id`), so that a restart of this folder's search fails
        it at once if this driver dies before telling it."""
        if self.shared:
            trial.set_user_attr("driver", driver_id(self.run_dir))
            self.heartbeat(trial)

    # -- the baseline claim (shared storage) ----------------------------------

    def claim_baselines(self) -> bool:
        """On a shared storage, one driver runs the baselines: the one that
        creates the claim (a second Optuna study, whose unique name makes the
        claim atomic), or any driver once the claimer has been silent for
        ``CLAIM_EXPIRES_S`` (it died before finishing them). True: this
        driver holds the claim (stamp it with :meth:`stamp_claim`)."""
        claim = claim_baselines(self.study)
        if claim is None:
            return False
        self.claim = claim
        self.stamp_claim()
        return True

    def stamp_claim(self) -> None:
        if self.claim is not None:
            self.claim.set_user_attr("alive", time.time())


__all__ = ["OWN_STORAGE", "STALE_REASON", "Heartbeat", "RunFolder", "RunStore", "storage_url"]
