"""`kind: local`: one process, `python -m module` or `python script`."""

from __future__ import annotations

from ltsam_launch.program import program_argv, resolved_args
from ltsam_launch.recipe import Recipe


def world_size(recipe: Recipe) -> int:
    return 1


def plan(recipe: Recipe) -> tuple[list[list[str]], dict[str, str], bool]:
    return [program_argv(recipe, "python", resolved_args(recipe, 1))], {}, True
