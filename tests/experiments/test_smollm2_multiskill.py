"""The multi-skill SmolLM2 problem's data (issue 19): French numbers to 999,
disjoint dev/select/held-out splits, and no evaluation document in training
(no model is built here)."""

import importlib.util
import itertools
from pathlib import Path

import pytest

PROBLEM = Path(__file__).resolve().parents[2] / "experiments" / "smollm2_multiskill" / "problem.py"


@pytest.fixture(scope="module")
def problem():
    spec = importlib.util.spec_from_file_location("smollm2_multiskill_problem", PROBLEM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def items(problem):
    return problem.eval_items()


@pytest.mark.parametrize(
    "n, words",
    [
        (21, "vingt et un"),
        (100, "cent"),
        (101, "cent un"),
        (200, "deux cents"),
        (321, "trois cent vingt et un"),
        (580, "cinq cent quatre-vingts"),
        (999, "neuf cent quatre-vingt-dix-neuf"),
    ],
)
def test_french_numbers_to_999(problem, n, words):
    assert problem.french(n) == words


def test_french_words_are_unique(problem):
    assert len({problem.french(n) for n in range(1000)}) == 1000


def _key(skill, doc):
    return {"math": lambda d: (d["a"], d["b"]), "french": lambda d: d["n"], "rev": lambda d: d["s"]}[skill](doc)


def test_splits_are_disjoint_and_large_enough(problem, items):
    assert set(items) == set(problem.SKILLS)
    for skill, splits in items.items():
        assert {k: len(v) for k, v in splits.items()} == problem.DOCS
        assert len(splits["heldout"]) >= 400  # a 3-point difference is measurable
        for a, b in itertools.combinations(splits, 2):
            assert not {_key(skill, d) for d in splits[a]} & {_key(skill, d) for d in splits[b]}, (skill, a, b)
        for doc in itertools.chain(*splits.values()):
            assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
    for doc in itertools.chain(*items["rev"].values()):
        right = doc["choices"][doc["label"]]
        assert right == doc["s"][::-1] and all(sorted(c) == sorted(doc["s"]) for c in doc["choices"])
    for doc in itertools.chain(*items["french"].values()):
        assert doc["choices"][doc["label"]] == str(doc["n"])
    assert problem.eval_items() == items  # seeded


def test_no_training_example_is_an_evaluation_document(problem, items):
    prompts = {d["q"] for splits in items.values() for docs in splits.values() for d in docs}
    for skill in problem.SKILLS:
        pairs = [p for batch in problem.training_batches(skill, 60, 16, items) for p in batch]
        assert len(pairs) == 960
        assert not {q for q, _ in pairs} & prompts, skill
    math_eval = {(d["a"], d["b"]) for docs in items["math"].values() for d in docs}
    math_train = {
        tuple(int(x) for x in q.split("Q: ")[1].split(" = ")[0].split(" + ")) for q, _ in _pairs(problem, "math")
    }
    assert not math_train & math_eval
    rev_eval = {d["s"] for docs in items["rev"].values() for d in docs}
    assert not {a[::-1] for _, a in _pairs(problem, "rev")} & rev_eval


def _pairs(problem, skill):
    return [p for batch in problem.training_batches(skill, 60, 16) for p in batch]


def test_tasks_load_through_the_evaluator(problem, items, tmp_path):
    from evomerge.app.demo.tiny import make_tiny_model, make_tokenizer
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.spec import EvalSpec

    names = problem.write_tasks(tmp_path / "tasks", items)
    model_dir = make_tiny_model(tmp_path / "tiny", seed=0)
    make_tokenizer().save_pretrained(model_dir)
    spec = EvalSpec(
        include_path="tasks",
        samples=8,
        objectives=[{"task": names[s]["select"], "metric": "acc"} for s in problem.SKILLS],
    )
    ev = Evaluator(spec, model_dir, root=tmp_path)
    assert ev.per_doc

    import transformers

    score = ev.score(transformers.AutoModelForCausalLM.from_pretrained(model_dir))
    assert score.ok and all(0 <= v <= 1 for v in score.values.values())


RUN_PY = PROBLEM.parent / "run.py"


@pytest.fixture(scope="module")
def run_py():
    spec = importlib.util.spec_from_file_location("smollm2_multiskill_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_searches_share_documents_and_a_budget(run_py, tmp_path, monkeypatch):
    """Every search optimises the same dev subset, never a selection or
    held-out document; the mergekit-evolve-style search gets the race's
    documents as search documents, so that all spend the same."""
    from evomerge.fitness.race import cost
    from evomerge.run.config import load_config

    monkeypatch.setattr(run_py, "WORK", tmp_path)
    configs = {name: load_config(run_py.write_config(name))[0] for name in run_py.SEARCHES}
    sizes = {run_py.problem.task_name(s, "select"): run_py.problem.DOCS["select"] for s in run_py.SKILLS}
    assert run_py.RACE_DOCUMENTS == cost(16, sizes)
    assert {"ps_cma_min", "ps_cma_min_fidelity"} <= set(configs)  # issue 31's, fixed before they ran
    for name, cfg in configs.items():
        select, keep = run_py.SEARCHES[name].select, run_py.SEARCHES[name].keep
        assert [o.task for o in cfg.eval.objectives] == [f"multi_{s}_dev" for s in run_py.SKILLS]
        assert [o.task for o in cfg.heldout.objectives] == [f"multi_{s}_heldout" for s in run_py.SKILLS]
        if keep:  # fitness: the worst share of the best source's accuracy kept, on dev and held-out
            assert cfg.fitness.aggregate == "min"
            for o in [*cfg.eval.objectives, *cfg.heldout.objectives]:
                assert o.normalize == "expert" and o.weight == 1
        else:
            assert abs(sum(o.weight for o in cfg.eval.objectives) - 1) < 1e-9  # fitness: the mean accuracy
            assert cfg.fitness.aggregate == "sum" and all(o.normalize is None for o in cfg.eval.objectives)
        assert cfg.fidelity.enabled == run_py.SEARCHES[name].fidelity
        assert cfg.eval.samples == run_py.DEV_SAMPLES
        spent = cfg.budget.documents + (run_py.RACE_DOCUMENTS if select else 0)
        assert spent == run_py.DOCUMENTS + run_py.RACE_DOCUMENTS
        assert (cfg.select is not None) == select == cfg.early_stop.enabled
        if select:
            assert [o.task for o in cfg.select.objectives] == [f"multi_{s}_select" for s in run_py.SKILLS]
            assert cfg.select.top + len(run_py.SKILLS) + 1 + 4 == 16  # top 8, 4 sources, 4 default merges
