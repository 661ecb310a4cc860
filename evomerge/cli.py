"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
    from evomerge.merge import merge_to_disk
    from evomerge.recipe import load_recipe

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
    print(f"merged {recipe.method} into {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from evomerge.methods import METHODS

    for m in METHODS.values():
        print(f"{m.name}  (base: {m.base}{', random' if m.random else ''})")
        for p in m.params:
            default = "required" if p.required else f"default {p.default}"
            bounds = f", search {list(p.bounds)}" if p.bounds else ""
            print(f"    {p.name:<18} {p.kind.__name__:<5} {p.scope:<9} {default}{bounds}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.demo import run_demo

    return run_demo(Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Discover how to merge fine-tuned LLMs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="merge a recipe (evomerge or mergekit YAML) into a model folder")
    m.add_argument("recipe", help="recipe YAML; relative model paths resolve against its folder")
    m.add_argument("out_dir", help="output folder (must be empty unless --overwrite)")
    m.add_argument("--seed", type=int, default=None, help="seed for random-mask methods (overrides the recipe's)")
    m.add_argument("--device", default="cpu", help="cpu or cuda")
    m.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    m.add_argument("--allow-outside-paths", action="store_true", help="let model paths leave the recipe's folder")
    m.add_argument("--shard-size", type=_size, default="5GB", help="maximum shard size, e.g. 500MB (default 5GB)")
    m.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("demo", help="build tiny demo models and merge them (no downloads)")
    d.add_argument("--workdir", default="runs/demo", help="where demo models and outputs go")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("methods", help="list merge methods and their parameters")
    ls.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EvomergeError as e:
        if args.debug:
            raise
        print(f"evomerge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
