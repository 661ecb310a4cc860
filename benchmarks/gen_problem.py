"""A second merge problem, scored by generation: a tiny base, two experts and
lm-eval ``generate_until`` tasks.

It follows the demo's problem (evomerge.app.demo.problem) with other skills and
another task type. Everything is made here, seeded, on one CPU thread, in about
a minute:

- a 4-layer character-level Llama pretrained on general string tasks
  (mostly copying) that has a little of each of two skills, because it saw
  each mostly on part of its inputs: ``swp`` (swap each adjacent pair of
  letters, ``abcde -> badce``: a skill of where to read) on 3-4 letter
  strings, and ``mir`` (each letter to its mirror in the alphabet, a<->z,
  b<->y: a skill of what to write) on letters a-s;
- two experts fine-tuned gently from it, each on one skill over all inputs
  (3-6 letters from a-z): ``expert_a`` on ``swp``, ``expert_b`` on ``mir``;
- lm-eval generation tasks (local YAML and jsonl): greedy decoding after
  ``"swp abcd = "`` up to a newline, scored by ``exact_match`` against the
  right answer (``badc``). Each skill has a dev split the search may use and
  a disjoint held-out split only for the final report; no training string
  appears in either.

Exact match is all or nothing per document, so a merge that keeps a skill
only roughly scores nothing on it. For merges to keep part of a skill the
base must hold a weak version of it where the expert is strong: besides the
part of the inputs it learns each skill on, the base sees a trace of the
rest (0.2% of its examples are ``swp`` on 5-6 letters, 0.1% ``mir`` on all
letters). Without the trace, merges that scale the task vectors down score
as the base; with much more, the base learns the skill itself. Each expert
also forgets some of the other skill, so merging is a trade-off. Every
training answer ends with the tasks' stop (a newline), so the models learn
where an answer ends.

Held-out exact match as built (one thread, torch 2.13 on x86 CPU), swp/mir:
base 0.50/0.25, expert_a 1.00/0.07, expert_b 0.36/1.00, linear 50/50
0.73/0.51, TIES (density 0.5) 0.78/0.70. The training is sensitive: other
seeds give the same picture for ``mir``, but in two of five the swp expert
does not learn 6-letter strings and scores 0.75 on swp, little above the
base.

    build_gen_problem(workdir) -> DemoAssets(base, experts, tasks_dir, dev_tasks, heldout_tasks)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from evomerge.app.demo.problem import DemoAssets, _random_string, build_once, train_answers
from evomerge.app.demo.tiny import make_tokenizer, save_model, tiny_config

VERSION = 1
SEED = 0
LAYERS = 4
HIDDEN = 64
SKILLS = ("swp", "mir")
DEV_DOCS = 300  # per skill
HELDOUT_DOCS = 400
STOP = "\n"  # ends every answer in training; the tasks' stop sequence
MAX_GEN_TOKS = 8  # the longest answer (6 letters) and the stop, with a spare

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_STAMP = "gen_problem.json"

# Pretraining mixture: (task, weight, inputs), the inputs limited to some
# lengths or letters; the schedules are AdamW, warmup then cosine.
PRETRAIN_MIX = [
    ("cpy", 0.56, {}),
    ("dup", 0.2, {}),
    ("swp", 0.15, {"lengths": (3, 4)}),
    ("swp", 0.002, {"lengths": (5, 6)}),
    ("mir", 0.08, {"letters": _LETTERS[:19]}),
    ("mir", 0.001, {}),
]
PRETRAIN = dict(steps=900, lr=3e-3, batch=64)
FINETUNE = dict(steps=120, lr=5e-4, batch=32)


def build_gen_problem(workdir: Path, progress: bool = True) -> DemoAssets:
    """Build (once) the base, experts and lm-eval tasks under ``workdir``.

    Returns at once when a previous build of this version is there; rewrites
    only the task files when ``workdir`` moved (they hold absolute paths).
    """
    workdir = Path(workdir).resolve()
    assets = _assets(workdir)

    def build(models: bool) -> None:
        items = {s: eval_items(s) for s in SKILLS}
        if models:
            _build_models(workdir, excluded_inputs(items), progress)
        for skill, splits in items.items():
            for split, docs in splits.items():
                write_gen_task(assets.tasks_dir, _task_name(skill, split), docs, metadata={"version": VERSION})

    return build_once(workdir / _STAMP, VERSION, assets, build)


def _assets(workdir: Path) -> DemoAssets:
    models = workdir / "models"
    return DemoAssets(
        base=models / "base",
        experts=[models / "expert_a", models / "expert_b"],
        tasks_dir=workdir / "tasks",
        dev_tasks=[_task_name(s, "dev") for s in SKILLS],
        heldout_tasks=[_task_name(s, "heldout") for s in SKILLS],
    )


def _task_name(skill: str, split: str) -> str:
    return f"gen_{skill}{'' if split == 'dev' else '_heldout'}"


# -- data ------------------------------------------------------------------------


def answer(task: str, s: str) -> str:
    """The right answer (without the stop) of ``task`` on the string ``s``."""
    if task == "cpy":
        return s
    if task == "dup":
        return "".join(c + c for c in s)
    if task == "swp":
        return "".join(s[i : i + 2][::-1] for i in range(0, len(s), 2))
    if task == "mir":
        return "".join(_LETTERS[25 - _LETTERS.index(c)] for c in s)
    raise ValueError(f"unknown task {task!r}")


def prompt(task: str, s: str) -> str:
    """The text before the answer, ending in the space before it (the tasks'
    prompt; training encodes it without the space, then space and answer)."""
    return f"{task} {s} = "


def eval_items(skill: str) -> dict[str, list[dict]]:
    """Disjoint dev and held-out docs (``{"prompt", "answer"}``) for one skill."""
    rng = random.Random(f"{SEED}-gen-eval-{skill}")
    seen: set[str] = set()
    docs: list[dict] = []
    while len(docs) < DEV_DOCS + HELDOUT_DOCS:
        s = _random_string(rng)
        if s in seen or answer(skill, s) == s:
            continue
        seen.add(s)
        docs.append({"prompt": prompt(skill, s), "answer": answer(skill, s)})
    return {"dev": docs[:DEV_DOCS], "heldout": docs[DEV_DOCS:]}


def excluded_inputs(items: dict[str, dict[str, list[dict]]]) -> set[str]:
    """The input strings of every eval doc: training never draws them, for any task."""
    return {d["prompt"].split(" ")[1] for splits in items.values() for docs in splits.values() for d in docs}


def write_gen_task(folder: Path, name: str, docs: list[dict], metadata: dict | None = None) -> Path:
    """Write ``NAME.jsonl`` and ``NAME.yaml``: an lm-eval ``generate_until``
    task on its validation split, greedy up to ``STOP`` or ``MAX_GEN_TOKS``,
    scored by ``exact_match`` of the generation against ``answer``."""
    from evomerge.fitness.evaluate import write_local_task

    exact_match = {
        "metric": "exact_match",
        "aggregation": "mean",
        "higher_is_better": True,
        "ignore_case": False,
        "ignore_punctuation": False,
    }
    return write_local_task(
        folder,
        name,
        docs,
        {
            "output_type": "generate_until",
            "doc_to_text": "prompt",
            "doc_to_target": "answer",
            "generation_kwargs": {"until": [STOP], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
            "metric_list": [exact_match],
        },
        metadata,
    )


# -- training --------------------------------------------------------------------


def _batches(mix: list[tuple[str, float, dict]], steps: int, batch: int, exclude: set[str], seed: str):
    """Deterministic batches of (prompt, answer + stop) pairs drawn from
    ``mix``; train_answers puts the space between them."""
    rng = random.Random(seed)
    for _ in range(steps):
        out = []
        while len(out) < batch:
            task, _, inputs = rng.choices(mix, [weight for _, weight, _ in mix])[0]
            s = _random_string(rng, **inputs)
            if s not in exclude:
                out.append((prompt(task, s).removesuffix(" "), answer(task, s) + STOP))
        yield out


def training_batches(exclude: set[str]) -> dict[str, Iterator[list[tuple[str, str]]]]:
    """Model name -> the batches of (prompt, answer) pairs it is trained on
    (the base from scratch, the experts from the base), none drawing an input
    in ``exclude``."""
    out = {"base": _batches(PRETRAIN_MIX, PRETRAIN["steps"], PRETRAIN["batch"], exclude, f"{SEED}-gen-pretrain")}
    for name, skill in zip(("expert_a", "expert_b"), SKILLS):
        mix = [(skill, 1.0, {})]
        out[name] = _batches(mix, FINETUNE["steps"], FINETUNE["batch"], exclude, f"{SEED}-gen-finetune-{skill}")
    return out


def _build_models(workdir: Path, exclude: set[str], progress: bool) -> None:
    import torch
    import transformers

    tok = make_tokenizer()
    models = workdir / "models"
    batches = training_batches(exclude)
    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", layers=LAYERS, hidden=HIDDEN))
    train_answers(model, tok, batches["base"], PRETRAIN["steps"], PRETRAIN["lr"], False, "pretraining base", progress)
    save_model(model, models / "base", tok)
    for name, skill in zip(("expert_a", "expert_b"), SKILLS):
        torch.manual_seed(SEED)
        model = transformers.AutoModelForCausalLM.from_pretrained(models / "base")
        desc = f"fine-tuning {name} ({skill})"
        train_answers(model, tok, batches[name], FINETUNE["steps"], FINETUNE["lr"], True, desc, progress)
        save_model(model, models / name, tok)
