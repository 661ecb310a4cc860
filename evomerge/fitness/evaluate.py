"""Scoring a candidate: the fitness function of the search.

An :class:`Evaluator` is built once per search from the config's ``eval``
section. It prepares everything that does not depend on the weights (the
lm-eval task index and documents, the tokenizer, the tokenized perplexity
text, custom callables) and refuses bad configuration there. ``score(model)``
then scores the live model that ``InPlaceMerger`` rewrites in place, and never
raises for a bad candidate: a failure is a ``Score`` with ``status="failed"``.

    EvalSpec --Evaluator(...)--> prepared tasks, texts, callables
    live model --score--> Score(values per objective, all metrics, status, seconds)
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.devices import parse_devices
from evomerge.errors import EvomergeError, first_line
from evomerge.fitness import perplexity
from evomerge.fitness.custom import custom_values, import_callable
from evomerge.fitness.estimate import Rungs, difference
from evomerge.fitness.lm_eval_tasks import LmEvalTasks, Part, Picks, quiet_lm_eval
from evomerge.fitness.paired import Docs, paired, signed_weights
from evomerge.fitness.score import Score, Versus
from evomerge.fitness.spec import EvalSpec


class Evaluator:
    """Scores live models against an :class:`EvalSpec`.

    Construction does everything that does not depend on the weights, and
    raises :class:`EvomergeError` for bad configuration before any model is
    evaluated: unknown tasks or metrics, missing files, paths leading outside
    ``root`` (unless ``allow_outside_paths``), custom callables that cannot be
    imported, and tasks that evaluate on a test split (unless
    ``allow_test_sets``). ``tokenizer`` is a model folder (or cached hub id)
    with the tokenizer all candidates share; ``device`` is where the live model
    sits (its first device when it is split).

    ``score(model)`` wraps ``model`` in lm-eval's ``HFLM`` once and reuses it
    while the same module is passed, so weights rewritten in place between
    calls are picked up with no rebuild. Identical weights give identical
    scores.
    """

    def __init__(
        self,
        spec: EvalSpec,
        tokenizer: str | Path,
        root: Path = Path("."),
        device: str = "cpu",
        allow_test_sets: bool = False,
        allow_outside_paths: bool = False,
        exclude: dict[str, Sequence[int]] | None = None,
    ):
        self.spec = spec
        self.objectives = list(spec.objectives)
        self.root = Path(root).resolve()
        self.allow_outside_paths = allow_outside_paths
        self.device = parse_devices(device)[0]  # where the model takes its input
        self.tokenizer = _load_tokenizer(tokenizer)
        self._texts = {
            o.perplexity: perplexity.read_tokens(
                self._local_path(o.perplexity, "perplexity file", folder=False), o.perplexity, self.tokenizer
            )
            for o in self.objectives
            if o.perplexity is not None
        }
        self._customs = {o.custom: import_callable(o.custom, self.root) for o in self.objectives if o.custom}
        self.tasks: LmEvalTasks | None = None
        if any(o.task for o in self.objectives):
            include = self.spec.include_path
            include = str(self._local_path(include, "include_path", True)) if include else None
            self.tasks = LmEvalTasks(spec, include, allow_test_sets, exclude or {})
        # Every lm-eval task's scored documents in scoring order (seeded): a
        # step of early stopping, or a round of the selection race, scores
        # the next ones; the fixed documents each task is scored on (a task
        # absent uses all); objectives with per-document scores -> their task.
        self.order: dict[str, list[int]] = self.tasks.order if self.tasks else {}
        self.sample_indices: dict[str, list[int]] = self.tasks.sample_indices if self.tasks else {}
        self.doc_tasks: dict[str, str] = self.tasks.doc_tasks if self.tasks else {}

    # -- construction ------------------------------------------------------------

    def _local_path(self, ref: str, what: str, folder: bool) -> Path:
        path = (self.root / ref).resolve()
        if not self.allow_outside_paths and not path.is_relative_to(self.root):
            raise EvomergeError(
                f"{what} {ref!r} leads outside the config's folder {self.root}; "
                "move it inside or pass --allow-outside-paths"
            )
        if not (path.is_dir() if folder else path.is_file()):
            kind = "folder" if folder else "file"
            raise EvomergeError(f"{what} {ref!r} not found (looked for {kind} {path}); fix the path in the eval config")
        return path

    @property
    def per_doc(self) -> bool:
        """Whether every objective has per-document scores, so that the
        evaluator can score a part of its documents (and stop early)."""
        return len(self.doc_tasks) == len(self.objectives)

    # -- scoring -------------------------------------------------------------------

    def full_part(self) -> Part:
        """Every document of every lm-eval task."""
        return {task: (0, len(order)) for task, order in self.order.items()}

    def score(
        self,
        model: torch.nn.Module,
        part: Part | None = None,
        versus: Versus | None = None,
        rungs: Rungs | None = None,
    ) -> Score:
        """Score the live ``model``; never raises for a bad candidate.

        ``part``: only these documents (positions in :attr:`order`, per
        task), for an evaluator with per-document scores (:attr:`per_doc`);
        ``versus``: score in steps and stop early against an incumbent (see
        :class:`Versus`); ``rungs``: multi-fidelity, the candidate's own
        subset in growing steps, stopped once the front beats its estimate
        (see :class:`Rungs`). Both are ignored without per-document scores.
        """
        if part is not None and not self.per_doc:
            raise ValueError("a part of the documents needs per-document scores for every objective")
        if rungs is not None and (part is not None or versus is not None):
            raise ValueError("rungs score every document of their own order: no part, no versus")
        t0 = time.perf_counter()
        values: dict[str, float] = {}
        metrics: dict[str, float] = {}
        docs: Docs = {name: [] for name in self.doc_tasks} if self.per_doc else {}
        got = _Steps()
        reason, non_finite = None, False
        with quiet_lm_eval():
            try:
                if not _all_finite(model):
                    reason, non_finite = "non-finite weights", True
                else:
                    model.eval()
                    metrics, got = self._score_steps(model, part, versus, rungs, values, docs)
                    if self.per_doc:
                        values.update(self._values(docs, versus if got.stopped else None, rungs, got))
                    bad = [name for name, v in values.items() if not math.isfinite(v)]
                    if bad:
                        reason, non_finite = f"non-finite metric {bad[0]}", True
            except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError from torch 2.5 on
                reason = f"out of memory: {first_line(e)}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a failing candidate is data, whatever the cause
                reason = f"{type(e).__name__}: {first_line(e)}"
        values = {o.name: values.get(o.name, math.nan) for o in self.objectives}
        kept = self.per_doc and reason is None
        return Score(
            values=values,
            metrics=metrics,
            status="ok" if reason is None else "failed",
            reason=reason,
            non_finite=non_finite,
            seconds=time.perf_counter() - t0,
            eval_seconds=got.seconds,
            docs=docs if kept else None,
            documents=got.documents,
            stopped=got.stopped,
            se=got.se if kept and got.stopped else None,
            positions=got.positions if kept and got.stopped and rungs is not None else None,
        )

    def _score_steps(self, model, part: Part | None, versus: Versus | None, rungs: Rungs | None, values, docs: Docs):
        """Score the steps of ``part`` (all of it at once without ``versus``
        or ``rungs``) into ``values`` and ``docs``, stopping after a step
        that shows the candidate worse than the incumbent (or beaten by the
        front); return the metrics (averaged over the steps, by documents)
        and what was scored (:class:`_Steps`)."""
        got = _Steps()
        if rungs is not None and self.per_doc:
            got.orders = {t: rungs.order(t, len(order)) for t, order in self.order.items()}
            steps = _rung_steps(got.orders, rungs)
        else:
            steps = self._steps(part, versus) if self.per_doc else [None]
        sums: dict[str, list[float]] = {}  # metric -> [weighted sum, weight]
        for i, step in enumerate(steps):
            found: dict[str, float] = {}
            seconds, counts = self._evaluate(model, values, found, step, docs if self.per_doc else None)
            got.seconds += seconds
            got.documents += sum(counts.values())
            for key, value in found.items():
                n = counts.get(key.partition("/")[0], 1)
                acc = sums.setdefault(key, [0.0, 0])
                acc[0] += n * value
                acc[1] += n
            if i == len(steps) - 1:
                break
            if versus is not None and self._worse(docs, versus):
                got.stopped = True
            elif rungs is not None and rungs.beaten(rungs.estimates(docs, got.orders, self.doc_tasks)):
                got.stopped = True
            if got.stopped:
                break
        return {key: total / n for key, (total, n) in sums.items() if n}, got

    def _steps(self, part: Part | None, versus: Versus | None) -> list[Picks]:
        """The documents scored one after another: ``part`` (default: all),
        in steps at ``versus.looks`` when stopping early."""
        whole = part if part is not None else self.full_part()
        if versus is None:
            return [self._picks(whole)]
        ends = []  # per look, the end position of each task's documents
        for f in sorted(versus.looks):
            end = {t: lo + math.ceil(f * (hi - lo)) for t, (lo, hi) in whole.items()}
            if all(versus.min_docs <= end[t] - lo and end[t] < hi for t, (lo, hi) in whole.items()):
                ends.append(end)
        ends.append({t: hi for t, (_, hi) in whole.items()})
        steps, done = [], {t: lo for t, (lo, _) in whole.items()}
        for end in ends:
            step = {t: (done[t], e) for t, e in end.items() if e > done[t]}
            if step:
                steps.append(self._picks(step))
                done.update(end)
        return steps

    def _picks(self, part: Part) -> Picks:
        """A part as the positions it scores, in order."""
        return {t: range(lo, hi) for t, (lo, hi) in part.items()}

    def _worse(self, docs: Docs, versus: Versus) -> bool:
        """Whether the documents scored so far show the candidate worse than the incumbent."""
        rule = versus.aggregate if versus.aggregate is not None else signed_weights(self.objectives)
        return paired(docs, versus.docs, rule).p_worse < versus.alpha

    def _values(self, docs: Docs, versus: Versus | None, rungs: Rungs | None, got: _Steps) -> dict[str, float]:
        """Objective values from per-document scores: their means; for a
        candidate stopped against the incumbent the paired estimate (see
        :class:`Versus`), for one stopped by its rungs the difference
        estimate (see :class:`Rungs`), each with its standard error in
        ``got.se``. A candidate its rungs took to every document has its
        scores put back in the evaluator's order."""
        if rungs is not None and got.stopped:
            estimates = rungs.estimates(docs, got.orders, self.doc_tasks)
            got.se = {name: e.se for name, e in estimates.items()}
            got.positions = {t: order[: len(docs[self._first_objective(t)])] for t, order in got.orders.items()}
            return {name: e.value for name, e in estimates.items()}
        if rungs is not None:
            for name, task in self.doc_tasks.items():
                back = [0.0] * len(docs[name])
                for value, position in zip(docs[name], got.orders[task], strict=True):
                    back[position] = value
                docs[name][:] = back
        out = {}
        for name, values in docs.items():
            mean = sum(values) / len(values) if values else math.nan
            if versus is not None:
                theirs = versus.docs[name]
                mine = theirs[: len(values)]
                mean = sum(theirs) / len(theirs) + mean - sum(mine) / len(mine)
                got.se[name] = difference(range(len(values)), values, theirs).se
            out[name] = mean
        return out

    def _first_objective(self, task: str) -> str:
        return next(name for name, t in self.doc_tasks.items() if t == task)

    def _evaluate(
        self,
        model: torch.nn.Module,
        values: dict[str, float],
        metrics: dict[str, float],
        picks: Picks | None = None,
        docs: Docs | None = None,
    ) -> tuple[float, dict[str, int]]:
        """Fill ``values`` and ``metrics`` (and extend ``docs`` with the
        per-document scores when it is given) from the documents of ``picks``
        (default: all); return the seconds spent evaluating and the number
        of documents scored per task."""
        spent, counts = 0.0, {}
        if self.tasks is not None:
            spent, counts = self.tasks.evaluate(self.tasks.hflm(model, self.tokenizer), values, metrics, picks, docs)
        for o in self.objectives:
            t = time.perf_counter()
            if o.perplexity is not None:
                nll = self._nll(model, o.perplexity)
                values[o.name] = math.exp(nll)
                metrics.update({f"{o.name}/perplexity": values[o.name], f"{o.name}/nll": nll})
            elif o.custom is not None:
                values[o.name], more = custom_values(o.custom, o.metric, self._customs[o.custom], model, self.tokenizer)
                metrics.update(more)
            spent += time.perf_counter() - t
        return spent, counts

    def perplexity_chunks(self, model: torch.nn.Module, perplexity_file: str) -> list[torch.Tensor]:
        """The token chunks the objective ``perplexity: <file>`` scores (see
        :func:`evomerge.fitness.perplexity.chunks`)."""
        return perplexity.chunks(self._texts[perplexity_file], model, self.spec.samples)

    def _nll(self, model: torch.nn.Module, perplexity_file: str) -> float:
        """Mean next-token negative log-likelihood over the file's chunks."""
        pieces = self.perplexity_chunks(model, perplexity_file)
        return perplexity.mean_nll(model, pieces, self.device, self.spec.batch_size)


# -- helpers ---------------------------------------------------------------------


@dataclass
class _Steps:
    """What a candidate's steps scored: seconds evaluating, documents,
    whether it stopped, and for a stopped one each objective's standard
    error (and, scored by rungs, each task's positions, in scoring order)."""

    seconds: float = 0.0
    documents: int = 0
    stopped: bool = False
    se: dict[str, float] = field(default_factory=dict)
    orders: dict[str, list[int]] = field(default_factory=dict)  # rungs: each task's scoring order
    positions: dict[str, list[int]] | None = None


def _rung_steps(orders: dict[str, list[int]], rungs: Rungs) -> list[Picks]:
    """The candidate's documents in the steps its rungs end at."""
    steps, done = [], dict.fromkeys(orders, 0)
    for end in rungs.ends({t: len(order) for t, order in orders.items()}):
        steps.append({t: orders[t][done[t] : e] for t, e in end.items() if e > done[t]})
        done.update(end)
    return [step for step in steps if step]


# Spelled out, so that lm-eval does not warn that it falls back on defaults;
# any other metric gets lm-eval's registered aggregation and direction.
_METRIC_ENTRY = {
    "acc": {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
    "acc_norm": {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
    "brier_score": {"metric": "brier_score", "aggregation": "brier_score", "higher_is_better": False},
}


def write_choice_task(
    folder: str | Path,
    name: str,
    docs: Sequence[dict[str, Any]],
    *,
    text: str = "q",
    choices: str = "choices",
    label: str = "label",
    metadata: dict[str, Any] | None = None,
    metrics: Sequence[str] = ("acc",),
) -> Path:
    """Write a local lm-eval multiple-choice task: ``NAME.jsonl`` (the docs)
    and ``NAME.yaml`` (scored by ``metrics`` on its validation split, by
    default ``acc``) in ``folder``; point an objective's ``include_path`` at
    the folder. Any of lm-eval's multiple-choice metrics can be added, e.g.
    ``brier_score`` (lower is better), which, unlike accuracy, moves with the
    probability given to the right answer even when the argmax does not.

    Each doc holds a prompt (field ``text``), a list of choices and the index
    of the right one. The YAML names the data file by absolute path (lm-eval
    resolves ``data_files`` against the current directory) and uses plain
    field names, not Jinja templates, which lm-eval would compile per call.
    """
    return write_local_task(
        folder,
        name,
        docs,
        {
            "output_type": "multiple_choice",
            "doc_to_text": text,
            "doc_to_choice": choices,
            "doc_to_target": label,
            "metric_list": [_METRIC_ENTRY.get(m, {"metric": m}) for m in metrics],
        },
        metadata,
    )


def write_local_task(
    folder: str | Path,
    name: str,
    docs: Sequence[dict[str, Any]],
    scoring: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``NAME.jsonl`` (the docs) and ``NAME.yaml`` in ``folder``: a
    local lm-eval task on its validation split whose YAML names the data file
    by absolute path (lm-eval resolves ``data_files`` against the current
    directory); ``scoring`` holds the rest of the YAML (``output_type``, the
    ``doc_to_*`` fields, ``metric_list``). Returns the YAML's path."""
    import json

    import yaml

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = (folder / f"{name}.jsonl").resolve()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "validation_split": "validation",
        **scoring,
        **({"metadata": metadata} if metadata else {}),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _all_finite(model: torch.nn.Module) -> bool:
    # A float64 sum of a float32/16 tensor cannot overflow, so it is finite
    # exactly when every element is; one reduction per tensor, no copies.
    sums = [p.detach().sum(dtype=torch.float64) for p in model.parameters() if p.is_floating_point()]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all())


def _load_tokenizer(ref: str | Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(ref))
    except Exception as e:  # noqa: BLE001 - missing files, bad JSON, offline hub: one fix
        raise EvomergeError(
            f"cannot load a tokenizer from {str(ref)!r} ({type(e).__name__}: {first_line(e)}); "
            "point it at a model folder that has tokenizer files"
        ) from None
