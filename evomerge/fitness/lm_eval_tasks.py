"""The lm-eval half of scoring: an eval spec's tasks loaded once, their
documents chosen (seeded, never the test split unless asked), and a live
model scored on them through lm-eval's ``HFLM``; lm-eval kept quiet."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import EvomergeError, first_line
from evomerge.fitness.paired import Docs
from evomerge.fitness.score import is_number
from evomerge.fitness.spec import EvalSpec, ObjectiveSpec

Part = dict[str, tuple[int, int]]  # task -> (first, end) positions in its document order
Picks = dict[str, Sequence[int]]  # task -> the positions in its document order to score, in this order


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


class LmEvalTasks:
    """The lm-eval tasks of an eval spec: loaded and checked once, their
    documents chosen and put in a seeded scoring order, and scored on a live
    model through lm-eval's ``HFLM``.

    ``include``: the resolved ``include_path`` folder (None: built-in tasks
    only); ``exclude``: per task, documents another spec scores (selection
    documents never overlap the dev ones).
    """

    def __init__(
        self,
        spec: EvalSpec,
        include: str | None,
        allow_test_sets: bool,
        exclude: dict[str, Sequence[int]],
    ):
        self.spec = spec
        self.objectives = [o for o in spec.objectives if o.task]
        self.task_objectives: dict[str, _TaskObjective] = {}
        # The fixed documents each task is scored on; a task absent here uses all.
        self.sample_indices: dict[str, list[int]] = {}
        # Every task's scored documents in scoring order (seeded): a step of
        # early stopping, or a round of the selection race, scores the next ones.
        self.order: dict[str, list[int]] = {}
        # Objectives with per-document scores -> their task.
        self.doc_tasks: dict[str, str] = {}
        self._lm = None
        self._lm_model = None
        names = list(dict.fromkeys(o.task for o in self.objectives))
        loaded = _load(names, include, allow_test_sets)
        for task_name, task in loaded["tasks"].items():
            if task.has_test_docs() and not allow_test_sets:
                raise EvomergeError(_test_split_refusal(task_name, getattr(task.config, "test_split", None) or "test"))
            # As lm-eval's simple_evaluate: a task configured for 0 shots keeps 0; unset means 0.
            if spec.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=spec.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            self.choose_docs(task_name, len(task.eval_docs), exclude.get(task_name))
        self._bind_objectives(loaded)
        self.task_dict = loaded

    def _bind_objectives(self, loaded: dict) -> None:
        """Each objective's result key, and its task when it has per-document scores."""
        from lm_eval.api.metrics import mean

        for o in self.objectives:
            available = _reported_metrics(o.task, loaded)
            self.task_objectives[o.name] = _TaskObjective(o.task, _metric_key(o, available))
            task = loaded["tasks"].get(o.task)  # None for a group: no per-document scores
            if task is not None and task.aggregation().get(o.metric.partition(",")[0]) is mean:
                self.doc_tasks[o.name] = o.task

    def choose_docs(self, task_name: str, n_docs: int, excluded: Sequence[int] | None) -> None:
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

    def evaluate(self, lm, values: dict, metrics: dict, picks: Picks | None, docs: Docs | None) -> tuple[float, dict]:
        """Score the tasks' documents of ``picks`` (default: all) with ``lm``
        into ``values`` and ``metrics`` (and ``docs``, per document in the
        order of ``picks``, when given); return the seconds spent and the
        documents scored per task."""
        from lm_eval import evaluator

        task_dict, samples = self.task_dict, self.sample_indices
        if picks is not None:
            task_dict = {"tasks": {t: self.task_dict["tasks"][t] for t in picks}, "groups": {}, "group_map": {}}
            samples = {t: sorted(self.order[t][i] for i in positions) for t, positions in picks.items()}
        for task in task_dict["tasks"].values():
            # The few-shot sampler's generator advances as it draws; reseeding
            # gives every candidate the same prompts.
            task.set_fewshot_seed(seed=self.spec.seed)
        t = time.perf_counter()
        out = evaluator.evaluate(
            lm=lm,
            task_dict=task_dict,
            samples={k: _Indices(v) for k, v in samples.items()} or None,
            bootstrap_iters=0,
            log_samples=docs is not None,
        )
        spent = time.perf_counter() - t
        counts = {t: len(samples[t]) if t in samples else len(self.order[t]) for t in task_dict["tasks"]}
        results = out["results"]
        for name, row in results.items():
            for key, value in row.items():
                if "," in key and is_number(value):
                    metrics[f"{name}/{key.removesuffix(',none')}"] = float(value)
        for o in self.objectives:
            if o.task in results:
                target = self.task_objectives[o.name]
                value = results.get(target.result, {}).get(target.key)
                if not is_number(value):
                    raise RuntimeError(f"lm-eval reported no number for {target.result} {target.key}: {value!r}")
                values[o.name] = float(value)
        if docs is not None:
            whole = picks or {task: range(len(order)) for task, order in self.order.items()}
            self.collect_docs(out["samples"], whole, docs)
        return spent, counts

    def collect_docs(self, logged: dict[str, list[dict]], picks: Picks, docs: Docs) -> None:
        """Append each objective's per-document scores of ``picks`` (lm-eval's
        logged samples) to ``docs``, in the order of ``picks``."""
        for name, task in self.doc_tasks.items():
            if task not in picks:
                continue
            metric, _, filt = self.task_objectives[name].key.partition(",")
            by_doc = {s["doc_id"]: float(s[metric]) for s in logged[task] if s.get("filter") == filt}
            order = self.order[task]
            docs[name].extend(by_doc[order[i]] for i in picks[task])

    def hflm(self, model: torch.nn.Module, tokenizer):
        """lm-eval's wrapper around ``model``, built once per model object."""
        if self._lm is None or self._lm_model is not model:
            from lm_eval.models.huggingface import HFLM

            # HFLM warns, every time, that a model object skips its loading options.
            with quiet_lm_eval(logging.ERROR):
                self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.spec.batch_size)
            self._lm_model = model
        return self._lm


def _load(names: list[str], include: str | None, allow_test_sets: bool) -> dict:
    """lm-eval's tasks (and groups) called ``names``, refused with one line
    when unknown, a tag, failing to load, or (from their YAML already, before
    a dataset is read) evaluating on a test split."""
    # Imported now, not in the first score(): its time, and its progress
    # bars (silenced only in modules already imported), belong here.
    import datasets
    import lm_eval.evaluator  # noqa: F401
    import lm_eval.models.huggingface  # noqa: F401
    from lm_eval.tasks import TaskManager

    # Loading a task's documents draws a progress bar per split; the
    # search shows its own, and errors must stay one line.
    datasets.disable_progress_bars()
    # Indexing lm-eval's built-in tasks takes seconds; an include_path alone, milliseconds.
    manager = TaskManager(include_path=include, include_defaults=include is None)
    if include and any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include, include_defaults=True)
    for name in names:
        if name not in manager.all_tasks:
            raise EvomergeError(_unknown_task(name, manager.all_tasks, include))
    for name in names if not allow_test_sets else ():
        found = _declared_test_split(manager.task_index, name)
        if found:
            raise EvomergeError(_test_split_refusal(*found, via=name))
    loaded: dict[str, dict] = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        try:
            part = manager.load([name])
        except Exception as e:  # noqa: BLE001 - lm-eval raises many types; one fix for all
            raise EvomergeError(
                f"cannot load lm-eval task {name!r} ({type(e).__name__}: {first_line(e)}); "
                "check its YAML and that its dataset is available locally (offline)"
            ) from None
        for k in loaded:
            loaded[k].update(part.get(k) or {})
        if name not in part["tasks"] and name not in part.get("groups", {}):
            raise EvomergeError(
                f"{name!r} is an lm-eval tag (a set of tasks), which reports no score of its own; "
                "list its tasks as separate objectives"
            )
    return loaded


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


def _without_bar(bar: Callable) -> Callable:
    # Not functools.partial: lm-eval passes disable=False itself, which would win.
    def make(*args, **kwargs):
        return bar(*args, **{**kwargs, "disable": True})

    return make


_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.WARNING) -> Iterator[None]:
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


__all__ = ["LmEvalTasks", "Part", "Picks", "quiet_lm_eval"]
