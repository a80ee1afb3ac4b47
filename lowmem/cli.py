"""``lowmem-train RECIPE.yaml [key.sub=value ...] [--resume]``.

Expected errors (a bad recipe, a missing file, an unknown optimizer, a
corrupted checkpoint, a run that stopped itself) print one line on stderr and
exit with code 2; set ``LOWMEM_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lowmem-train", description="Memory-efficient fine-tuning from a recipe.")
    parser.add_argument("recipe", help="recipe YAML file (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.steps=10 optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    from lowmem.recipe import load_recipe
    from lowmem.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    return train(recipe, resume=args.resume, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from lowmem.trainer import TrainingStopped

    try:
        summary = run(args)
    except (ValueError, OSError, TrainingStopped) as err:
        if os.environ.get("LOWMEM_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"lowmem-train: error: {message}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
