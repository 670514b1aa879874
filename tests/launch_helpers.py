"""Helpers for the launcher tests: load + validate + plan a recipe, with a controlled environment."""

from __future__ import annotations

from pathlib import Path

from ltsam_launch import backends, recipe, schema

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "yaml"
ENV = {"TIMM_TRAIN_PY": "/opt/timm/train.py", "CLASS_COUNTS": "/opt/lt/counts.json", "RDZV_HOST": "node0"}


def planned(path: str | Path, *overrides: str, env: dict[str, str] | None = None) -> backends.Plan:
    loaded = recipe.load(path, overrides, {**ENV, **(env or {})})
    schema.validate(loaded)
    return backends.plan(loaded)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def srun_line(script: str) -> str:
    """The job step of an sbatch script (run in the background, so the shell can trap the stop signal)."""
    return next(line for line in script.splitlines() if line.startswith("srun ")).removesuffix(" &")
