"""`kind: torchrun`: one torchrun per node (c10d rendezvous or static node rank / master address)."""

from __future__ import annotations

from typing import Any

from ltsam_launch.program import program_argv, resolved_args, tool
from ltsam_launch.recipe import Recipe

SECTION = "launcher.torchrun"
# recipe key -> torchrun flag, in the order they are written
FLAGS = ("nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "node_rank", "master_addr",
         "master_port", "max_restarts")


def world_size(recipe: Recipe) -> int | None:
    cfg = recipe.get(SECTION) or {}
    nnodes, nproc = cfg.get("nnodes", 1), cfg.get("nproc_per_node", 1)
    return nnodes * nproc if isinstance(nnodes, int) and isinstance(nproc, int) else None


def standalone(cfg: dict[str, Any]) -> bool:
    """Single node with no rendezvous given: `--standalone` picks a free port, so two jobs can share a host."""
    if "standalone" in cfg:
        return bool(cfg["standalone"])
    return cfg.get("nnodes", 1) == 1 and not any(cfg.get(k) for k in ("rdzv_backend", "rdzv_endpoint",
                                                                         "master_addr", "master_port"))


def launcher_argv(cfg: dict[str, Any], head: list[str] | None = None) -> list[str]:
    """`torchrun` (`executable`, else `head`, else the venv's torchrun) and its own options, before the program."""
    argv = [cfg["executable"]] if cfg.get("executable") else list(head or [tool("torchrun")])
    if standalone(cfg):
        argv.append("--standalone")
    argv += [f"--{key.replace('_', '-')}={cfg[key]}" for key in FLAGS if cfg.get(key) is not None]
    return argv + list(cfg.get("extra_args") or [])


def plan(recipe: Recipe) -> tuple[list[list[str]], dict[str, str], bool]:
    cfg = recipe.get(SECTION) or {}
    program = program_argv(recipe, "torchrun", resolved_args(recipe, world_size(recipe)))
    return [launcher_argv(cfg) + program], {}, True
