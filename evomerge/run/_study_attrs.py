"""The study-level attributes of a run: its objectives and directions, the
time searched, the selection race's scores and summary, and the held-out
scores added after a trial finished (a finished Optuna trial cannot be
changed)."""

from __future__ import annotations

from typing import Any

from evomerge.run.record import TrialRecord, compact


class StudyAttributes:
    """The part of :class:`~evomerge.run.store.RunStore` that reads and
    writes the study's own attributes (``self.study``, ``self.record``)."""

    study: Any
    record: dict[str, Any]

    @property
    def objectives(self) -> list[str]:
        return list(self.study.user_attrs.get("objectives", []))

    @property
    def directions(self) -> list[str]:
        """Per optimizer value: "maximize" or "minimize"."""
        import optuna

        up = optuna.study.StudyDirection.MAXIMIZE
        return ["maximize" if d == up else "minimize" for d in self.study.directions]

    def aggregate(self, section: str = "eval"):
        """The fitness rule of a config section (``eval``, ``heldout``,
        ``select``): an :class:`~evomerge.fitness.aggregate.Aggregate`, with
        the stored expert references (see :meth:`references`); an empty one
        when the run's config has no such section, or its references are not
        known yet."""
        from evomerge.fitness.aggregate import Aggregate
        from evomerge.run.config import SearchConfig

        try:
            cfg = SearchConfig.model_validate(self.record.get("config") or {})
        except Exception:  # noqa: BLE001 - a run written by an older version: no weights
            return Aggregate({})
        try:
            return cfg.aggregate(section, self.references())
        except ValueError:
            return Aggregate({})

    def references(self) -> dict[str, dict[str, float]]:
        """The expert references of normalized objectives (``eval`` and
        ``heldout`` -> objective -> the best source's value), once the
        sources are scored; empty before, or when nothing is normalized by
        the expert."""
        return dict(self.study.user_attrs.get("references") or {})

    def set_references(self, references: dict[str, dict[str, float]]) -> None:
        self.study.set_user_attr("references", references)

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
