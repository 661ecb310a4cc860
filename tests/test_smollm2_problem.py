"""The SmolLM2 experiment's data: French numbers, and no leak between splits
or from training into evaluation (no model is built here)."""

import importlib.util
import itertools
from pathlib import Path

import pytest

PROBLEM = Path(__file__).resolve().parents[1] / "experiments" / "smollm2_skills" / "problem.py"


@pytest.fixture(scope="module")
def problem():
    spec = importlib.util.spec_from_file_location("smollm2_problem", PROBLEM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zéro"),
        (16, "seize"),
        (17, "dix-sept"),
        (21, "vingt et un"),
        (22, "vingt-deux"),
        (70, "soixante-dix"),
        (71, "soixante et onze"),
        (79, "soixante-dix-neuf"),
        (80, "quatre-vingts"),
        (81, "quatre-vingt-un"),
        (91, "quatre-vingt-onze"),
        (99, "quatre-vingt-dix-neuf"),
    ],
)
def test_french_numbers(problem, n, words):
    assert problem.french(n) == words


def test_french_numbers_are_distinct(problem):
    assert len({problem.french(n) for n in range(100)}) == 100


def test_splits_are_disjoint_and_well_formed(problem):
    items = problem.eval_items()
    for task, (dev, test) in problem.DOCS.items():
        assert (len(items[task]["dev"]), len(items[task]["test"])) == (dev, test)
    pairs = {
        (task, split): {(d["a"], d["b"]) for d in items[task][split]}
        for task in ("fr_math", "math")
        for split in ("dev", "test")
    }
    for a, b in itertools.combinations(pairs, 2):
        assert not pairs[a] & pairs[b], (a, b)
    numbers = [{d["n"] for d in items["french"][s]} for s in ("dev", "test")]
    assert not numbers[0] & numbers[1]
    for splits in items.values():
        for doc in splits["dev"] + splits["test"]:
            assert len(set(doc["choices"])) == 4
            right = doc.get("a", 0) + doc.get("b", 0) if "a" in doc else doc["n"]
            assert doc["choices"][doc["label"]] == str(right)
    # the target's operands are words, the math task's digits
    assert "+" in items["fr_math"]["dev"][0]["q"] and not any(c.isdigit() for c in items["fr_math"]["dev"][0]["q"])
    assert any(c.isdigit() for c in items["math"]["dev"][0]["q"])


def test_training_never_sees_an_evaluation_item(problem):
    items = problem.eval_items()
    used = {(d["a"], d["b"]) for t in ("fr_math", "math") for s in items[t].values() for d in s}
    math_prompts = {p for batch in problem._math_batches(50, 16, used) for p, _ in batch}
    eval_prompts = {d["q"] for s in items.values() for docs in s.values() for d in docs}
    assert math_prompts and not math_prompts & eval_prompts
    french_prompts = [p for batch in problem._french_batches(50, 16) for p, _ in batch]
    # the French expert never sees the "X = ?" form the French task and the target use
    assert not any(p.endswith("= ?\nA:") for p in french_prompts)
    assert not set(french_prompts) & eval_prompts
