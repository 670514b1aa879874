"""The training program's side of a command: how it is invoked and how its `args:` mapping becomes flags.

The mapping is generic (timm's train.py conventions), so the same recipe drives `ltsam.train` or timm's
own script: `snake_case: v` -> `--snake-case v`, true -> bare flag, false/None -> omitted, lists -> one flag
with repeated values, mappings -> `--flag k=v ...` (timm's ParseKwargs, e.g. `--opt-kwargs rho=0.05`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from ltsam_launch import scale
from ltsam_launch.recipe import Recipe

Style = Literal["python", "torchrun", "deepspeed"]
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def tool(name: str) -> str:
    """`name` from the interpreter's own bin folder when it is there (the venv that runs the launcher)."""
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.exists() else name


def log_dir(recipe: Recipe) -> Path:
    """Where the launcher writes the resolved recipe, command, ds_config and sbatch script."""
    chosen = recipe.get("launcher.log_dir") or recipe.get("program.args.output")
    return Path(chosen) if chosen else Path("runs") / recipe.name


def value_text(value: Any) -> str:
    """One value as the program reads it: YAML/Python literals that ast.literal_eval understands."""
    if isinstance(value, list):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)


def to_flags(args: dict[str, Any]) -> list[str]:
    """The `args:` mapping as command-line flags, in the recipe's order."""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, dict):
            if value:
                argv += [flag, *(f"{k}={value_text(v)}" for k, v in value.items() if v is not None)]
        elif isinstance(value, list):
            if value:
                argv += [flag, *(value_text(v) for v in value)]
        else:
            argv += [flag, value_text(value)]
    return argv


def resolved_args(recipe: Recipe, world_size: int | None, deepspeed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The program's args with what the launcher derives: per-process batch and lr from the scale rule
    (launch/scale.py), AMP flags from `precision` (unless DeepSpeed owns precision), and the DeepSpeed config."""
    args = dict(recipe.get("program.args") or {})
    scaled = scale.resolve(recipe, world_size)
    if scaled.per_process is not None:
        args["batch_size"] = scaled.per_process
    if scaled.lr is not None:
        args["lr"] = scaled.lr
    precision = recipe.get("precision")
    if precision in AMP_DTYPES and deepspeed is None:
        args["amp"] = True
        args["amp_dtype"] = AMP_DTYPES[precision]
    if deepspeed is not None:
        args.update(deepspeed)
    return args


def program_argv(recipe: Recipe, style: Style, args: dict[str, Any]) -> list[str]:
    """The program and its flags, as the given launcher expects them after its own options."""
    module, script = recipe.get("program.module"), recipe.get("program.script")
    if style == "python":
        head = [recipe.get("launcher.python") or sys.executable, *(["-m", module] if module else [script])]
    elif style == "torchrun":
        head = ["-m", module] if module else [script]
    else:
        head = ["--module", module] if module else [script]
    return [*head, *to_flags(args), *(recipe.get("program.extra_args") or [])]
