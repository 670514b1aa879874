"""`kind: deepspeed`: the `deepspeed` launcher, its hostfile semantics, and the ds_config built for the run.

The ds_config is derived from the recipe (global batch, precision, ZeRO stage) so the batch the trainer
sees and the one DeepSpeed checks can never disagree; a `config_file` is a starting point, `config` extra
fields merged last.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ltsam_launch import scale
from ltsam_launch.program import log_dir, program_argv, resolved_args, tool
from ltsam_launch.recipe import Recipe

SECTION = "launcher.deepspeed"
CONFIG_FILE = "ds_config.json"
FLAGS = ("hostfile", "include", "exclude", "num_nodes", "num_gpus", "master_addr", "master_port", "node_rank")
_SLOTS = re.compile(r"^(\S+)\s+slots=(\d+)$")


def read_hostfile(recipe: Recipe, key: str) -> dict[str, int]:
    """host -> slots, as DeepSpeed reads it (`worker-0 slots=8`, `#` comments, no duplicate hosts)."""
    path = Path(recipe.get(key))
    if not path.is_file():
        raise recipe.error(key, "hostfile not found")
    pool: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _SLOTS.match(line)
        if not match or match.group(1) in pool:
            why = "duplicate host" if match else "expected 'HOST slots=N'"
            raise recipe.error(key, f"{path}:{number}: {why}: {line!r}")
        pool[match.group(1)] = int(match.group(2))
    if not pool:
        raise recipe.error(key, "hostfile lists no host")
    return pool


def _parse_hosts(recipe: Recipe, key: str, pool: dict[str, int]) -> dict[str, list[int] | None]:
    """`w0@w1:0,2` -> {w0: None (all slots), w1: [0, 2]}, every host and slot checked against the pool."""
    spec: dict[str, list[int] | None] = {}
    for part in str(recipe.get(key)).split("@"):
        host, _, slots = part.partition(":")
        if host not in pool:
            raise recipe.error(key, f"host {host!r} is not in the hostfile ({', '.join(pool)})")
        try:
            spec[host] = [int(s) for s in slots.split(",")] if slots else None
        except ValueError:
            raise recipe.error(key, f"slots of {host!r} must be integers") from None
        if spec[host] and not all(0 <= s < pool[host] for s in spec[host]):
            raise recipe.error(key, f"{host!r} has slots 0..{pool[host] - 1}")
    return spec


def active_slots(recipe: Recipe) -> dict[str, int]:
    """host -> processes DeepSpeed will start there, after include/exclude, num_nodes and num_gpus."""
    cfg = recipe.get(SECTION) or {}
    if not cfg.get("hostfile"):
        return {"localhost": cfg["num_gpus"]} if cfg.get("num_gpus") else {}
    pool = read_hostfile(recipe, f"{SECTION}.hostfile")
    active = dict(pool)
    if cfg.get("include"):
        spec = _parse_hosts(recipe, f"{SECTION}.include", pool)
        active = {h: pool[h] if s is None else len(set(s)) for h, s in spec.items()}
    if cfg.get("exclude"):
        for host, slots in _parse_hosts(recipe, f"{SECTION}.exclude", pool).items():
            active[host] = 0 if slots is None else active[host] - len(set(slots))
        active = {h: n for h, n in active.items() if n > 0}
    if cfg.get("num_nodes"):
        if cfg["num_nodes"] > len(active):
            raise recipe.error(f"{SECTION}.num_nodes", f"the hostfile has only {len(active)} host(s)")
        active = dict(list(active.items())[: cfg["num_nodes"]])
    if cfg.get("num_gpus"):
        active = {h: cfg["num_gpus"] for h in active}
    return active


def world_size(recipe: Recipe) -> int | None:
    return sum(active_slots(recipe).values()) or None


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    for key, value in src.items():
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _deep_update(dst[key], value)
        else:
            dst[key] = value
    return dst


def ds_config(recipe: Recipe, world: int | None) -> dict[str, Any]:
    """The ds_config: a `config_file` (or nothing), then the recipe's batch, precision and stage, then `config`."""
    cfg = recipe.get(SECTION) or {}
    key = f"{SECTION}.config_file"
    if cfg.get("config_file"):
        try:
            config = json.loads(Path(cfg["config_file"]).read_text())
        except FileNotFoundError:
            raise recipe.error(key, "ds_config file not found") from None
        except json.JSONDecodeError as exc:
            raise recipe.error(key, f"not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise recipe.error(key, "a ds_config must be a JSON object")
    else:
        config = {"gradient_accumulation_steps": 1}
    total = scale.resolve(recipe, world).total
    if total and world:
        accumulation = config.get("gradient_accumulation_steps", 1)
        config.update(train_batch_size=total, train_micro_batch_size_per_gpu=total // (world * accumulation))
    precision = recipe.get("precision") or (None if cfg.get("config_file") else "fp32")
    if precision:
        for name in ("bf16", "fp16"):
            config[name] = {**(config.get(name) or {}), "enabled": precision == name}
    if cfg.get("zero_stage") is not None or not cfg.get("config_file"):
        config["zero_optimization"] = {**(config.get("zero_optimization") or {}), "stage": cfg.get("zero_stage", 0)}
    if zero_stage(config) >= 1:
        # DeepSpeed refuses any client optimizer it has not whitelisted at ZeRO >= 1 (plain SGD included)
        config.setdefault("zero_allow_untested_optimizer", True)
    return _deep_update(config, cfg.get("config") or {})


def launcher_argv(cfg: dict[str, Any], head: list[str] | None = None) -> list[str]:
    """`deepspeed` (`executable`, else `head`, else the venv's deepspeed) and its options, before the program."""
    argv = [cfg["executable"]] if cfg.get("executable") else list(head or [tool("deepspeed")])
    argv += [f"--{key}={cfg[key]}" for key in FLAGS if cfg.get(key) is not None]
    multinode = cfg.get("multinode_launcher")
    if multinode:
        argv.append("--no_ssh" if multinode == "no_ssh" else f"--launcher={multinode}")
    if cfg.get("launcher_args"):
        argv.append(f"--launcher_args={cfg['launcher_args']}")
    if not cfg.get("local_rank_arg", False):
        argv.append("--no_local_rank")  # workers read LOCAL_RANK from the environment
    return argv + list(cfg.get("extra_args") or [])


def program_part(recipe: Recipe, world: int | None) -> tuple[list[str], dict[str, str]]:
    """The program with `--deepspeed-config`/`--zero-stage`, and the ds_config file to write for it."""
    config = ds_config(recipe, world)
    extra: dict[str, Any] = {"deepspeed_config": str(log_dir(recipe) / CONFIG_FILE), "zero_stage": zero_stage(config)}
    if "train_micro_batch_size_per_gpu" in config:
        extra["batch_size"] = config["train_micro_batch_size_per_gpu"]
    argv = program_argv(recipe, "deepspeed", resolved_args(recipe, world, extra))
    return argv, {CONFIG_FILE: json.dumps(config, indent=2) + "\n"}


def plan(recipe: Recipe) -> tuple[list[list[str]], dict[str, str], bool]:
    program, files = program_part(recipe, world_size(recipe))
    return [launcher_argv(recipe.get(SECTION) or {}) + program], files, True
