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

import contextlib
import importlib
import logging
import math
import numbers
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.engine.devices import parse_devices
from evomerge.errors import EvomergeError
from evomerge.fitness.paired import Docs, paired, signed_weights
from evomerge.fitness.score import Score, Versus
from evomerge.fitness.spec import EvalSpec, ObjectiveSpec

PERPLEXITY_MAX_LENGTH = 512  # tokens per perplexity chunk, at most
PERPLEXITY_MAX_TOKENS = 65536  # tokens scored per perplexity file when `samples` is not set
_LOGITS_BUDGET = 2**28  # logits elements per perplexity forward pass (1 GiB in float32)
Part = dict[str, tuple[int, int]]  # task -> (first, end) positions in its document order


class _Indices(list):
    """Document indices for lm-eval's ``samples``. lm-eval tests
    ``i in samples`` for every document of the task; a set makes that O(1)."""

    def __init__(self, items: list[int]):
        super().__init__(items)
        self._set = frozenset(items)

    def __contains__(self, item: object) -> bool:
        return item in self._set


@dataclass
class _TaskObjective:
    result: str  # the task or group name under lm-eval's results
    key: str  # lm-eval's "metric,filter" key


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
        self._texts = {o.perplexity: self._read_text(o.perplexity) for o in self.objectives if o.perplexity is not None}
        self._customs = {o.custom: _import_callable(o.custom, self.root) for o in self.objectives if o.custom}
        self._task_dict: dict | None = None
        self._task_objectives: dict[str, _TaskObjective] = {}
        # The fixed documents each lm-eval task is scored on; a task absent here uses all.
        self.sample_indices: dict[str, list[int]] = {}
        # Every lm-eval task's scored documents in scoring order (seeded): a
        # step of early stopping, or a round of the selection race, scores
        # the next ones.
        self.order: dict[str, list[int]] = {}
        # Objectives with per-document scores -> their task.
        self.doc_tasks: dict[str, str] = {}
        if any(o.task for o in self.objectives):
            self._prepare_tasks(allow_test_sets, exclude or {})
        self._lm = None
        self._lm_model: torch.nn.Module | None = None

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

    def _read_text(self, ref: str) -> torch.Tensor:
        path = self._local_path(ref, "perplexity file", folder=False)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EvomergeError(f"perplexity file {ref!r} is not UTF-8 text; convert it to UTF-8") from None
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            raise EvomergeError(f"perplexity file {ref!r} has {len(ids)} tokens; give it some text")
        return torch.tensor(ids, dtype=torch.long)  # (N,) the whole file

    @property
    def per_doc(self) -> bool:
        """Whether every objective has per-document scores, so that the
        evaluator can score a part of its documents (and stop early)."""
        return len(self.doc_tasks) == len(self.objectives)

    def _prepare_tasks(self, allow_test_sets: bool, exclude: dict[str, Sequence[int]]) -> None:
        # Imported now, not in the first score(): its time, and its progress
        # bars (silenced only in modules already imported), belong here.
        import datasets
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        from lm_eval.tasks import TaskManager

        # Loading a task's documents draws a progress bar per split; the
        # search shows its own, and errors must stay one line.
        datasets.disable_progress_bars()

        names = list(dict.fromkeys(o.task for o in self.objectives if o.task))
        include = (
            str(self._local_path(self.spec.include_path, "include_path", True)) if self.spec.include_path else None
        )
        # Indexing lm-eval's built-in tasks takes seconds; an include_path alone, milliseconds.
        manager = TaskManager(include_path=include, include_defaults=include is None)
        if include and any(n not in manager.all_tasks for n in names):
            manager = TaskManager(include_path=include, include_defaults=True)
        for name in names:
            if name not in manager.all_tasks:
                raise EvomergeError(_unknown_task(name, manager.all_tasks, include))

        if not allow_test_sets:
            # Refuse from the YAML already, before loading downloads the dataset.
            for name in names:
                found = _declared_test_split(manager.task_index, name)
                if found:
                    raise EvomergeError(_test_split_refusal(*found, via=name))

        loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
        for name in names:
            try:
                part = manager.load([name])
            except Exception as e:  # noqa: BLE001 - lm-eval raises many types; one fix for all
                raise EvomergeError(
                    f"cannot load lm-eval task {name!r} ({type(e).__name__}: {_first_line(e)}); "
                    "check its YAML and that its dataset is available locally (offline)"
                ) from None
            for k in loaded:
                loaded[k].update(part.get(k) or {})
            if name not in part["tasks"] and name not in part.get("groups", {}):
                raise EvomergeError(
                    f"{name!r} is an lm-eval tag (a set of tasks), which reports no score of its own; "
                    "list its tasks as separate objectives"
                )

        for task_name, task in loaded["tasks"].items():
            if task.has_test_docs() and not allow_test_sets:
                raise EvomergeError(_test_split_refusal(task_name, getattr(task.config, "test_split", None) or "test"))
            # As lm-eval's simple_evaluate: a task configured for 0 shots keeps 0; unset means 0.
            if self.spec.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=self.spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            self._choose_docs(task_name, len(task.eval_docs), exclude.get(task_name))

        from lm_eval.api.metrics import mean

        for o in self.objectives:
            if o.task:
                available = _reported_metrics(o.task, loaded)
                self._task_objectives[o.name] = _TaskObjective(o.task, _metric_key(o, available))
                task = loaded["tasks"].get(o.task)  # None for a group: no per-document scores
                if task is not None and task.aggregation().get(o.metric.partition(",")[0]) is mean:
                    self.doc_tasks[o.name] = o.task
        self._task_dict = loaded

    def _choose_docs(self, task_name: str, n_docs: int, excluded: Sequence[int] | None) -> None:
        """The task's documents, in scoring order: ``samples`` of them (or
        all) drawn with the seed, never one of ``excluded``."""
        rng = random.Random(self.spec.seed)
        samples = self.spec.samples
        if excluded is not None:
            taken = set(excluded)
            pool = [i for i in range(n_docs) if i not in taken]
            if not pool:
                raise EvomergeError(
                    f"task {task_name!r} has no documents left for selection: eval scores all {n_docs}; "
                    "set eval.samples below that, or give select its own tasks"
                )
            rng.shuffle(pool)  # a larger `samples` later extends the same order
            order = pool[:samples]
        elif samples is not None and samples < n_docs:
            order = rng.sample(range(n_docs), samples)
        else:
            order = list(range(n_docs))
            rng.shuffle(order)
        self.order[task_name] = order
        if len(order) < n_docs:
            self.sample_indices[task_name] = sorted(order)

    # -- scoring -------------------------------------------------------------------

    def full_part(self) -> Part:
        """Every document of every lm-eval task."""
        return {task: (0, len(order)) for task, order in self.order.items()}

    def score(self, model: torch.nn.Module, part: Part | None = None, versus: Versus | None = None) -> Score:
        """Score the live ``model``; never raises for a bad candidate.

        ``part``: only these documents (positions in :attr:`order`, per
        task), for an evaluator with per-document scores (:attr:`per_doc`);
        ``versus``: score in steps and stop early against an incumbent (see
        :class:`Versus`; ignored without per-document scores).
        """
        if part is not None and not self.per_doc:
            raise ValueError("a part of the documents needs per-document scores for every objective")
        t0 = time.perf_counter()
        values: dict[str, float] = {}
        metrics: dict[str, float] = {}
        docs: Docs = {name: [] for name in self.doc_tasks} if self.per_doc else {}
        eval_seconds, documents, stopped = 0.0, 0, False
        reason, non_finite = None, False
        with _quiet_lm_eval():
            try:
                if not _all_finite(model):
                    reason, non_finite = "non-finite weights", True
                else:
                    model.eval()
                    steps = self._steps(part, versus) if self.per_doc else [None]
                    sums: dict[str, list[float]] = {}  # metric -> [weighted sum, weight]
                    for i, step in enumerate(steps):
                        got: dict[str, float] = {}
                        seconds, counts = self._evaluate(model, values, got, step, docs if self.per_doc else None)
                        eval_seconds += seconds
                        documents += sum(counts.values())
                        for key, value in got.items():
                            n = counts.get(key.partition("/")[0], 1)
                            acc = sums.setdefault(key, [0.0, 0])
                            acc[0] += n * value
                            acc[1] += n
                        if versus is not None and i < len(steps) - 1 and self._worse(docs, versus):
                            stopped = True
                            break
                    metrics.update({key: total / n for key, (total, n) in sums.items() if n})
                    if self.per_doc:
                        values.update(self._values(docs, versus if stopped else None))
                    bad = [name for name, v in values.items() if not math.isfinite(v)]
                    if bad:
                        reason, non_finite = f"non-finite metric {bad[0]}", True
            except torch.cuda.OutOfMemoryError as e:  # torch.OutOfMemoryError from torch 2.5 on
                reason = f"out of memory: {_first_line(e)}"
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001 - a failing candidate is data, whatever the cause
                reason = f"{type(e).__name__}: {_first_line(e)}"
        values = {o.name: values.get(o.name, math.nan) for o in self.objectives}
        return Score(
            values=values,
            metrics=metrics,
            status="ok" if reason is None else "failed",
            reason=reason,
            non_finite=non_finite,
            seconds=time.perf_counter() - t0,
            eval_seconds=eval_seconds,
            docs=docs if self.per_doc and reason is None else None,
            documents=documents,
            stopped=stopped,
        )

    def _steps(self, part: Part | None, versus: Versus | None) -> list[Part]:
        """The parts scored one after another: ``part`` (default: all), in
        steps at ``versus.looks`` when stopping early."""
        whole = part if part is not None else self.full_part()
        if versus is None:
            return [whole]
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
                steps.append(step)
                done.update(end)
        return steps

    def _worse(self, docs: Docs, versus: Versus) -> bool:
        """Whether the documents scored so far show the candidate worse than the incumbent."""
        weights = signed_weights(self.objectives)
        return paired(docs, versus.docs, weights).p_worse < versus.alpha

    def _values(self, docs: Docs, versus: Versus | None) -> dict[str, float]:
        """Objective values from per-document scores: their means, or for a
        stopped candidate the paired estimate (see :class:`Versus`)."""
        out = {}
        for name, values in docs.items():
            mean = sum(values) / len(values) if values else math.nan
            if versus is not None:
                theirs = versus.docs[name]
                mine = theirs[: len(values)]
                mean = sum(theirs) / len(theirs) + mean - sum(mine) / len(mine)
            out[name] = mean
        return out

    def _evaluate(
        self,
        model: torch.nn.Module,
        values: dict[str, float],
        metrics: dict[str, float],
        part: Part | None = None,
        docs: Docs | None = None,
    ) -> tuple[float, dict[str, int]]:
        """Fill ``values`` and ``metrics`` (and extend ``docs`` with the
        per-document scores when it is given) from the documents of ``part``
        (default: all); return the seconds spent evaluating and the number
        of documents scored per task."""
        spent = 0.0
        counts: dict[str, int] = {}
        if self._task_dict is not None:
            lm = self._hflm(model)
            task_dict, samples = self._task_dict, self.sample_indices
            if part is not None:
                task_dict = {"tasks": {t: self._task_dict["tasks"][t] for t in part}, "groups": {}, "group_map": {}}
                samples = {t: sorted(self.order[t][lo:hi]) for t, (lo, hi) in part.items()}
            for task in task_dict["tasks"].values():
                # The few-shot sampler's generator advances as it draws; reseeding
                # gives every candidate the same prompts.
                task.set_fewshot_seed(seed=self.spec.seed)
            from lm_eval import evaluator

            t = time.perf_counter()
            out = evaluator.evaluate(
                lm=lm,
                task_dict=task_dict,
                samples={k: _Indices(v) for k, v in samples.items()} or None,
                bootstrap_iters=0,
                log_samples=docs is not None,
            )
            spent += time.perf_counter() - t
            counts = {t: len(samples[t]) if t in samples else len(self.order[t]) for t in task_dict["tasks"]}
            results = out["results"]
            for name, row in results.items():
                for key, value in row.items():
                    if "," in key and _is_number(value):
                        metrics[f"{name}/{key.removesuffix(',none')}"] = float(value)
            for o in self.objectives:
                if o.task and o.task in results:
                    target = self._task_objectives[o.name]
                    value = results.get(target.result, {}).get(target.key)
                    if not _is_number(value):
                        raise RuntimeError(f"lm-eval reported no number for {target.result} {target.key}: {value!r}")
                    values[o.name] = float(value)
            if docs is not None:
                self._collect_docs(out["samples"], part or self.full_part(), docs)

        for o in self.objectives:
            t = time.perf_counter()
            if o.perplexity is not None:
                nll = self._nll(model, o.perplexity)
                values[o.name] = math.exp(nll)
                metrics.update({f"{o.name}/perplexity": values[o.name], f"{o.name}/nll": nll})
            elif o.custom is not None:
                out = self._customs[o.custom](model, self.tokenizer)
                if not isinstance(out, dict) or o.metric not in out:
                    keys = ", ".join(map(str, out)) if isinstance(out, dict) else type(out).__name__
                    raise RuntimeError(f"custom objective {o.custom} returned no {o.metric!r} (got {keys})")
                values[o.name] = float(out[o.metric])
                metrics.update({f"custom:{o.custom}/{k}": float(v) for k, v in out.items() if _is_number(v)})
            spent += time.perf_counter() - t
        return spent, counts

    def _collect_docs(self, logged: dict[str, list[dict]], part: Part, docs: Docs) -> None:
        """Append each objective's per-document scores of ``part`` (lm-eval's
        logged samples) to ``docs``, in document order."""
        for name, task in self.doc_tasks.items():
            if task not in part:
                continue
            metric, _, filt = self._task_objectives[name].key.partition(",")
            by_doc = {s["doc_id"]: float(s[metric]) for s in logged[task] if s.get("filter") == filt}
            lo, hi = part[task]
            docs[name].extend(by_doc[i] for i in self.order[task][lo:hi])

    def _hflm(self, model: torch.nn.Module):
        """lm-eval's wrapper around ``model``, built once per model object."""
        if self._lm is None or self._lm_model is not model:
            from lm_eval.models.huggingface import HFLM

            # HFLM warns, every time, that a model object skips its loading options.
            with _quiet_lm_eval(logging.ERROR):
                self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.spec.batch_size)
            self._lm_model = model
        return self._lm

    def perplexity_chunks(self, model: torch.nn.Module, perplexity: str) -> list[torch.Tensor]:
        """The token chunks the objective ``perplexity: <file>`` scores: consecutive
        pieces of ``min(model max positions, PERPLEXITY_MAX_LENGTH)`` tokens (the
        last may be shorter), the first ``samples`` of them, or up to
        ``PERPLEXITY_MAX_TOKENS`` tokens when ``samples`` is not set."""
        ids = self._texts[perplexity]
        limit = getattr(model.config, "max_position_embeddings", None) or PERPLEXITY_MAX_LENGTH
        length = min(limit, PERPLEXITY_MAX_LENGTH)
        count = self.spec.samples or max(1, PERPLEXITY_MAX_TOKENS // length)
        pieces = [ids[i : i + length] for i in range(0, len(ids), length)][:count]
        return [p for p in pieces if len(p) >= 2]

    @torch.inference_mode()
    def _nll(self, model: torch.nn.Module, perplexity: str) -> float:
        """Mean next-token negative log-likelihood over the file's chunks."""
        pieces = self.perplexity_chunks(model, perplexity)
        vocab = getattr(model.config, "vocab_size", None) or 2**17
        total = torch.zeros((), dtype=torch.float64)
        n_tokens = 0
        i = 0
        while i < len(pieces):
            # Equal-length chunks go through together; the logits (B, T, V) are
            # the largest tensor, so their size bounds the batch.
            length = len(pieces[i])
            rows = max(1, min(self.spec.batch_size, _LOGITS_BUDGET // (length * vocab)))
            batch = [pieces[i]]
            while len(batch) < rows and i + len(batch) < len(pieces) and len(pieces[i + len(batch)]) == length:
                batch.append(pieces[i + len(batch)])
            i += len(batch)
            x = torch.stack(batch).to(self.device)  # (B, T)
            logits = model(input_ids=x, use_cache=False).logits.float()  # (B, T, V)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.double().cpu()
            n_tokens += x.shape[0] * (length - 1)
        return float(total) / n_tokens


# -- helpers ---------------------------------------------------------------------


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


def _load_tokenizer(ref: str | Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(ref))
    except Exception as e:  # noqa: BLE001 - missing files, bad JSON, offline hub: one fix
        raise EvomergeError(
            f"cannot load a tokenizer from {str(ref)!r} ({type(e).__name__}: {_first_line(e)}); "
            "point it at a model folder that has tokenizer files"
        ) from None


def _import_callable(ref: str, root: Path) -> Callable:
    module_name, _, attr = ref.partition(":")
    # A module file next to the config is importable while we import it.
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way
        raise EvomergeError(
            f"cannot import custom objective module {module_name!r} ({type(e).__name__}: {_first_line(e)}); "
            f"install it or put {module_name.replace('.', '/')}.py in {root}"
        ) from None
    finally:
        if added:
            sys.path.remove(str(root))
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise EvomergeError(f"module {module_name!r} has no function {attr!r}; fix the custom objective {ref!r}")
    return fn


def _unknown_task(name: str, known: list[str], include: str | None) -> str:
    import difflib

    where = f"in {include} or among lm-eval's built-in tasks" if include else "among lm-eval's built-in tasks"
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown lm-eval task {name!r} {where}{hint}; fix the name or add the task's YAML to include_path"


def _declared_test_split(index: dict, name: str, depth: int = 0) -> tuple[str, str] | None:
    """(task, split) for the first task under ``name`` (a task, or a group or
    tag of them) whose YAML sets a test_split."""
    entry = index.get(name)
    if entry is None or depth > 8:
        return None
    cfg = entry.cfg if isinstance(entry.cfg, dict) else {}
    if entry.kind.name == "TASK":
        return (name, str(cfg["test_split"])) if cfg.get("test_split") else None
    children = {"GROUP": cfg.get("task"), "TAG": sorted(entry.tags)}.get(entry.kind.name)
    for child in children if isinstance(children, list) else []:
        found = _declared_test_split(index, child, depth + 1) if isinstance(child, str) else None
        if found:
            return found
    return None


def _test_split_refusal(task: str, split: str, via: str | None = None) -> str:
    what = f"task {task!r}" if via in (None, task) else f"{via!r} includes task {task!r}, which"
    return (
        f"{what} evaluates on its test split {split!r}, and searching against a test set overfits it; "
        "use a validation/dev split (validation_split, no test_split) or pass --allow-test-sets"
    )


def _reported_metrics(name: str, loaded: dict) -> dict[str, list[str]]:
    """Metric name -> filter names, as lm-eval will report them for ``name``."""

    def task_metrics(task) -> dict[str, list[str]]:
        filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
        return {m: filters for m in task.aggregation()}

    if name in loaded["tasks"]:
        return task_metrics(loaded["tasks"][name])
    group = loaded["groups"][name]
    leaves: dict[str, list[str]] = {}
    for task in group.get_all_tasks():
        for m, filters in task_metrics(task).items():
            leaves.setdefault(m, [])
            leaves[m] += [f for f in filters if f not in leaves[m]]
    return {a.metric: list(a.filter_list or leaves.get(a.metric, ["none"])) for a in group.aggregate_metric_list or []}


def _metric_key(o: ObjectiveSpec, available: dict[str, list[str]]) -> str:
    metric, _, filt = o.metric.partition(",")
    if metric not in available:
        reported = ", ".join(available) or "nothing (a group without aggregate_metric_list)"
        raise EvomergeError(
            f"task {o.task!r} does not report metric {metric!r}; it reports {reported}; set metric to one of those"
        )
    filters = available[metric]
    if filt and filt not in filters:
        raise EvomergeError(
            f"task {o.task!r} has no filter {filt!r} for metric {metric!r}; use one of "
            + ", ".join(f"{metric},{f}" for f in filters)
        )
    return f"{metric},{filt or filters[0]}"


def _all_finite(model: torch.nn.Module) -> bool:
    # A float64 sum of a float32/16 tensor cannot overflow, so it is finite
    # exactly when every element is; one reduction per tensor, no copies.
    sums = [p.detach().sum(dtype=torch.float64) for p in model.parameters() if p.is_floating_point()]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all())


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars included


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _without_bar(bar: Callable) -> Callable:
    # Not functools.partial: lm-eval passes disable=False itself, which would win.
    def make(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})

    return make


_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
    """Silence lm-eval's INFO logging and its progress bars (the search draws
    its own) for the duration; restore them afterwards. Not thread safe: it
    swaps module globals."""
    logger = logging.getLogger("lm_eval")
    old_level = logger.level
    logger.setLevel(max(level, old_level))
    bars = {}
    for name in _BAR_MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "tqdm"):
            bars[module] = module.tqdm
            module.tqdm = _without_bar(module.tqdm)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        for module, bar in bars.items():
            module.tqdm = bar
