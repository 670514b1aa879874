"""`ltsam-launch RECIPE.yaml [dotted.key=value | ~dotted.key ...] [--dry-run]`."""

from __future__ import annotations

import argparse
import shlex
import sys

from ltsam_launch import backends, recipe, runner, schema
from ltsam_launch.errors import RecipeError

EXIT_RECIPE, EXIT_NOT_FOUND = 2, 127


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltsam-launch", description="Run a YAML recipe locally, with torchrun, "
                                "DeepSpeed or under SLURM.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, values read as YAML (program.args.lr=0.1); ~key deletes a key")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the exact commands")
    return p


def dry_run(plan: backends.Plan) -> None:
    """Print every file the launch writes and every command, plain and shell-quoted for copy-paste."""
    for name, text in plan.files.items():
        if name != backends.COMMAND_FILE:
            print(f"# ---- {plan.log_dir / name}")
            print(text, end="" if text.endswith("\n") else "\n")
    for note in plan.notes:
        print(f"# {note}")
    print(f"# ---- commands{'' if plan.execute else ' (not run: set launcher.slurm.submit=true to submit)'}")
    for argv in plan.commands:
        print(shlex.join(argv))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    try:
        loaded = recipe.load(args.recipe, args.overrides)
        schema.validate(loaded)
        plan = backends.plan(loaded)
    except RecipeError as exc:
        print(f"ltsam-launch: {exc}", file=sys.stderr)
        return EXIT_RECIPE
    if args.dry_run:
        dry_run(plan)
        return 0
    try:
        return runner.execute(plan)
    except FileNotFoundError as exc:
        print(f"ltsam-launch: cannot start {exc.filename}: not found", file=sys.stderr)
        return EXIT_NOT_FOUND


if __name__ == "__main__":
    sys.exit(main())
