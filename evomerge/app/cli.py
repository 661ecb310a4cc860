"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evomerge.engine.progress import is_terminal
from evomerge.errors import EvomergeError


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}
    t = text.strip().upper()
    num = t.rstrip("KMGB")
    try:
        return int(float(num) * units[t[len(num) :]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 500MB or 5GB") from None


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.engine.merge import merge_to_disk
    from evomerge.engine.recipe import load_recipe

    recipe_path = Path(args.recipe)
    recipe = load_recipe(recipe_path)
    t0 = time.perf_counter()
    out = merge_to_disk(
        recipe,
        args.out_dir,
        root=recipe_path.parent,
        seed=args.seed,
        device=args.device,
        overwrite=args.overwrite,
        allow_outside=args.allow_outside_paths,
        shard_bytes=args.shard_size,
        progress=not args.no_progress,
    )
    what = " + ".join(
        filter(None, [recipe.method, f"a route of {len(recipe.route.layers)} layers" if recipe.route else None])
    )
    print(f"merged {what} into {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _is_search_config(path: Path) -> bool:
    """Whether a YAML file is a search config (it has a space or an eval section), not a recipe."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False  # the recipe reader says what is wrong with it
    return isinstance(data, dict) and ("space" in data or "eval" in data)


def _budget(text: str) -> float:
    """A memory budget: a fraction of the free memory (0.8) or a size (70GB)."""
    from evomerge.engine.memory import parse_budget

    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    from evomerge.engine.devices import parse_devices
    from evomerge.engine.memory import budgets, choose, host_budget, recipe_plan
    from evomerge.engine.recipe import load_recipe

    path = Path(args.file)
    if not path.is_file():
        raise EvomergeError(f"{path} does not exist; give a recipe or a search config")
    if _is_search_config(path):
        from evomerge.run.run import Run

        plan, memory = Run.memory_plan(path, device=args.device, allow_outside_paths=args.allow_outside_paths)
        mode, budget = memory.strategy, memory.budget
        what = f"search config {path}"
    else:
        recipe = load_recipe(path)
        plan = recipe_plan([recipe], path.parent, parse_devices(args.device), args.allow_outside_paths)
        mode, budget, what = "auto", None, f"recipe {path} ({recipe.method})"
    mode = args.memory or mode
    budget = args.memory_budget if args.memory_budget is not None else budget
    if plan.on_gpu():
        plan.host_limit = host_budget()
    limits = budgets(plan.devices, budget)
    print(f"memory plan of {what}, in place: the live model is {plan.model_bytes / 1e9:.2f} GB")
    print(plan.table(limits))
    strategy = choose(plan, mode, limits)  # one line and exit 2 when it does not fit
    how = "memory: auto takes" if mode == "auto" else "the config asks for" if not args.memory else "--memory asks for"
    print(f"{how} {plan.describe(strategy)}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from evomerge.engine.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name}  (base: {m.base}{', random' if m.random else ''})")
        for p in m.params:
            default = "required" if p.required else f"default {p.default}"
            valid = f", valid {p.interval}" if p.interval else ""
            bounds = f", search {list(p.bounds)}" if p.bounds else ""
            print(f"    {p.name:<18} {p.kind.__name__:<5} {p.scope:<9} {default}{valid}{bounds}")
    print(
        "\nA recipe may set a number outside its search range, as mergekit allows (a negative weight, slerp t "
        "outside [0, 1]);\nonly the 'valid' limits hold, and every number must be finite. A search stays inside "
        "the search ranges,\nwhich are all non-negative (a search space may narrow them, not widen them)."
    )
    return 0


def _note(text: str) -> None:
    print(text, file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.app.demo.run import run_demo
    from evomerge.engine.devices import free_core_threads

    with free_core_threads(log=_note):
        return run_demo(Path(args.workdir), progress=not args.no_progress)


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.app.export import status_table
    from evomerge.engine.devices import free_core_threads
    from evomerge.run.run import Run

    executor = {"name": args.executor, "address": args.address, "workers": args.workers}
    if (args.address or args.workers) and args.executor is None:
        executor["name"] = "ray"  # a Ray address or worker count means Ray
    run = Run(
        args.config,
        args.run_dir,
        executor={k: v for k, v in executor.items() if v is not None},
        force=args.force,
        allow_outside_paths=args.allow_outside_paths,
        allow_test_sets=args.allow_test_sets,
        progress=not args.no_progress,
    )
    try:
        with free_core_threads(log=_note):
            run.search()
    finally:
        run.close()
    print(status_table(args.run_dir, top=args.top, store=run.store))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from evomerge.app.export import status_table

    print(status_table(args.run_dir, top=args.top))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.app.export import export_best

    out, recipe = export_best(
        args.run_dir,
        out=args.out,
        fmt=args.format,
        merge_dir=args.merge,
        trial=args.trial,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        pick=args.pick,
    )
    meta = recipe.metadata["evomerge"]
    held = meta["heldout"]["fitness"] if meta.get("heldout") else None
    rule = {
        "race": "chosen by the selection race",
        "dev": "chosen by best dev fitness",
        "pick max-min": "the Pareto front's point whose worst-kept objective keeps the most",
        "pick weighted": "the Pareto front's point with the highest weighted sum",
    }.get(meta.get("chosen_by"))
    print(
        f"wrote {out} (trial {meta['trial']}{f', {rule}' if rule else ''}, dev fitness {meta['dev']['fitness']:.4f}"
        + (f", held-out {held:.4f}" if held is not None else "")
        + ")"
    )
    if args.merge:
        print(f"merged into {args.merge}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evomerge.app.report import write_report

    out = write_report(args.run_dir, out=args.out, top=args.top)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Discover how to merge fine-tuned LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a recipe (evomerge or mergekit YAML) into a model folder")
    m.add_argument("recipe", help="recipe YAML; relative model paths resolve against its folder")
    m.add_argument("out_dir", help="output folder (must be empty unless --overwrite)")
    m.add_argument("--seed", type=int, default=None, help="seed for random-mask methods (overrides the recipe's)")
    m.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N; a routed recipe also takes a list such as cuda:0,cuda:1"
    )
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--allow-outside-paths", action="store_true", help="let model paths leave the recipe's folder")
    m.add_argument("--shard-size", type=_size, default="5GB", help="maximum shard size, e.g. 500MB (default 5GB)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.set_defaults(func=cmd_merge)

    s = sub.add_parser("search", help="search for the best merge recipe (resumes an existing run)")
    s.add_argument("config", help="search config YAML")
    s.add_argument("--run-dir", required=True, help="run folder: study, checkpoints; run again to continue")
    s.add_argument("--force", action="store_true", help="start afresh in a run folder of another config")
    s.add_argument("--allow-outside-paths", action="store_true", help="let paths leave the config's folder")
    s.add_argument("--allow-test-sets", action="store_true", help="allow objectives scored on a test split")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.add_argument("--top", type=_positive, default=10, help="search trials shown in the final table")
    s.add_argument("--executor", choices=["local", "ray"], help="where candidates are scored (overrides the config)")
    s.add_argument("--address", help="Ray cluster: auto or host:port (default: start Ray on this machine)")
    s.add_argument("--workers", type=_positive, help="Ray workers (default: as many as the cluster's GPUs, or CPUs)")
    s.set_defaults(func=cmd_search)

    st = sub.add_parser("status", help="top trials of a run against its baselines")
    st.add_argument("run_dir")
    st.add_argument("--top", type=_positive, default=10, help="search trials shown")
    st.set_defaults(func=cmd_status)

    e = sub.add_parser("export", help="write a run's best recipe (and optionally merge it)")
    e.add_argument("run_dir")
    e.add_argument("--out", help="recipe file (default: RUN_DIR/best_recipe.yaml)")
    e.add_argument("--format", choices=["evomerge", "mergekit"], default="evomerge")
    e.add_argument("--merge", metavar="OUT_DIR", help="also merge the recipe into this model folder")
    e.add_argument("--trial", type=int, help="export this trial instead of the best")
    e.add_argument(
        "--pick",
        choices=["max-min", "weighted"],
        help="export the Pareto front's point whose worst-kept objective keeps the most (max-min), "
        "or with the highest weighted sum (weighted)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace a non-empty --merge folder")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=cmd_export)

    r = sub.add_parser("report", help="write an HTML report of a run: figures and tables, readable offline")
    r.add_argument("run_dir")
    r.add_argument("--out", help="HTML file (default: RUN_DIR/report.html)")
    r.add_argument("--top", type=_positive, default=20, help="search trials in the top-trials table")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser(
        "demo", help="build tiny demo models and experts (once), search for their best merge, report on held-out data"
    )
    d.add_argument("--workdir", default="runs/demo", help="where demo models and outputs go")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    d.set_defaults(func=cmd_demo)

    pl = sub.add_parser(
        "plan", help="the memory an in-place merge (a recipe, or a search config's candidates) needs, per strategy"
    )
    pl.add_argument("file", help="a recipe (evomerge or mergekit YAML) or a search config")
    pl.add_argument("--device", help="cpu, cuda, cuda:0,cuda:1 or cuda:all (default: the config's, or the first GPU)")
    pl.add_argument("--memory", choices=["auto", "cached", "lean", "offload"], help="strategy (default: the config's)")
    pl.add_argument(
        "--memory-budget", type=_budget, help="a fraction of each device's free memory (0.8) or a size (70GB)"
    )
    pl.add_argument("--allow-outside-paths", action="store_true", help="let model paths leave the file's folder")
    pl.set_defaults(func=cmd_plan)

    ls = sub.add_parser("methods", help="list merge methods and their parameters")
    ls.set_defaults(func=cmd_methods)
    return parser


def _positive(text: str) -> int:
    """An argument that counts something: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1; give 1 or more")
    return value


def _quiet_library_bars() -> None:
    """Turn off the progress bars of the libraries under us (loading and
    saving weights, datasets): ours show the work in lines when the output is
    a log, and theirs would fill it with carriage returns."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "no_progress") and (args.no_progress or not is_terminal(sys.stderr)):
        _quiet_library_bars()
    try:
        return args.func(args)
    except EvomergeError as e:
        if args.debug:
            raise
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
