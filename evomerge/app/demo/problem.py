"""The demo's merge problem: a tiny base, two experts and lm-eval tasks.

Everything is made here, seeded, on the CPU, in about a minute:

- a 4-layer character-level Llama pretrained on general string tasks
  (mostly copying) that has a little of each of two skills, because it saw
  each only on part of its inputs: ``rev`` (reverse a string, a skill of
  where to read) only on 3-4 letter strings, and ``nxt`` (each letter to the
  next one in the alphabet, a skill of what to write) only on letters a-q;
- two experts fine-tuned gently from it, each on one skill over all inputs
  (3-6 letters from a-z): ``expert_a`` on ``rev``, ``expert_b`` on ``nxt``;
- lm-eval multiple-choice tasks (local YAML and jsonl, scored by
  loglikelihood, metric ``acc``) for each skill: a dev split the search may
  use and a disjoint held-out split only for the final report. No training
  string appears in either.

Gentle fine-tunes from a base that already has a little of each skill are
the regime real fine-tunes live in: their task vectors are small, and merges
of them can keep both skills. (Experts fine-tuned hard from a base that
never saw their skill lose both in every merge.) Each expert also forgets
some of the other skill, as fine-tunes do, so merging involves a trade-off.
"""

from __future__ import annotations

import json
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from evomerge.app.demo.tiny import make_tokenizer, save_model, tiny_config
from evomerge.engine.progress import progress_bar

VERSION = 3  # 3: models trained on one thread, the same on every machine
SEED = 0
LAYERS = 4
HIDDEN = 64
SKILLS = ("rev", "nxt")
# Per skill. The dev split is what the search optimises on (half of it, the
# config's eval.samples) and chooses its winner on (the other half, the
# selection race); the held-out split is scored only for the final report.
DEV_DOCS = 300
HELDOUT_DOCS = 400

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_STAMP = "demo_problem.json"

# Pretraining mixture (task -> share), the inputs the base sees each skill
# on, and the schedules (AdamW, warmup then cosine).
PRETRAIN_MIX = {"cpy": 0.6, "dup": 0.2, "rev": 0.1, "nxt": 0.1}
PRETRAIN_DOMAIN = {"rev": {"lengths": (3, 4)}, "nxt": {"letters": _LETTERS[:17]}}
PRETRAIN = dict(steps=600, lr=3e-3, batch=64)
FINETUNE = dict(steps=120, lr=5e-4, batch=32)


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a built demo problem."""

    base: Path
    experts: list[Path]
    tasks_dir: Path
    dev_tasks: list[str]
    heldout_tasks: list[str]


def build_demo(workdir: Path, progress: bool = True) -> DemoAssets:
    """Build (once) the demo's base, experts and lm-eval tasks under ``workdir``.

    Returns at once when a previous build of this version is there; rewrites
    only the task files when ``workdir`` moved (they hold absolute paths).
    """
    workdir = Path(workdir).resolve()
    assets = _assets(workdir)

    def build(models: bool) -> None:
        items = {s: _eval_items(s) for s in SKILLS}
        if models:
            _build_models(workdir, items, progress)
        _write_tasks(assets.tasks_dir, items)

    return build_once(workdir / _STAMP, VERSION, assets, build)


def build_once(stamp: Path, version: int, assets: DemoAssets, build) -> DemoAssets:
    """Call ``build(models)`` unless a build of ``version`` is complete: the
    models and tasks of ``assets`` exist and the ``stamp`` file (JSON) names
    this version and folder. ``models`` is False when only the tasks need
    writing again (the folder moved: they hold absolute paths). ``build``
    runs on one torch thread (``_one_thread``). Shared by the demo and
    benchmarks/gen_problem.py."""
    root = str(stamp.parent)
    built = _read_stamp(stamp)
    models_ok = built.get("version") == version and all(
        (p / "model.safetensors").is_file() for p in [assets.base, *assets.experts]
    )
    if models_ok and built.get("root") == root and (assets.tasks_dir / f"{assets.dev_tasks[0]}.yaml").is_file():
        return assets
    if not models_ok:
        stamp.unlink(missing_ok=True)  # an interrupted build must not look finished
    with _one_thread():
        build(not models_ok)
    stamp.write_text(json.dumps({"version": version, "root": root}) + "\n")
    return assets


def _assets(workdir: Path) -> DemoAssets:
    models = workdir / "models"
    return DemoAssets(
        base=models / "base",
        experts=[models / "expert_a", models / "expert_b"],
        tasks_dir=workdir / "tasks",
        dev_tasks=[f"demo_{s}" for s in SKILLS],
        heldout_tasks=[f"demo_{s}_heldout" for s in SKILLS],
    )


@contextmanager
def _one_thread():
    """Train on one torch thread, so that the models come out the same
    whatever the core count or the load: sums split over threads round
    differently, and these skills' training is sensitive enough for that to
    change what the base learns."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _read_stamp(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- data ------------------------------------------------------------------------


def _shift(s: str, k: int) -> str:
    return "".join(_LETTERS[(_LETTERS.index(c) + k) % 26] for c in s)


def _answer(task: str, s: str) -> str:
    if task == "cpy":
        return s
    if task == "dup":
        return "".join(c + c for c in s)
    if task == "rev":
        return s[::-1]
    if task == "nxt":
        return _shift(s, 1)
    raise AssertionError(task)


def _swap(s: str, rng: random.Random) -> str:
    i = rng.randrange(len(s) - 1)
    return s[:i] + s[i + 1] + s[i] + s[i + 2 :]


def _distractors(task: str, s: str, rng: random.Random) -> list[str]:
    """Plausible wrong answers: the input copied, near misses, and the other
    skill's answer."""
    right = _answer(task, s)
    if task == "rev":
        pool = [s, _swap(right, rng), right[1:] + right[0], _shift(s, 1)]
    else:
        pool = [s, _shift(s, 2), _shift(s, -1), _swap(right, rng), right[::-1]]
    out = list(dict.fromkeys(p for p in pool if p != right))
    rng.shuffle(out)
    return out[:3]


def _random_string(rng: random.Random, lengths: tuple[int, int] = (3, 6), letters: str = _LETTERS) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(*lengths)))


def _prompt(task: str, s: str) -> str:
    return f"{task} {s} ="


def _eval_items(task: str) -> dict[str, list[dict]]:
    """Disjoint dev and held-out multiple-choice docs for one skill."""
    rng = random.Random(f"{SEED}-eval-{task}")
    seen: set[str] = set()
    docs: list[dict] = []
    while len(docs) < DEV_DOCS + HELDOUT_DOCS:
        s = _random_string(rng)
        if s in seen or s == s[::-1] or len(set(s)) < 2:
            continue
        seen.add(s)
        wrong = _distractors(task, s, rng)
        if len(wrong) < 3:
            continue
        choices = wrong + [_answer(task, s)]
        rng.shuffle(choices)
        docs.append({"prompt": _prompt(task, s), "choices": choices, "label": choices.index(_answer(task, s))})
    return {"dev": docs[:DEV_DOCS], "heldout": docs[DEV_DOCS:]}


def _eval_inputs(items: dict[str, dict[str, list[dict]]]) -> set[str]:
    return {d["prompt"].split(" ")[1] for splits in items.values() for docs in splits.values() for d in docs}


def _task_file(skill: str, split: str) -> str:
    return f"demo_{skill}{'' if split == 'dev' else '_heldout'}.yaml"


def _write_tasks(tasks_dir: Path, items: dict[str, dict[str, list[dict]]]) -> None:
    from evomerge.fitness.evaluate import write_choice_task

    for skill, splits in items.items():
        for split, docs in splits.items():
            name = _task_file(skill, split).removesuffix(".yaml")
            write_choice_task(tasks_dir, name, docs, text="prompt", metadata={"version": VERSION})


# -- training --------------------------------------------------------------------


def _batches(mix: dict[str, float], steps: int, batch: int, exclude: set[str], seed: str, domain=None):
    """Deterministic batches of (prompt, answer) pairs drawn from ``mix``;
    ``domain[task]`` limits that task's inputs (lengths, letters)."""
    rng = random.Random(seed)
    tasks, shares = zip(*mix.items())
    for _ in range(steps):
        out = []
        while len(out) < batch:
            task = rng.choices(tasks, shares)[0]
            s = _random_string(rng, **(domain or {}).get(task, {}))
            if s in exclude:
                continue
            out.append((_prompt(task, s), _answer(task, s)))
        yield out


def _encode(tok, pairs: list[tuple[str, str]], answer_only: bool):
    """Right-padded token ids and labels (-100 where no loss is taken)."""
    import torch

    rows, labels = [], []
    for prompt, answer in pairs:
        p = tok(prompt)["input_ids"]
        a = tok(" " + answer)["input_ids"]
        rows.append(p + a)
        labels.append(([-100] * len(p) if answer_only else p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    lab = torch.full((len(rows), width), -100)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


def train_answers(model, tok, batches, steps: int, lr: float, answer_only: bool, desc: str, progress: bool) -> None:
    """Train a causal LM on batches of (prompt, answer) pairs (AdamW, warmup
    then cosine); with ``answer_only`` the loss is taken on the answers only.
    Used by the demo and by experiments/smollm2_skills."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / steps))),
    )
    model.train()
    bar = _bar(steps, desc, progress)
    for pairs in batches:
        ids, lab = _encode(tok, pairs, answer_only)
        logits = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits
        # (B, T, V) predicting token t+1 from position t
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    model.eval()


def _bar(total: int, desc: str, progress: bool):
    return progress_bar(enabled=progress, total=total, desc=desc, leave=False)


def _build_models(workdir: Path, items: dict, progress: bool) -> None:
    tok = make_tokenizer()
    exclude = _eval_inputs(items)
    models = workdir / "models"
    save_model(_pretrain(tok, exclude, progress), models / "base", tok)
    for name, skill in zip(("expert_a", "expert_b"), SKILLS):
        save_model(_finetune(models / "base", skill, tok, exclude, progress, name), models / name, tok)


def _pretrain(tok, exclude: set[str], progress: bool):
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", layers=LAYERS, hidden=HIDDEN))
    steps = PRETRAIN["steps"]
    batches = _batches(PRETRAIN_MIX, steps, PRETRAIN["batch"], exclude, f"{SEED}-pretrain", PRETRAIN_DOMAIN)
    train_answers(
        model, tok, batches, steps, PRETRAIN["lr"], answer_only=False, desc="pretraining base", progress=progress
    )
    return model


def _finetune(base: Path, skill: str, tok, exclude: set[str], progress: bool, name: str):
    import torch
    import transformers

    torch.manual_seed(SEED)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    steps = FINETUNE["steps"]
    batches = _batches({skill: 1.0}, steps, FINETUNE["batch"], exclude, f"{SEED}-finetune-{skill}")
    desc = f"fine-tuning {name} ({skill})"
    train_answers(model, tok, batches, steps, FINETUNE["lr"], answer_only=True, desc=desc, progress=progress)
    return model
