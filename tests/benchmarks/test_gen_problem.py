"""The generation benchmark problem (benchmarks/gen_problem.py): its splits,
no leak from training into evaluation, training text that matches what the
tasks score, and its generate_until tasks scored through the Evaluator on a
random tiny model (the trained models are not built here)."""

import importlib.util
from pathlib import Path

import pytest

PROBLEM = Path(__file__).resolve().parents[2] / "benchmarks" / "gen_problem.py"


@pytest.fixture(scope="module")
def problem():
    spec = importlib.util.spec_from_file_location("gen_problem", PROBLEM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _input(doc: dict) -> str:
    return doc["prompt"].split(" ")[1]


def test_splits_have_their_sizes_are_disjoint_and_seeded(problem):
    assert (problem.DEV_DOCS, problem.HELDOUT_DOCS) == (300, 400)
    for skill in problem.SKILLS:
        items = problem.eval_items(skill)
        dev, held = [_input(d) for d in items["dev"]], [_input(d) for d in items["heldout"]]
        assert (len(dev), len(held)) == (300, 400)
        assert len(set(dev) | set(held)) == 700  # no repeats within or across splits
        for doc in items["dev"] + items["heldout"]:
            s = _input(doc)
            assert doc["prompt"] == problem.prompt(skill, s)
            assert doc["answer"] == problem.answer(skill, s) != s
        assert problem.eval_items(skill) == items


def test_answers(problem):
    assert problem.answer("swp", "abcde") == "badce"
    assert problem.answer("swp", "abcdef") == "badcfe"
    assert problem.answer("mir", "azmn") == "zanm"
    assert problem.prompt("swp", "abc") == "swp abc = "


def test_no_training_input_is_evaluated(problem):
    items = {s: problem.eval_items(s) for s in problem.SKILLS}
    evaluated = {_input(d) for splits in items.values() for docs in splits.values() for d in docs}
    exclude = problem.excluded_inputs(items)
    assert evaluated <= exclude
    trained: set[str] = set()
    for batches in problem.training_batches(exclude).values():
        trained |= {p.split(" ")[1] for batch in batches for p, _ in batch}
    assert not trained & evaluated
    # Without the exclusion the same draws would have hit evaluated strings.
    unfiltered = {p.split(" ")[1] for batch in problem.training_batches(set())["base"] for p, _ in batch}
    assert unfiltered & evaluated


def test_training_text_is_the_prompt_then_the_answer(problem):
    # train_answers encodes prompt and " " + answer; the tasks prompt with the
    # prompt (ending in the space) and expect the answer, then the stop.
    from evomerge.app.demo.tiny import make_tokenizer

    tok = make_tokenizer()
    batches = problem.training_batches(set())
    for name, skill in zip(("expert_a", "expert_b"), problem.SKILLS):
        for p, a in next(batches[name])[:8]:
            s = p.split(" ")[1]
            assert a == problem.answer(skill, s) + problem.STOP
            trained = tok(p)["input_ids"] + tok(" " + a)["input_ids"]
            assert trained == tok(problem.prompt(skill, s) + a)["input_ids"]


def test_tasks_score_exact_match_of_the_generation_through_the_evaluator(problem, tmp_path):
    import torch
    import transformers

    from evomerge.app.demo.tiny import make_tiny_model
    from evomerge.fitness.evaluate import Evaluator
    from evomerge.fitness.spec import EvalSpec

    folder = make_tiny_model(tmp_path / "model", layers=2, hidden=32, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    docs = problem.eval_items(problem.SKILLS[0])["dev"][:12]

    def greedy(text: str) -> str:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=problem.MAX_GEN_TOKS, do_sample=False, pad_token_id=0)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split(problem.STOP)[0]

    # The model's own greedy continuations of the prompts, as answers, score
    # 1: the tasks compare exactly what follows the prompt, up to the stop.
    own = [{"prompt": d["prompt"], "answer": greedy(d["prompt"])} for d in docs]
    problem.write_gen_task(tmp_path / "tasks", "gen_true", docs)
    problem.write_gen_task(tmp_path / "tasks", "gen_own", own)
    objectives = [{"task": t, "metric": "exact_match"} for t in ("gen_true", "gen_own")]
    spec = EvalSpec(include_path="tasks", objectives=objectives, batch_size=8)
    score = Evaluator(spec, tokenizer=str(folder), root=tmp_path).score(model)
    assert score.ok, score.reason
    assert 0.0 <= score.values["gen_true/exact_match"] <= 1.0
    assert score.values["gen_own/exact_match"] == 1.0


def test_task_names_are_apart_from_the_demo(problem, tmp_path):
    assets = problem._assets(tmp_path)
    names = assets.dev_tasks + assets.heldout_tasks
    assert len(set(names)) == 4 and all(n.startswith("gen_") for n in names)
