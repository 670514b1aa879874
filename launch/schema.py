"""Validate a recipe before anything starts: keys, types, and the cross-checks a cluster would find late
(world sizes, batch divisibility, hostfiles, DeepSpeed options the SAM family cannot honour)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

from ltsam_common import train_args
from ltsam_common.names import sam_method
from ltsam_launch import backends, program, scale
from ltsam_launch.backends import deepspeed, slurm, torchrun
from ltsam_launch.errors import RecipeError
from ltsam_launch.recipe import Recipe

SCALAR = (str, int, float, bool)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TRAINER = "ltsam.train"  # the program whose args the launcher checks against its parser


@dataclass(frozen=True)
class Field:
    """One leaf: accepted types, optional allowed values, optional minimum."""

    types: tuple[type, ...]
    choices: tuple[Any, ...] = ()
    minimum: int | None = None
    items: tuple[type, ...] = ()  # for lists: accepted item types


def _choice(*values: Any) -> Field:
    return Field(tuple({type(v) for v in values}), choices=values)


STR, BOOL, MAPPING = Field((str,)), Field((bool,)), Field((dict,))
INT, POSITIVE, PORT = Field((int,), minimum=0), Field((int,), minimum=1), Field((int,), minimum=0)
STR_LIST = Field((list,), items=(str,))
ENV = Field((dict,), items=SCALAR)
ARGS = Field((dict,), items=(*SCALAR, list, dict))

SCHEMA: dict[str, Any] = {
    "name": STR,
    "description": STR,
    "global_batch_size": POSITIVE,
    "scale": {"keep": _choice(*scale.KEEP), "lr_scale": _choice(*scale.LR_SCALES), "reference_world_size": POSITIVE},
    "precision": _choice("fp32", "bf16", "fp16"),
    "program": {"module": STR, "script": STR, "args": ARGS, "extra_args": STR_LIST},
    "launcher": {
        "kind": _choice(*backends.KINDS),
        "log_dir": STR,
        "python": STR,
        "env": ENV,
        "torchrun": {
            "executable": STR, "nnodes": Field((int, str)), "nproc_per_node": Field((int, str)),
            "rdzv_backend": _choice("c10d", "static"), "rdzv_endpoint": STR, "rdzv_id": Field((str, int)),
            "node_rank": INT, "master_addr": STR, "master_port": PORT, "max_restarts": INT, "standalone": BOOL,
            "extra_args": STR_LIST,
        },
        "deepspeed": {
            "executable": STR, "hostfile": STR, "include": STR, "exclude": STR, "num_nodes": POSITIVE,
            "num_gpus": POSITIVE, "master_addr": STR, "master_port": PORT, "node_rank": INT,
            "multinode_launcher": _choice("pdsh", "openmpi", "mpich", "impi", "mvapich", "slurm", "no_ssh"),
            "launcher_args": STR, "zero_stage": _choice(0, 1, 2, 3), "config_file": STR, "config": MAPPING,
            "local_rank_arg": BOOL, "extra_args": STR_LIST,
        },
        "slurm": {
            "executable": STR, "runner": _choice("torchrun", "deepspeed"), "nodes": POSITIVE,
            "gpus_per_node": POSITIVE, "cpus_per_task": POSITIVE, "partition": STR, "account": STR, "qos": STR,
            "time": STR, "mem": STR, "constraint": STR, "job_name": STR, "port": PORT, "sbatch_args": STR_LIST,
            "srun_args": STR_LIST, "setup": STR_LIST, "submit": BOOL,
            "requeue": BOOL, "signal": STR,
        },
    },
}
# what SLURM decides for the node launcher; setting it in the recipe too would be silently ignored
SET_BY_SLURM = {
    "torchrun": ("nnodes", "nproc_per_node", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "node_rank",
                 "master_addr", "master_port", "standalone"),
    "deepspeed": ("hostfile", "include", "exclude", "num_nodes", "num_gpus", "master_addr", "master_port",
                  "node_rank", "multinode_launcher"),
}


def validate(recipe: Recipe) -> None:
    """Raise RecipeError for the first problem; return quietly when the recipe can run as written."""
    _check_tree(recipe, recipe.data, SCHEMA, "")
    _check_program(recipe)
    kind = backends.kind(recipe)
    {"torchrun": _check_torchrun, "deepspeed": _check_deepspeed, "slurm": _check_slurm}.get(kind, _none)(recipe)
    if recipe.get("precision") and any(recipe.get(f"program.args.{k}") is not None for k in ("amp", "amp_dtype")):
        raise recipe.error("precision", "set precision or program.args.amp/amp_dtype, not both")
    _check_env(recipe)
    world = backends.world_size(recipe)
    _check_batch(recipe, world)
    _check_trainer_args(recipe, world)
    if kind == "deepspeed" or (kind == "slurm" and recipe.get("launcher.slurm.runner") == "deepspeed"):
        _check_ds_config(recipe, world)


def _none(recipe: Recipe) -> None:
    """Nothing more to check for the local launcher."""


def _type_name(field: Field) -> str:
    if field.choices:
        return "one of " + ", ".join(map(repr, field.choices))
    return " or ".join("mapping" if t is dict else t.__name__ for t in field.types)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """isinstance, except a bool is not an int and an int is a float."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def _check_tree(recipe: Recipe, node: dict[str, Any], spec: dict[str, Any], prefix: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if key not in spec:
            near = difflib.get_close_matches(str(key), list(spec), n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(spec)}"
            raise recipe.error(dotted, f"unknown key; {hint}")
        rule = spec[key]
        if isinstance(rule, dict):
            if not isinstance(value, dict):
                raise recipe.error(dotted, f"expected a mapping, got {type(value).__name__}")
            _check_tree(recipe, value, rule, dotted + ".")
        elif value is not None:
            _check_leaf(recipe, dotted, value, rule)


def _check_leaf(recipe: Recipe, dotted: str, value: Any, rule: Field) -> None:
    if not _is(value, rule.types) or (rule.choices and value not in rule.choices):
        raise recipe.error(dotted, f"expected {_type_name(rule)}, got {type(value).__name__}")
    if rule.minimum is not None and isinstance(value, int) and value < rule.minimum:
        raise recipe.error(dotted, f"must be at least {rule.minimum}")
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items if rule.items else ():
        if item is not None and not _is(item, rule.items):
            raise recipe.error(dotted, f"holds {item!r} ({type(item).__name__}); allowed: "
                                       + ", ".join("mapping" if t is dict else t.__name__ for t in rule.items))


def _check_program(recipe: Recipe) -> None:
    module, script = recipe.get("program.module"), recipe.get("program.script")
    if bool(module) == bool(script):
        raise recipe.error("program", "give exactly one of program.module (e.g. ltsam.train) or program.script")
    for key, value in (recipe.get("program.args") or {}).items():
        nested = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        if any(isinstance(v, dict) or (isinstance(v, list) and isinstance(value, list)) for v in nested):
            raise recipe.error(f"program.args.{key}", "only scalars, lists and flat mappings become flags")


def _check_trainer_args(recipe: Recipe, world: int | None) -> None:
    """`ltsam.train`'s args against its own parser (torch-free): a typo stops the dry run, not the job."""
    if recipe.get("program.module") != TRAINER:
        return
    flags = {option for action in train_args.build_parser()._actions for option in action.option_strings}
    for key in recipe.get("program.args") or {}:
        if "--" + str(key).replace("_", "-") not in flags:
            names = sorted(flag[2:].replace("-", "_") for flag in flags if flag.startswith("--"))
            near = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
            hint = f"did you mean {near[0]!r}?" if near else "see `ltsam train --help`"
            raise recipe.error(f"program.args.{key}", f"not a flag of ltsam train; {hint}")
    # a value the job's shell fills in (`$${SLURM_ARRAY_TASK_ID}`) is known only there: its flag is not parsed here
    known = {k: v for k, v in program.resolved_args(recipe, world).items() if "${" not in str(v)}
    extra = [str(a) for a in recipe.get("program.extra_args") or [] if "${" not in str(a)]
    problem = train_args.argv_problem(program.to_flags(known) + extra)
    if problem:
        where = "program.extra_args" if extra and any(a in problem for a in extra) else "program.args"
        raise RecipeError(recipe.source(where), where, f"ltsam train refuses it: {problem}")


def _check_torchrun(recipe: Recipe) -> None:
    section = torchrun.SECTION
    cfg = recipe.get(section) or {}
    for key in ("nnodes", "nproc_per_node"):
        value = cfg.get(key)
        if isinstance(value, int) and value < 1:
            raise recipe.error(f"{section}.{key}", "must be at least 1")
    nnodes = cfg.get("nnodes", 1)
    if isinstance(nnodes, str) and not _elastic(nnodes):
        raise recipe.error(f"{section}.nnodes", "expected an int or MIN:MAX")
    nproc = cfg.get("nproc_per_node", 1)
    if isinstance(nproc, str) and nproc not in ("auto", "cpu", "gpu", "xpu"):
        raise recipe.error(f"{section}.nproc_per_node", "expected an int or auto/cpu/gpu/xpu")
    backend = cfg.get("rdzv_backend", "static")
    static_only = [k for k in ("node_rank", "master_addr", "master_port") if cfg.get(k) is not None]
    if backend != "static" and static_only:
        raise recipe.error(f"{section}.{static_only[0]}", "only for rdzv_backend: static (c10d finds ranks itself)")
    multi_node = nnodes != 1
    if backend == "c10d" and multi_node and not str(cfg.get("rdzv_endpoint") or "").rpartition(":")[0].strip():
        raise recipe.error(f"{section}.rdzv_endpoint", "c10d on several nodes needs HOST:PORT of one node that every "
                                                       "node reaches (the host is empty)")
    if backend == "static" and isinstance(nnodes, int) and multi_node:
        if cfg.get("node_rank") is None or not cfg.get("master_addr"):
            raise recipe.error(section, "static rendezvous on several nodes needs node_rank and master_addr "
                                        "(or use rdzv_backend: c10d)", value=cfg)
        if cfg["node_rank"] >= nnodes:
            raise recipe.error(f"{section}.node_rank", f"must be below nnodes ({nnodes})")
    if cfg.get("standalone") and multi_node:
        raise recipe.error(f"{section}.standalone", "standalone is single-node; drop it or set nnodes: 1")


def _elastic(nnodes: str) -> bool:
    low, _, high = nnodes.partition(":")
    return low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)


def _check_deepspeed(recipe: Recipe) -> None:
    section = deepspeed.SECTION
    cfg = recipe.get(section) or {}
    sized = [k for k in ("num_nodes", "num_gpus") if cfg.get(k)]
    picked = [k for k in ("include", "exclude") if cfg.get(k)]
    if sized and picked:
        raise recipe.error(f"{section}.{picked[0]}", f"DeepSpeed does not combine include/exclude with {sized[0]}")
    if len(picked) == 2:
        raise recipe.error(f"{section}.exclude", "DeepSpeed takes include or exclude, not both")
    if not cfg.get("hostfile"):
        if picked or cfg.get("num_nodes", 1) > 1:
            raise recipe.error(f"{section}.{picked[0] if picked else 'num_nodes'}", "needs a hostfile")
        if not cfg.get("num_gpus"):
            raise recipe.error(f"{section}.num_gpus", "set num_gpus (or a hostfile) so the world size is known")
    if cfg.get("multinode_launcher") == "no_ssh" and (cfg.get("node_rank") is None or not cfg.get("master_addr")):
        raise recipe.error(f"{section}.multinode_launcher", "no_ssh runs once per node: set node_rank and "
                                                            "master_addr")


def _check_env(recipe: Recipe) -> None:
    """`launcher.env` keys become `export KEY=...` lines and process environment names: names only."""
    for key in recipe.get("launcher.env") or {}:
        if not ENV_NAME.fullmatch(str(key)):
            raise recipe.error(f"launcher.env.{key}", "not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")


def _check_slurm(recipe: Recipe) -> None:
    for key, option in slurm.header(recipe):
        if any(c in option for c in "\n\r\0"):
            raise recipe.error(key, "a line break or NUL cannot be written into an #SBATCH line", value=option)
    runner = recipe.get(f"{slurm.SECTION}.runner") or "torchrun"
    cfg = recipe.get(f"launcher.{runner}") or {}
    for key in SET_BY_SLURM[runner]:
        if cfg.get(key) is not None:
            raise recipe.error(f"launcher.{runner}.{key}", "set by the SLURM launcher (slurm.nodes, "
                                                           "slurm.gpus_per_node, slurm.port); remove it")


def _check_batch(recipe: Recipe, world: int | None) -> None:
    """The batch / lr rule (launch/scale.py) applies at this world size, or names the key that stops it."""
    scale.resolve(recipe, world)


def _check_ds_config(recipe: Recipe, world: int | None) -> None:
    config = deepspeed.ds_config(recipe, world)
    explicit = recipe.get(f"{deepspeed.SECTION}.zero_stage") is not None
    where = f"{deepspeed.SECTION}.{'zero_stage' if explicit else 'config_file'}"
    opt = sam_method(recipe.get("program.args.opt") or "")
    if deepspeed.zero_stage(config) == 3 and opt:
        raise recipe.error(where, f"ZeRO-3 partitions the weights, so {opt} cannot perturb them; use stage 0-2",
                           value=3)
    if (recipe.get("program.args.grad_accum_steps") or 1) > 1:
        raise recipe.error("program.args.grad_accum_steps", "ltsam train does not accumulate under DeepSpeed "
                                                            "(its step takes one whole batch); run it with torchrun")
    if "train_batch_size" not in config:
        raise recipe.error("global_batch_size", "DeepSpeed needs a batch size: set global_batch_size "
                                                "(or program.args.batch_size per process)", value=None)
    if world and config["train_batch_size"] % (world * config.get("gradient_accumulation_steps", 1)):
        raise recipe.error("global_batch_size", f"does not divide by world size {world} x gradient accumulation",
                           value=config["train_batch_size"])
    on_cpu = "cpu" in (recipe.get("program.args.device"), recipe.get("launcher.env.DS_ACCELERATOR"))
    if on_cpu and (config.get("fp16") or {}).get("enabled"):
        raise recipe.error("precision", "DeepSpeed has no fp16 on CPU; use bf16 or fp32", value="fp16")
