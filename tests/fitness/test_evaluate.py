"""The Evaluator: lm-eval tasks, perplexity and custom objectives on a live
model; repeatable scores on a fixed document subset; weights rewritten in
place picked up without rebuilding anything; bad candidates recorded as
failed, bad configuration refused at construction."""

import json
import logging
import math
import random
import textwrap

import pytest
import torch
import transformers

from evomerge.app.demo.tiny import make_tiny_model
from evomerge.errors import EvomergeError
from evomerge.fitness.evaluate import Evaluator
from evomerge.fitness.score import Score
from evomerge.fitness.spec import EvalSpec, ObjectiveSpec

N_DOCS = 40
HELDOUT = "The quick brown fox jumps over the lazy dog. " * 30  # 1350 bytes: 5 full chunks of 256, and a tail


def _task_yaml(name: str, data: str, split: str, body: str) -> str:
    return textwrap.dedent(
        f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            {split}: {data}
        {split}_split: {split}
        doc_to_text: "{{{{q}}}}"
        """
    ) + textwrap.dedent(body)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("eval_model") / "tiny", arch="llama", layers=2, hidden=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A config folder: local lm-eval tasks, a held-out text and a custom objective module."""
    root = tmp_path_factory.mktemp("eval_config")
    rng = random.Random(0)
    data = root / "data.jsonl"
    with data.open("w") as f:
        for _ in range(N_DOCS):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            choices = [f" {a + b}", f" {a + b + 1}", f" {a * b + 3}"]
            rng.shuffle(choices)
            f.write(json.dumps({"q": f"{a} + {b} =", "choices": choices, "label": choices.index(f" {a + b}")}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    multiple_choice = """\
        output_type: multiple_choice
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """
    # data_files resolve against the working directory: absolute paths.
    (tasks / "demo_a.yaml").write_text(_task_yaml("demo_a", data, "validation", multiple_choice))
    (tasks / "demo_test.yaml").write_text(_task_yaml("demo_test", data, "test", multiple_choice))
    loglikelihood = """\
        output_type: loglikelihood
        doc_to_target: "{{choices[label]}}"
        metric_list:
          - metric: perplexity
            aggregation: perplexity
            higher_is_better: false
        """
    (tasks / "demo_ll.yaml").write_text(_task_yaml("demo_ll", data, "validation", loglikelihood))
    (root / "heldout.txt").write_text(HELDOUT)
    (root / "evomerge_test_objective.py").write_text(
        textwrap.dedent(
            """\
            def score(model, tokenizer):
                return {"score": float(model.lm_head.weight.abs().mean()), "vocab": float(len(tokenizer))}

            def nan(model, tokenizer):
                return {"score": float("nan")}
            """
        )
    )
    return root


@pytest.fixture
def model(tiny):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()


def _evaluator(tiny, root, objectives, **spec):
    spec = EvalSpec(objectives=[ObjectiveSpec(**o) for o in objectives], include_path="tasks", **spec)
    return Evaluator(spec, tokenizer=tiny, root=root)


@pytest.fixture
def counts(monkeypatch):
    """How many TaskManagers and HFLM wrappers get built, and the arguments of each."""
    import lm_eval.models.huggingface
    import lm_eval.tasks

    built = {"TaskManager": [], "HFLM": 0}
    tm_init = lm_eval.tasks.TaskManager.__init__
    hflm_init = lm_eval.models.huggingface.HFLM.__init__

    def count_tm(self, *args, **kwargs):
        built["TaskManager"].append(kwargs)
        tm_init(self, *args, **kwargs)

    def count_hflm(self, *args, **kwargs):
        built["HFLM"] += 1
        hflm_init(self, *args, **kwargs)

    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", count_tm)
    monkeypatch.setattr(lm_eval.models.huggingface.HFLM, "__init__", count_hflm)
    return built


# -- scoring --------------------------------------------------------------------


def test_repeated_scores_are_identical(tiny, root, model):
    # Few-shot prompts are drawn at random: repeats must draw the same ones.
    ev = _evaluator(
        tiny, root, [{"task": "demo_a", "metric": "acc"}, {"task": "demo_ll", "metric": "perplexity"}], num_fewshot=2
    )
    import lm_eval.api.task

    bar, level = lm_eval.api.task.tqdm, logging.getLogger("lm_eval").level
    first, second = ev.score(model), ev.score(model)
    assert (lm_eval.api.task.tqdm, logging.getLogger("lm_eval").level) == (bar, level)  # silenced only inside
    assert first.status == "ok", first.reason
    assert set(first.values) == {"demo_a/acc", "demo_ll/perplexity"}
    assert first.values == second.values
    assert first.metrics == second.metrics
    assert {"demo_a/acc", "demo_ll/perplexity"} <= set(first.metrics)
    assert 0 < first.eval_seconds <= first.seconds


def test_samples_are_a_fixed_seeded_subset(tiny, root, model, monkeypatch):
    from lm_eval import evaluator

    seen = []
    evaluate = evaluator.evaluate

    def spy(**kwargs):
        out = evaluate(**kwargs)
        task = kwargs["task_dict"]["tasks"]["demo_a"]
        seen.append((list(kwargs["samples"]["demo_a"]), len(task.instances)))
        return out

    monkeypatch.setattr(evaluator, "evaluate", spy)
    objectives = [{"task": "demo_a", "metric": "acc"}]
    ev = _evaluator(tiny, root, objectives, samples=7, seed=3)
    ev.score(model)
    ev.score(model)
    indices = seen[0][0]
    assert seen == [(indices, 7 * 3)] * 2  # the same 7 documents, three choices each
    assert indices == sorted(set(indices)) and all(0 <= i < N_DOCS for i in indices)
    assert ev.sample_indices == {"demo_a": indices}
    assert _evaluator(tiny, root, objectives, samples=7, seed=3).sample_indices["demo_a"] == indices
    assert _evaluator(tiny, root, objectives, samples=7, seed=4).sample_indices["demo_a"] != indices
    assert _evaluator(tiny, root, objectives, samples=N_DOCS).sample_indices == {}


def test_weights_changed_in_place_change_the_score_without_rebuilding(tiny, root, model, counts):
    ev = _evaluator(tiny, root, [{"task": "demo_ll", "metric": "perplexity"}], samples=10)
    before = ev.score(model).values["demo_ll/perplexity"]
    saved = model.model.embed_tokens.weight.clone()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(torch.randn(saved.shape, generator=torch.Generator().manual_seed(0)))
    changed = ev.score(model).values["demo_ll/perplexity"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(saved)
    restored = ev.score(model).values["demo_ll/perplexity"]
    assert math.isfinite(before) and changed != before
    assert restored == before
    assert counts["HFLM"] == 1
    # Every task is in include_path: lm-eval's built-in task index is never built.
    assert [kw.get("include_defaults") for kw in counts["TaskManager"]] == [False]
    # Another model object gets its own wrapper.
    ev.score(transformers.AutoModelForCausalLM.from_pretrained(tiny))
    assert counts["HFLM"] == 2


def test_non_finite_weights_fail_without_evaluating(tiny, root, model):
    ev = _evaluator(tiny, root, [{"task": "demo_a", "metric": "acc"}, {"perplexity": "heldout.txt"}])
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    score = ev.score(model)
    assert (score.status, score.reason) == ("failed", "non-finite weights")
    assert score.non_finite  # cached by the search like a success
    assert score.eval_seconds == 0
    assert list(score.values) == ["demo_a/acc", "perplexity:heldout.txt"]
    assert all(math.isnan(v) for v in score.values.values())
    with pytest.raises(ValueError, match="failed"):
        score.fitness(ev.objectives)


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError("boom in forward"), "RuntimeError: boom in forward"),
        (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore"),
            "out of memory: CUDA out of memory.",
        ),
    ],
)
def test_an_exception_during_evaluation_is_a_failed_score(tiny, root, model, error, reason):
    ev = _evaluator(tiny, root, [{"task": "demo_a", "metric": "acc"}], samples=4)

    def explode(*_):
        raise error

    handle = model.model.layers[0].register_forward_hook(explode)
    try:
        score = ev.score(model)
    finally:
        handle.remove()
    assert score.status == "failed"
    assert score.reason.startswith(reason)
    assert "\n" not in score.reason
    assert ev.score(model).status == "ok"  # the evaluator still works afterwards


def test_non_finite_metric_fails(tiny, root, model):
    ev = _evaluator(tiny, root, [{"custom": "evomerge_test_objective:nan", "metric": "score"}])
    score = ev.score(model)
    assert (score.status, score.reason) == ("failed", "non-finite metric custom:evomerge_test_objective:nan/score")
    assert score.non_finite


def test_perplexity_is_exp_of_the_mean_token_nll_over_fixed_chunks(tiny, root, model):
    ev = _evaluator(tiny, root, [{"perplexity": "heldout.txt"}])
    score = ev.score(model)
    assert score.status == "ok", score.reason
    ppl = score.values["perplexity:heldout.txt"]
    assert math.isfinite(ppl) and ppl > 1
    chunks = ev.perplexity_chunks(model, "heldout.txt")
    ids = ev.tokenizer(HELDOUT, add_special_tokens=False)["input_ids"]
    assert [len(c) for c in chunks] == [256] * 5 + [len(ids) - 5 * 256]  # the tiny model's 256 positions
    assert torch.equal(torch.cat(chunks), torch.tensor(ids))
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            logits = model(c[None]).logits[0]
            nll += torch.nn.functional.cross_entropy(logits[:-1], c[1:], reduction="sum").item()
            n += len(c) - 1
    assert ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert score.metrics["perplexity:heldout.txt/nll"] == pytest.approx(nll / n, rel=1e-5)

    # `samples` caps the chunks; zeroed embeddings make every next token equally likely.
    ev2 = _evaluator(tiny, root, [{"perplexity": "heldout.txt"}], samples=2)
    assert len(ev2.perplexity_chunks(model, "heldout.txt")) == 2
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0)
        model.lm_head.weight.mul_(0)
    assert ev2.score(model).values["perplexity:heldout.txt"] == pytest.approx(model.config.vocab_size, rel=1e-4)


def test_custom_objective(tiny, root, model):
    ev = _evaluator(tiny, root, [{"custom": "evomerge_test_objective:score", "metric": "score", "weight": 2.0}])
    score = ev.score(model)
    expected = float(model.lm_head.weight.abs().mean())
    assert score.values == {"custom:evomerge_test_objective:score/score": expected}
    assert score.metrics["custom:evomerge_test_objective:score/vocab"] == len(ev.tokenizer)
    assert score.fitness(ev.objectives) == 2.0 * expected


def test_fitness_is_higher_is_better():
    up = ObjectiveSpec(task="demo_a", metric="acc", weight=2.0)
    down = ObjectiveSpec(perplexity="heldout.txt", weight=0.5)
    score = Score(values={"demo_a/acc": 0.25, "perplexity:heldout.txt": 10.0}, metrics={})
    assert score.fitness([up, down]) == 2.0 * 0.25 - 0.5 * 10.0
    assert ObjectiveSpec(task="demo_ll", metric="perplexity", direction="minimize").direction == "minimize"


# -- configuration ------------------------------------------------------------------


def test_objective_specs():
    assert ObjectiveSpec(task="demo_a", metric="exact_match,strict-match").name == "demo_a/exact_match,strict-match"
    ppl = ObjectiveSpec(perplexity="heldout.txt")
    assert (ppl.name, ppl.metric, ppl.direction) == ("perplexity:heldout.txt", "perplexity", "minimize")
    assert ObjectiveSpec(custom="pkg.mod:fn", metric="score").name == "custom:pkg.mod:fn/score"
    for bad, match in [
        ({}, "exactly one"),
        ({"task": "demo_a", "perplexity": "x.txt", "metric": "acc"}, "exactly one"),
        ({"task": "demo_a"}, "metric: acc"),
        ({"custom": "pkg.mod:fn"}, "metric"),
        ({"custom": "pkg.mod.fn", "metric": "score"}, "module:function"),
        ({"perplexity": "x.txt", "metric": "acc"}, "metric: perplexity"),
    ]:
        with pytest.raises(EvomergeError, match=match):
            ObjectiveSpec(**bad)
    with pytest.raises(EvomergeError, match="listed twice"):
        EvalSpec(objectives=[ppl, ppl])
    with pytest.raises(EvomergeError, match="no objectives"):
        EvalSpec(objectives=[])
    with pytest.raises(EvomergeError, match="samples"):
        EvalSpec.from_dict({"objectives": [{"perplexity": "x.txt"}], "samples": 0})
    with pytest.raises(EvomergeError, match="eval: limit"):
        EvalSpec.from_dict({"objectives": [{"perplexity": "x.txt"}], "limit": 5})


def test_unknown_task_is_refused_at_construction(tiny, root, monkeypatch):
    import lm_eval.tasks

    # Stand in for lm-eval's built-in tasks (indexing the real ones takes seconds).
    asked = []
    init = lm_eval.tasks.TaskManager.__init__

    def without_builtins(self, **kwargs):
        asked.append(kwargs["include_defaults"])
        init(self, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(lm_eval.tasks.TaskManager, "__init__", without_builtins)
    with pytest.raises(EvomergeError, match=r"unknown lm-eval task 'demo_aa'.*did you mean demo_a.*include_path"):
        _evaluator(tiny, root, [{"task": "demo_aa", "metric": "acc"}])
    assert asked == [False, True]  # include_path first, then the built-in tasks too


def test_unknown_metric_is_refused_at_construction(tiny, root):
    with pytest.raises(EvomergeError, match="does not report metric 'f1'; it reports acc"):
        _evaluator(tiny, root, [{"task": "demo_a", "metric": "f1"}])
    with pytest.raises(EvomergeError, match="no filter 'strict-match'.*acc,none"):
        _evaluator(tiny, root, [{"task": "demo_a", "metric": "acc,strict-match"}])
    _evaluator(tiny, root, [{"task": "demo_a", "metric": "acc,none"}])


def test_test_splits_are_refused_unless_allowed(tiny, root, monkeypatch):
    import lm_eval.tasks

    import evomerge.fitness.lm_eval_tasks

    objectives = [{"task": "demo_test", "metric": "acc"}]
    load = lm_eval.tasks.TaskManager.load
    loaded = []
    monkeypatch.setattr(
        lm_eval.tasks.TaskManager, "load", lambda self, names: loaded.append(names) or load(self, names)
    )
    with pytest.raises(EvomergeError, match="test split 'test'.*--allow-test-sets"):
        _evaluator(tiny, root, objectives)
    assert loaded == []  # refused from the YAML, before its dataset is loaded
    # Where the YAML does not tell (Python tasks, inline configs), the loaded task does.
    monkeypatch.setattr(evomerge.fitness.lm_eval_tasks, "_declared_test_split", lambda *_: None)
    with pytest.raises(EvomergeError, match="test split 'test'.*--allow-test-sets"):
        _evaluator(tiny, root, objectives)
    spec = EvalSpec(objectives=[ObjectiveSpec(**objectives[0])], include_path="tasks")
    Evaluator(spec, tokenizer=tiny, root=root, allow_test_sets=True)


def test_paths_and_callables_are_checked_at_construction(tiny, root, tmp_path):
    with pytest.raises(EvomergeError, match="missing.txt.*not found"):
        _evaluator(tiny, root, [{"perplexity": "missing.txt"}])
    with pytest.raises(EvomergeError, match="include_path 'nowhere' not found"):
        Evaluator(EvalSpec(objectives=[ObjectiveSpec(task="demo_a", metric="acc")], include_path="nowhere"), tiny, root)
    outside = tmp_path / "outside.txt"
    outside.write_text(HELDOUT)
    spec = EvalSpec(objectives=[ObjectiveSpec(perplexity=str(outside))])
    with pytest.raises(EvomergeError, match="outside the config's folder.*--allow-outside-paths"):
        Evaluator(spec, tokenizer=tiny, root=root)
    Evaluator(spec, tokenizer=tiny, root=root, allow_outside_paths=True)
    with pytest.raises(EvomergeError, match="cannot import custom objective module 'no_such_module'"):
        _evaluator(tiny, root, [{"custom": "no_such_module:fn", "metric": "score"}])
    with pytest.raises(EvomergeError, match="has no function 'missing'"):
        _evaluator(tiny, root, [{"custom": "evomerge_test_objective:missing", "metric": "score"}])
    with pytest.raises(EvomergeError, match="cannot load a tokenizer"):
        Evaluator(EvalSpec(objectives=[ObjectiveSpec(perplexity="heldout.txt")]), tokenizer=tmp_path, root=root)


def test_a_choice_task_can_be_scored_by_brier_score(tiny, tmp_path):
    # write_choice_task's extra metrics reach the objectives: the Brier score of
    # the softmax over each doc's choice log-likelihoods, computed here by hand.
    from evomerge.fitness.evaluate import write_choice_task

    docs = [
        {"q": f"{a} + {b} =", "choices": [f"{a + b}", f"{a + b + 1}", f"{a}"], "label": 0}
        for a, b in ((1, 2), (3, 4), (5, 1), (2, 2))
    ]
    write_choice_task(tmp_path / "tasks", "sums_b", docs, metrics=("acc", "brier_score"))
    spec = EvalSpec(
        objectives=[
            ObjectiveSpec(task="sums_b", metric="brier_score", direction="minimize"),
            ObjectiveSpec(task="sums_b", metric="acc"),
        ],
        include_path="tasks",
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny).eval()
    score = Evaluator(spec, tokenizer=tiny, root=tmp_path).score(model)
    assert score.status == "ok", score.reason

    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    brier, acc = [], []
    for d in docs:
        ctx = tok(d["q"], add_special_tokens=False).input_ids
        lls = []
        for c in d["choices"]:
            cont = tok(" " + c, add_special_tokens=False).input_ids
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lls.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        p = torch.softmax(torch.tensor(lls), 0)
        brier.append(float(((p - torch.eye(len(lls))[d["label"]]) ** 2).sum()))
        acc.append(float(max(range(len(lls)), key=lls.__getitem__) == d["label"]))
    values = list(score.values.values())
    assert values[0] == pytest.approx(sum(brier) / len(brier), rel=1e-4)
    assert values[1] == sum(acc) / len(acc)
