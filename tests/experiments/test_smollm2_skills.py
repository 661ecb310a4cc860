"""The SmolLM2 experiment's data: French numbers, and no leak between splits
or from training into evaluation (no SmolLM2 model is built here), and the
experts' build cache on a tiny model."""

import importlib.util
import itertools
import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

PROBLEM = Path(__file__).resolve().parents[2] / "experiments" / "smollm2_skills" / "problem.py"


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


def test_an_expert_is_trained_again_only_when_missing_or_its_settings_change(problem, tmp_path):
    """``fine_tune_experts`` (both SmolLM2 problems build with it) on a tiny
    model: a second call trains nothing; changing one expert's settings, or
    losing its weights, retrains that expert alone."""
    import transformers

    from evomerge.app.demo.tiny import make_tokenizer, tiny_config

    loads = []

    def load():
        loads.append(1)
        return transformers.AutoModelForCausalLM.from_config(tiny_config(layers=1, hidden=32)), make_tokenizer()

    def batches(skill, steps, batch):
        return ([(f"{skill} {i}", str(i))] * batch for i in range(steps))

    finetune = {"a": dict(steps=2, lr=1e-3, batch=2), "b": dict(steps=2, lr=1e-3, batch=2)}
    built = problem.fine_tune_experts(tmp_path, finetune, batches, 1, progress=False, load=load)
    weights = {s: tmp_path / "models" / f"expert_{s}" / "model.safetensors" for s in finetune}
    assert len(loads) == 2 and all(w.is_file() for w in weights.values())
    assert (tmp_path / "models" / "base" / "model.safetensors").is_file()
    assert built["experts"]["a"]["settings"] == finetune["a"]
    stamps = {s: w.stat().st_mtime_ns for s, w in weights.items()}

    assert problem.fine_tune_experts(tmp_path, finetune, batches, 1, progress=False, load=load) == built
    assert len(loads) == 2

    changed = {**finetune, "b": dict(steps=3, lr=1e-3, batch=2)}
    built = problem.fine_tune_experts(tmp_path, changed, batches, 1, progress=False, load=load)
    assert len(loads) == 3 and built["experts"]["b"]["settings"]["steps"] == 3
    assert weights["a"].stat().st_mtime_ns == stamps["a"] and weights["b"].stat().st_mtime_ns != stamps["b"]

    weights["a"].unlink()
    problem.fine_tune_experts(tmp_path, changed, batches, 1, progress=False, load=load)
    assert len(loads) == 4 and weights["a"].is_file()
    # a new problem version retrains every expert
    problem.fine_tune_experts(tmp_path, changed, batches, 2, progress=False, load=load)
    assert len(loads) == 6


RUN_PY = PROBLEM.parent / "run.py"


@pytest.fixture(scope="module")
def run_py():
    spec = importlib.util.spec_from_file_location("smollm2_run", RUN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_study_survives_a_fresh_checkout(run_py, tmp_path, monkeypatch):
    """archive_run copies a finished study into results/; restore_run puts it
    back under runs/ with its storage pointing at the copy."""
    for name, value in (("RUNS", tmp_path / "runs"), ("ARCHIVE", tmp_path / "results" / "studies")):
        monkeypatch.setattr(run_py, name, value)
    run = tmp_path / "runs" / "ps_tpe"
    run.mkdir(parents=True)
    with sqlite3.connect(run / "study.db") as db:
        db.execute("create table trials (number integer)")
        db.executemany("insert into trials values (?)", [(i,) for i in range(7)])
    (run / "run.yaml").write_text(yaml.safe_dump({"storage": f"sqlite:///{run / 'study.db'}", "study_ready": True}))
    run_py.archive_run("ps_tpe")
    assert run_py.restore_run("ps_tpe")  # still there: nothing to do
    shutil.rmtree(tmp_path / "runs")  # a fresh checkout
    assert not run_py.restore_run("ps_cma")  # never archived
    assert run_py.restore_run("ps_tpe")
    record = yaml.safe_load((run / "run.yaml").read_text())
    assert record["storage"] == f"sqlite:///{(run / 'study.db').resolve()}" and record["study_ready"]
    with sqlite3.connect(run / "study.db") as db:
        assert db.execute("select count(*) from trials").fetchone()[0] == 7


def test_rows_of_a_lost_study_are_carried_from_the_previous_table(run_py):
    table = (
        "| model | acc |\n|---|---|\n| source base | 0.170 |\n"
        "| evolved: ps_cma | 0.242 |\n| evolved: ps_cma_brier (earlier run) | 0.250 |\n"
    )
    lines = run_py.previous_lines(table, ["ps_cma", "ps_cma_brier", "dfs_cma"])
    assert lines == {"ps_cma": "| evolved: ps_cma | 0.242 |", "ps_cma_brier": "| evolved: ps_cma_brier | 0.250 |"}
    overfit = "| search | n |\n|---|---|\n| ps_cma | 5 |\n| ps_cma_brier (earlier run) | 5 |\n"
    assert run_py.previous_lines(overfit, ["ps_cma_brier"], overfit=True) == {"ps_cma_brier": "| ps_cma_brier | 5 |"}


def test_the_new_table_replaces_the_one_between_the_markers(run_py, tmp_path):
    doc = tmp_path / "RESULTS.md"
    doc.write_text("intro\n<!-- table: results/table.md -->\n| old |\n<!-- end table -->\nanalysis\n")
    run_py.splice_table(doc, "| new |\n| row |\n")
    assert (
        doc.read_text() == "intro\n<!-- table: results/table.md -->\n| new |\n| row |\n<!-- end table -->\nanalysis\n"
    )
