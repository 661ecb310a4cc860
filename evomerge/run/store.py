"""The run store: a run folder, its Optuna study, and the typed trial record.

A run folder holds ``run.yaml`` (the config, its fingerprints and the storage
URL), a ``.lock`` held by the one search driving it, the Optuna study
(``study.db``, SQLite, unless the config names another storage) and the
CMA-ES checkpoint. A trial's record (:class:`TrialRecord`) is stored as the
Optuna trial's user attributes; a held-out score added after the trial
finished goes into the study's attributes (a finished Optuna trial cannot be
changed). This module is the only one that opens a study, turns trials into
records and back, or touches Optuna's private API; the search, the drivers,
``status``, ``export``, ``report`` and the demo read and write runs through it.
"""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from evomerge.engine.folder import atomic_write
from evomerge.errors import EvomergeError
from evomerge.run.record import TrialRecord, best_of, chosen, compact, rank_key, with_heldout

STUDY_NAME = "evomerge"
RUN_FILE = "run.yaml"
OWN_FILES = (RUN_FILE, "study.db", "cma_state.pkl", "cma_state.pkl.tmp", "cma_state.tmp")
HEARTBEAT_S = 30.0  # on a shared storage; a trial is stale after 120 s without one
CLAIM_EXPIRES_S = 600.0  # a baseline claim not renewed this long belongs to a dead driver
CLAIM_STAMP_S = 30.0  # how long a new claim may go without its first stamp
STALE_REASON = "its driver stopped (kill -9, a crash or a lost node) while it was being scored"
INTERRUPTED_REASON = "the search was stopped (Ctrl-C) while it was being scored"


# -- the run folder -----------------------------------------------------------


class RunFolder:
    """A run folder claimed by one search: its lock and its ``run.yaml``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = None

    @property
    def run_file(self) -> Path:
        return self.path / RUN_FILE

    def read(self) -> dict[str, Any]:
        return yaml.safe_load(self.run_file.read_text()) or {}

    def write(self, record: dict[str, Any]) -> None:
        atomic_write(self.run_file, yaml.safe_dump(record, sort_keys=False))

    def claim(self, record: dict[str, Any], force: bool) -> dict[str, Any]:
        """Lock the folder for this search and write its ``run.yaml``.

        ``record`` is the new run's (fingerprints, config, storage URL). A
        folder of the same config keeps its storage and readiness; one of
        another config is refused unless ``force`` (then its files go).
        Returns the record written.
        """
        d = self.path
        if d.exists() and not d.is_dir():
            raise EvomergeError(f"run folder {d} is a file; pick another --run-dir")
        if not self.run_file.is_file() and d.is_dir() and any(p.name != ".lock" for p in d.iterdir()) and not force:
            raise EvomergeError(f"run folder {d} is not empty and holds no evomerge run; use an empty --run-dir")
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._lock = open(d / ".lock", "w")
        except OSError as e:
            raise EvomergeError(f"cannot create run folder {d} ({e.strerror}); pick a writable --run-dir") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EvomergeError(f"another evomerge process is running {d}; wait for it or stop it") from None
        if self.run_file.is_file():
            old = self.read()
            if old.get("config_fingerprint") != record["config_fingerprint"]:
                if not force:
                    raise EvomergeError(
                        f"run folder {d} belongs to a different config ({old.get('config_path')}); "
                        "use another --run-dir, or pass --force to start this config there afresh"
                    )
                for name in OWN_FILES:
                    (d / name).unlink(missing_ok=True)
            else:
                record = {**record, "storage": old.get("storage", record["storage"])}
                if old.get("study_ready"):
                    record["study_ready"] = True
        self.write(record)
        return record

    def mark_ready(self) -> None:
        # Readers (status, export) wait for this mark: opening an Optuna
        # storage stamps its schema version, which would race the search's
        # own stamping of a new database.
        record = self.read()
        if not record.get("study_ready"):
            self.write({**record, "study_ready": True})

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None


OWN_STORAGE = "study.db"  # run.yaml's storage for a run's own database, in its folder


def storage_url(run_dir: str | Path, record: dict[str, Any]) -> str:
    """The storage URL of a run: the config's own storage (a shared database)
    as given; otherwise the run folder's ``study.db``, wherever the folder is
    now, so a copied or moved run uses its own database. (Runs written before
    recorded an absolute path to their database; it is not used.)"""
    if (record.get("config") or {}).get("storage"):
        return record["storage"]
    return f"sqlite:///{(Path(run_dir) / OWN_STORAGE).resolve()}"


# -- the store ------------------------------------------------------------------


class RunStore:
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
        record = folder.read()
        if not record.get("study_ready"):
            raise EvomergeError(f"run folder {run_dir} has no study yet; run the search first")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            # Readers never create tables: a reader that did, while a new
            # search was creating them, could make that search fail.
            storage = optuna.storages.RDBStorage(storage_url(run_dir, record), skip_table_creation=True)
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
    ) -> RunStore:
        """Claim ``run_dir`` for a search and open (or create) its study.

        ``record`` is the run's ``run.yaml`` content (its ``storage`` the URL
        to use for a new run). ``shared``: the storage is the config's own URL,
        which other drivers may use too (heartbeats, stale trials); otherwise
        it is this folder's, and a trial left running belongs to a dead process.
        ``attrs``: the study's own attributes (objective names, fingerprints).
        """
        import optuna

        folder = RunFolder(run_dir)
        record = folder.claim(record, force)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = _rdb_storage(storage_url(run_dir, record), shared)
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, directions=directions, load_if_exists=True)
        store = cls(run_dir, record, study, folder)
        store.stale = store._fail_stale(shared)
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        folder.mark_ready()
        return store

    def _fail_stale(self, shared: bool) -> int:
        """Fail the trials a dead driver left running, marked ``status:
        stale`` with the reason; return how many. On the run's own storage
        this process holds the folder's lock, so every running trial is
        stale; on a shared one, those whose heartbeat stopped."""
        import optuna

        storage = self.study._storage
        if shared:
            ids = storage._get_stale_trial_ids(self.study._study_id)
        else:
            running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            ids = [t._trial_id for t in running]
        failed = 0
        for trial_id in ids:
            try:
                storage.set_trial_user_attr(trial_id, "status", "stale")
                storage.set_trial_user_attr(trial_id, "reason", STALE_REASON)
                failed += bool(storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL))
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another driver failed or finished it meanwhile
        return failed

    def close(self) -> None:
        if self.folder is not None:
            self.folder.release()

    # -- reading ------------------------------------------------------------

    @property
    def objectives(self) -> list[str]:
        return list(self.study.user_attrs.get("objectives", []))

    @property
    def directions(self) -> list[str]:
        """Per optimizer value: "maximize" or "minimize"."""
        import optuna

        up = optuna.study.StudyDirection.MAXIMIZE
        return ["maximize" if d == up else "minimize" for d in self.study.directions]

    def weights(self, section: str = "eval") -> dict[str, float]:
        """Signed objective weights of a config section (``eval``,
        ``heldout``, ``select``), for :mod:`evomerge.fitness.paired`; empty when
        the run's config has no such section."""
        from evomerge.fitness.paired import signed_weights
        from evomerge.run.config import SearchConfig

        try:
            cfg = SearchConfig.model_validate(self.record.get("config") or {})
        except Exception:  # noqa: BLE001 - a run written by an older version: no weights
            return {}
        spec = cfg.select.spec(cfg.eval) if section == "select" and cfg.select else getattr(cfg, section, None)
        return signed_weights(spec.objectives) if spec is not None and hasattr(spec, "objectives") else {}

    def run_attr(self, name: str, default: Any = None) -> Any:
        """A study-level attribute: ``objectives``, ``space_fingerprint``,
        ``config_fingerprint``, ``elapsed_s``."""
        return self.study.user_attrs.get(name, default)

    @property
    def elapsed(self) -> float:
        """Seconds searched so far, over every session."""
        return float(self.study.user_attrs.get("elapsed_s", 0.0))

    def save_elapsed(self, seconds: float) -> None:
        self.study.set_user_attr("elapsed_s", seconds)

    def trials(self, kind: str | None = None, *, heldout: bool = True, everything: bool = False) -> list[TrialRecord]:
        """The complete trials (of one kind), by number. ``heldout``: with the
        held-out scores added after they finished; ``everything``: failed,
        interrupted and running trials too (with no ``told`` values)."""
        import optuna

        attrs = self.study.user_attrs if heldout else {}
        states = None if everything else (optuna.trial.TrialState.COMPLETE,)
        out = []
        for t in self.study.get_trials(deepcopy=False, states=states):
            if kind is not None and t.user_attrs.get("kind") != kind:
                continue
            told = list(t.values) if t.values is not None else None
            record = TrialRecord.from_attrs(t.user_attrs, number=t.number, told=told, params=dict(t.params))
            later = attrs.get(f"heldout_{t.number}")
            out.append(with_heldout(record, later) if later else record)
        return out

    def best(self, kind: str | None = None) -> TrialRecord | None:
        """The successful trial (of one kind) with the highest fitness; the
        earliest among equals. None when there is none."""
        return best_of(self.trials(kind))

    def ranked(self, kind: str | None = None) -> list[TrialRecord]:
        """The complete trials (of one kind), best first."""
        return sorted((r for r in self.trials(kind) if r.complete), key=rank_key)

    def chosen(self) -> tuple[TrialRecord | None, str]:
        """The exported best and the rule that chose it (see :func:`chosen`)."""
        return chosen(self.trials(), self.race())

    def selections(self, fingerprint: str) -> dict[int, dict[str, Any]]:
        """Trial number -> its selection scores so far (``docs``, or
        ``values`` without per-document scores, or ``failed``) for the
        selection documents of ``fingerprint``."""
        out = {}
        for key, value in self.study.user_attrs.items():
            if key.startswith("select_") and isinstance(value, dict) and value.get("fp") == fingerprint:
                out[int(key.removeprefix("select_"))] = value
        return out

    def race(self) -> dict[str, Any] | None:
        """The selection race's summary (winner, rounds), once it ran."""
        return self.study.user_attrs.get("race")

    def trial(self, number: int) -> TrialRecord | None:
        return next((r for r in self.trials() if r.number == number), None)

    def penalty(self) -> list[float]:
        """What the optimizer is told for a failed candidate: the worst value
        seen so far, per optimizer value (in its direction), or 0 with none."""
        directions = self.directions
        scored = [r.told for r in self.trials(heldout=False) if r.status == "ok"]
        if not scored:
            return [0.0] * len(directions)
        worst = {"maximize": min, "minimize": max}
        return [worst[d](values[i] for values in scored) for i, d in enumerate(directions)]

    def other_states(self) -> dict[str, int]:
        """Trials that are not complete, counted by Optuna state ("fail",
        "pruned", "running"); a trial a Ctrl-C interrupted is a failed one."""
        import optuna

        counts: dict[str, int] = {}
        for t in self.study.get_trials(deepcopy=False):
            if t.state != optuna.trial.TrialState.COMPLETE:
                counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
        return counts

    def count_shared(self, mine: list) -> tuple[int, int]:
        """Search trials finished in the study, and trials running that are not
        ``mine`` (Optuna trials this driver is scoring): other drivers'."""
        import optuna

        ids = {t._trial_id for t in mine}
        finished = running = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.state == optuna.trial.TrialState.COMPLETE and t.user_attrs.get("kind") == "search":
                finished += 1
            elif t.state == optuna.trial.TrialState.RUNNING and t._trial_id not in ids:
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

    def set_heldout(self, number: int, **fields: Any) -> None:
        """Add a held-out result (``TrialRecord``'s ``heldout_*`` fields) to a finished trial."""
        held = TrialRecord(kind="search", **fields)
        self.study.set_user_attr(f"heldout_{number}", held.heldout_attrs())

    def set_selection(self, number: int, entry: dict[str, Any]) -> None:
        """Store a trial's selection scores so far (see :meth:`selections`);
        each write replaces the last, so a kill leaves the previous one."""
        if "docs" in entry:
            entry = {**entry, "docs": compact(entry["docs"])}
        self.study.set_user_attr(f"select_{number}", entry)

    def set_race(self, summary: dict[str, Any]) -> None:
        self.study.set_user_attr("race", summary)

    def heartbeat(self, trial) -> None:
        """Mark a running Optuna trial alive (shared storage)."""
        self.study._storage.record_heartbeat(trial._trial_id)

    # -- the baseline claim (shared storage) ----------------------------------

    def claim_baselines(self) -> bool:
        """On a shared storage, one driver runs the baselines: the one that
        creates the claim (a second Optuna study, whose unique name makes the
        claim atomic), or any driver once the claimer has been silent for
        ``CLAIM_EXPIRES_S`` (it died before finishing them). True: this
        driver holds the claim (stamp it with :meth:`stamp_claim`)."""
        import optuna

        name = f"{STUDY_NAME}-baselines"
        storage = self.study._storage
        try:
            claim = optuna.create_study(storage=storage, study_name=name)
        except optuna.exceptions.DuplicatedStudyError:
            claim = optuna.load_study(study_name=name, storage=storage)
            # The claimer stamps its claim just after creating it: a claim
            # without a stamp yet is fresh, not dead. Wait for the stamp.
            waited = time.monotonic()
            while "alive" not in claim.user_attrs and time.monotonic() - waited < CLAIM_STAMP_S:
                time.sleep(0.2)
            if time.time() - float(claim.user_attrs.get("alive", 0)) < CLAIM_EXPIRES_S:
                return False
        self.claim = claim
        self.stamp_claim()
        return True

    def stamp_claim(self) -> None:
        if self.claim is not None:
            self.claim.set_user_attr("alive", time.time())


def _rdb_storage(url: str, shared: bool, attempts: int = 5):
    import optuna
    import sqlalchemy.exc

    options = {"heartbeat_interval": int(HEARTBEAT_S), "grace_period": 4 * int(HEARTBEAT_S)} if shared else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            # Two drivers starting at once on a new shared database both
            # create its tables and stamp its schema version; the loser finds
            # them made when it tries again.
            if not shared or attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class Heartbeat:
    """On a shared storage, beats for the Optuna trials being scored, so that
    another driver's ``fail_stale_trials`` fails them only if this driver dies
    (Optuna beats only inside ``study.optimize``, which we do not use), and
    stamps the baseline claim while ``stamping`` is set."""

    def __init__(self, store: RunStore, inflight: dict, every: float = HEARTBEAT_S):
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
            for c in list(self.inflight.values()):
                if c.trial is not None:
                    try:
                        self.store.heartbeat(c.trial)
                    except Exception:  # noqa: BLE001 - a trial finished meanwhile; the next beat is soon
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


__all__ = ["Heartbeat", "RunFolder", "RunStore"]
