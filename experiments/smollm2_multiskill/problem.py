"""The SmolLM2-135M multi-skill problem (issue 19): three experts of one base,
merged into one model that should keep all three skills.

This module defines the skills, their evaluation documents and the experts'
training data, and builds the base, the experts and the tasks (``build``);
``run.py`` runs the searches, RESULTS.md holds the results.

Skills, each an lm-eval multiple-choice task (4 answers, metric ``acc``) with
disjoint ``dev`` (what a search optimises on), ``select`` (what it chooses
its winner on) and ``heldout`` (only for the results table) splits:

- ``math``: two-number addition in digits, ``Q: 23 + 41 = ?`` -> ``64``
  (operands 0-49), as in ``smollm2_skills``;
- ``french``: French number words to digits, ``Q: trois cent vingt et un = ?``
  -> ``321``, for 0-999 (``smollm2_skills`` has only 0-99, too few for 400
  held-out documents);
- ``rev``: reverse a string of 4-6 distinct random letters, ``Q: Reverse the letters
  of kqzmd.`` -> ``dmzqk``; a string transformation, a skill of another kind.
  Its wrong answers use the same letters, so reading them is not enough.

No training example is an evaluation document: the math expert never sees
an operand pair any math document uses, the rev expert never sees a string
any rev document uses, and the French expert trains on other question forms
(``Écris ... en chiffres``, ``... en lettres``, what comes next), as in
``smollm2_skills``, never the ``X = ?`` form the French task asks.
"""

from __future__ import annotations

import importlib.util
import random
import string
from pathlib import Path

VERSION = 1
SEED = 0
DOCS = {"dev": 200, "select": 200, "heldout": 400}  # per skill
SKILLS = ("math", "french", "rev")
REV_LENGTHS = (4, 6)


def _skills_problem():
    """experiments/smollm2_skills/problem.py, whose French words, documents
    and base model this problem shares."""
    path = Path(__file__).resolve().parents[1] / "smollm2_skills" / "problem.py"
    spec = importlib.util.spec_from_file_location("smollm2_skills_problem", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SKILLS_PROBLEM = _skills_problem()
OPERANDS = SKILLS_PROBLEM.OPERANDS
load_base = SKILLS_PROBLEM.load_base


def french(n: int) -> str:
    """French words for 0 <= n < 1000 (traditional spelling): below 100 as
    ``smollm2_skills``; ``cent``, ``deux cents``, ``trois cent vingt et un``."""
    if n < 100:
        return SKILLS_PROBLEM.french(n)
    hundreds, rest = divmod(n, 100)
    head = "cent" if hundreds == 1 else f"{SKILLS_PROBLEM.french(hundreds)} cent"
    if rest == 0:
        return head + ("s" if hundreds > 1 else "")
    return f"{head} {SKILLS_PROBLEM.french(rest)}"


def reverse_prompt(s: str) -> str:
    return f"Q: Reverse the letters of {s}.\nA:"


def _reverse_doc(s: str, rng: random.Random) -> dict | None:
    right = s[::-1]
    i = rng.randrange(len(s) - 1)
    swapped = right[:i] + right[i + 1] + right[i] + right[i + 2 :]
    pool = [s, swapped, right[1:] + right[0], right[-1] + right[:-1], s[1:] + s[0]]
    wrong = list(dict.fromkeys(p for p in pool if p != right))
    if len(wrong) < 3:
        return None
    rng.shuffle(wrong)
    choices = [*wrong[:3], right]
    rng.shuffle(choices)
    return {"q": reverse_prompt(s), "choices": choices, "label": choices.index(right), "s": s}


def _random_string(rng: random.Random) -> str:
    """4-6 distinct letters (so that every wrong answer differs from the right one)."""
    return "".join(rng.sample(string.ascii_lowercase, rng.randint(*REV_LENGTHS)))


def _split(docs: list[dict]) -> dict[str, list[dict]]:
    out, start = {}, 0
    for split, n in DOCS.items():
        out[split] = docs[start : start + n]
        start += n
    return out


def eval_items() -> dict[str, dict[str, list[dict]]]:
    """Per skill, its dev, select and heldout documents (disjoint)."""
    rng = random.Random(f"{SEED}-multiskill-eval")
    total = sum(DOCS.values())
    out = {}
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    rng.shuffle(pairs)
    choice = SKILLS_PROBLEM._choice_doc
    math = [choice(SKILLS_PROBLEM.sum_prompt(str(a), str(b)), a + b, rng, a=a, b=b) for a, b in pairs[:total]]
    out["math"] = _split(math)
    numbers = list(range(1000))
    rng.shuffle(numbers)
    out["french"] = _split([choice(f"Q: {french(n)} = ?\nA:", n, rng, top=1000, n=n) for n in numbers[:total]])
    seen: set[str] = set()
    rev = []
    while len(rev) < total:
        s = _random_string(rng)
        doc = _reverse_doc(s, rng) if s not in seen else None
        seen.add(s)
        if doc is not None:
            rev.append(doc)
    out["rev"] = _split(rev)
    return out


def task_name(skill: str, split: str) -> str:
    """lm-eval task name: ``multi_math_dev``, ``multi_rev_heldout``..."""
    return f"multi_{skill}_{split}"


# -- training data ---------------------------------------------------------------


def training_batches(skill: str, steps: int, batch: int, items: dict | None = None):
    """``steps`` batches of (prompt, answer) pairs for the ``skill`` expert,
    none of them an evaluation document."""
    items = items if items is not None else eval_items()
    rng = random.Random(f"{SEED}-multiskill-train-{skill}")
    if skill == "math":
        used = {(d["a"], d["b"]) for docs in items["math"].values() for d in docs}
        allowed = [(a, b) for a in OPERANDS for b in OPERANDS if (a, b) not in used]

        def make():
            a, b = rng.choice(allowed)
            return SKILLS_PROBLEM.sum_prompt(str(a), str(b)), str(a + b)

    elif skill == "french":
        make = lambda: SKILLS_PROBLEM._french_pair(rng.randrange(1000), rng, french, 1000)  # noqa: E731
    elif skill == "rev":
        used = {d["s"] for docs in items["rev"].values() for d in docs}

        def make():
            while True:
                s = _random_string(rng)
                if s not in used:
                    return reverse_prompt(s), s[::-1]

    else:
        raise ValueError(skill)
    for _ in range(steps):
        yield [make() for _ in range(batch)]


def write_tasks(folder: Path, items: dict | None = None) -> dict[str, dict[str, str]]:
    """Write every skill's split as a local lm-eval task; returns skill ->
    split -> task name."""
    from evomerge.fitness.evaluate import write_choice_task

    items = items if items is not None else eval_items()
    names: dict[str, dict[str, str]] = {}
    for skill, splits in items.items():
        for split, docs in splits.items():
            name = task_name(skill, split)
            write_choice_task(folder, name, docs, metadata={"version": VERSION})
            names.setdefault(skill, {})[split] = name
    return names


# -- build -----------------------------------------------------------------------

# Per expert, as a user would: a normal learning rate, a few hundred steps at
# most. Reversing letters takes longer to learn than the other two: at 150
# steps its expert reached 0.79 held-out, under the 0.8 the experiment asks of
# every expert, so it trains for 300 (chosen before any merge was scored).
FINETUNE = {
    "math": dict(steps=150, lr=5e-5, batch=16),
    "french": dict(steps=150, lr=5e-5, batch=16),
    "rev": dict(steps=300, lr=5e-5, batch=16),
}
_STAMP = "problem.json"


def build(workdir: Path, progress: bool = True) -> dict[str, Path]:
    """Build (once) the base, the three experts (``expert_<skill>``) and the
    tasks under ``workdir``; returns their paths. An expert is trained again
    only when it is missing or its ``FINETUNE`` settings changed."""
    import json

    workdir = Path(workdir).resolve()
    models = workdir / "models"
    paths = {"base": models / "base", **{f"expert_{s}": models / f"expert_{s}" for s in SKILLS}}
    items = eval_items()
    built = SKILLS_PROBLEM.fine_tune_experts(
        workdir, FINETUNE, lambda skill, steps, batch: training_batches(skill, steps, batch, items), VERSION, progress
    )
    write_tasks(workdir / "tasks", items)
    (workdir / _STAMP).write_text(json.dumps({**built, "root": str(workdir)}) + "\n")
    return {**paths, "tasks": workdir / "tasks"}


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "work")))
