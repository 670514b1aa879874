"""One module per launcher kind; each says its world size and turns a recipe into a Plan."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ltsam_common.train_args import LAUNCH_RECIPE_ENV
from ltsam_launch import scale
from ltsam_launch.backends import deepspeed, local, slurm, torchrun
from ltsam_launch.program import log_dir
from ltsam_launch.recipe import Recipe

KINDS = {"local": local, "torchrun": torchrun, "deepspeed": deepspeed, "slurm": slurm}
RECIPE_FILE, COMMAND_FILE = "launch-recipe.yaml", "launch-command.sh"


@dataclass
class Plan:
    """What a launch does: write `files` into `log_dir`, then (if `execute`) run `commands` in order."""

    commands: list[list[str]]
    files: dict[str, str] = field(default_factory=dict)
    execute: bool = True
    log_dir: Path = Path()
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the launcher decided (the scale rule), for the dry run


def kind(recipe: Recipe) -> str:
    return str(recipe.get("launcher.kind") or "local")


def world_size(recipe: Recipe) -> int | None:
    """Total processes, or None when the launcher decides at run time (elastic `nnodes: 1:4`)."""
    return KINDS[kind(recipe)].world_size(recipe)


def plan(recipe: Recipe) -> Plan:
    """The commands and files for a validated recipe; adds the resolved recipe and the command script."""
    commands, files, execute = KINDS[kind(recipe)].plan(recipe)
    files = {RECIPE_FILE: yaml.safe_dump(recipe.data, sort_keys=False), **files,
             COMMAND_FILE: "".join(shlex.join(argv) + "\n" for argv in commands)}
    env = {LAUNCH_RECIPE_ENV: str(recipe.path),  # so the trainer's messages name overrides of this recipe
           **{str(k): str(v) for k, v in (recipe.get("launcher.env") or {}).items()}}
    notes = [scale.resolve(recipe, world_size(recipe)).note]
    return Plan(commands, files, execute, log_dir(recipe), env, notes)


def environment(plan: Plan) -> dict[str, str]:
    """The child's environment: ours plus the recipe's `launcher.env`."""
    return {**os.environ, **plan.env}
