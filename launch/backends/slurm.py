"""`kind: slurm`: an sbatch script whose srun starts torchrun or deepspeed once on every node.

Values only known inside the job (node count, job id, head node, node id) are written as `${NAME}` and
expanded by the shell on each node; so is any `${NAME}` a recipe wrote as `$${NAME}`.

Preemption (`requeue: true`, the default): `#SBATCH --requeue` and `--signal=B:USR1@120` (`signal:`). The
batch shell traps the signal and sends SIGTERM to the job step; `ltsam.train` then checkpoints at the next
update and exits with REQUEUE_EXIT (ltsam.train.preempt); torchrun reports any failed child as its own exit
status 1, so the trainer also creates the marker file the script names in LTSAM_REQUEUE_MARKER
(ltsam_common.requeue). The script requeues the job when the step exits 75, the marker exists or the trap
fired; the job runs again with `--resume auto` (added for `ltsam.train`; a fresh folder just starts). torchrun
forwards SIGTERM to its workers and waits 30 s before SIGKILL, so an update plus a checkpoint must fit in that
time.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any

from ltsam_common.requeue import MARKER_ENV, REQUEUE_EXIT
from ltsam_common.train_args import LAUNCH_RECIPE_ENV
from ltsam_launch.backends import deepspeed, torchrun
from ltsam_launch.program import log_dir, program_argv, resolved_args, tool
from ltsam_launch.recipe import Recipe

SECTION = "launcher.slurm"
SCRIPT_FILE = "launch-job.sbatch"
HOSTFILE = "hostfile"
MARKER_FILE = "requeue"  # + .JOB_ID: created by a trainer that stopped for a requeue
SBATCH_OPTIONS = ("partition", "account", "qos", "time", "mem", "constraint", "cpus_per_task")
_SHELL_VAR = re.compile(r"(\$\{[A-Za-z_][A-Za-z0-9_]*\})")
_PLAIN = re.compile(r"[\w@%+=:,./-]+")
DEFAULT_SIGNAL = "USR1@120"


def world_size(recipe: Recipe) -> int:
    cfg = recipe.get(SECTION) or {}
    return cfg.get("nodes", 1) * cfg.get("gpus_per_node", 1)


def shell_quote(token: str) -> str:
    """shlex.quote, except `${NAME}` stays expandable: `--rdzv-endpoint="${HEAD_NODE}":29500`."""
    parts = [p for p in _SHELL_VAR.split(token) if p]
    return "".join(f'"{p}"' if _SHELL_VAR.fullmatch(p) else shlex.quote(p) for p in parts) or "''"


def interpreter(recipe: Recipe) -> str:
    """The one Python the job runs: `launcher.python`, else `python` as the `setup` lines leave it on PATH
    (e.g. after activating a venv), else the interpreter running the launcher (a path on shared storage)."""
    cfg = recipe.get(SECTION) or {}
    return recipe.get("launcher.python") or ("python" if cfg.get("setup") else sys.executable)


def node_command(recipe: Recipe) -> tuple[list[str], list[str], dict[str, str]]:
    """What srun runs on each node, the batch-script lines it needs first, and extra files to write.

    torchrun and deepspeed start as modules of the job's interpreter (`python -m torch.distributed.run`,
    `python -m deepspeed.launcher.runner`), so launcher and workers run the Python the setup lines chose."""
    cfg = recipe.get(SECTION) or {}
    port, gpus, world = cfg.get("port", 29500), cfg.get("gpus_per_node", 1), world_size(recipe)
    python = interpreter(recipe)
    if cfg.get("runner", "torchrun") == "torchrun":
        settings = {**(recipe.get(torchrun.SECTION) or {}), "standalone": False, "nnodes": "${SLURM_NNODES}",
                    "nproc_per_node": gpus, "rdzv_backend": "c10d", "rdzv_endpoint": f"${{HEAD_NODE}}:{port}",
                    "rdzv_id": "${SLURM_JOB_ID}"}
        program = program_argv(recipe, "torchrun", resolved_args(recipe, world))
        return torchrun.launcher_argv(settings, [python, "-m", "torch.distributed.run"]) + program, [], {}
    hostfile = log_dir(recipe) / f"{HOSTFILE}.${{SLURM_JOB_ID}}"
    settings = {**(recipe.get(deepspeed.SECTION) or {}), "hostfile": "${HOSTFILE}", "multinode_launcher": "no_ssh",
                "node_rank": "${SLURM_NODEID}", "master_addr": "${HEAD_NODE}", "master_port": port}
    program, files = deepspeed.program_part(recipe, world)
    lines = [f"export HOSTFILE={shell_quote(str(hostfile))}",
             f'scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\\$/ slots={gpus}/" > "$HOSTFILE"']
    return deepspeed.launcher_argv(settings, [python, "-m", "deepspeed.launcher.runner"]) + program, lines, files


def sbatch_quote(token: str) -> str:
    """One `#SBATCH` argument as sbatch reads it: sbatch splits on blanks, honours '...' / "..." and a
    backslash everywhere (also inside single quotes, unlike a shell), and ends the line at an unquoted `#`;
    so anything but plain characters goes in double quotes with `\\` and `"` escaped. shlex reads it alike."""
    if _PLAIN.fullmatch(token):
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def header(recipe: Recipe) -> list[tuple[str, str]]:
    """(recipe key, sbatch option) for every `#SBATCH` line; the key names what to fix in an error."""
    cfg: dict[str, Any] = recipe.get(SECTION) or {}
    out = log_dir(recipe)
    options = [(f"{SECTION}.job_name" if cfg.get("job_name") else "name",
                f"--job-name={cfg.get('job_name') or recipe.name}"),
               (f"{SECTION}.nodes", f"--nodes={cfg.get('nodes', 1)}"), (SECTION, "--ntasks-per-node=1"),
               (f"{SECTION}.gpus_per_node", f"--gpus-per-node={cfg.get('gpus_per_node', 1)}")]
    options += [(f"{SECTION}.{k}", f"--{k.replace('_', '-')}={cfg[k]}") for k in SBATCH_OPTIONS
                if cfg.get(k) is not None]
    options += [("launcher.log_dir", f"--chdir={Path.cwd()}"), ("launcher.log_dir", f"--output={out / 'slurm-%j.out'}")]
    options += [(f"{SECTION}.sbatch_args", str(a)) for a in cfg.get("sbatch_args") or []]
    if cfg.get("requeue", True):  # requeue on preemption or node failure; the signal goes to the batch shell
        options += [(f"{SECTION}.requeue", "--requeue"),
                    (f"{SECTION}.signal", f"--signal={batch_signal(cfg.get('signal'))}")]
    return options


def batch_signal(signal: str | None) -> str:
    """sbatch's `--signal` value, sent to the batch shell (`B:`), whose trap passes it on: `USR1@60` and
    `B:USR1@60` both mean that."""
    return "B:" + (signal or DEFAULT_SIGNAL).removeprefix("B:")


def script(recipe: Recipe) -> tuple[str, dict[str, str]]:
    """The sbatch script text and the files it refers to. Every recipe value is one quoted word; only the
    `setup` lines are shell, as written."""
    cfg: dict[str, Any] = recipe.get(SECTION) or {}
    command, prelude, files = node_command(recipe)
    env = [f"export {k}={shell_quote(str(v))}" for k, v in
           {LAUNCH_RECIPE_ENV: str(recipe.path), **(recipe.get("launcher.env") or {})}.items()]
    cpus = [f"--cpus-per-task={cfg['cpus_per_task']}"] if cfg.get("cpus_per_task") else []  # srun does not inherit it
    srun = ["srun", '--nodes="$SLURM_NNODES"', "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
            *map(shlex.quote, cfg.get("srun_args") or [])]
    requeue = cfg.get("requeue", True)
    inner = " ".join(shell_quote(t) for t in command + (resume_flags(recipe) if requeue else []))
    lines = ["#!/bin/bash", *(f"#SBATCH {sbatch_quote(option)}" for _, option in header(recipe)),
             "set -euo pipefail", *(cfg.get("setup") or []), *env,
             'export HEAD_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"', *prelude]
    step = f"{' '.join(srun)} bash -c {shlex.quote(inner)}"
    marker = shell_quote(str(Path.cwd() / log_dir(recipe) / f"{MARKER_FILE}.${{SLURM_JOB_ID}}"))  # cwd: --chdir
    return "\n".join(lines + (requeue_lines(step, marker) if requeue else [step])) + "\n", files


def requeue_lines(step: str, marker: str) -> list[str]:
    """The job step in the background (a trap runs only while the shell waits), the trap that passes the
    signal on as SIGTERM, and `scontrol requeue` when the run stopped at it: REQUEUE_EXIT, the trainer's
    marker file (what survives torchrun's exit status 1) or the trap fired."""
    return [
        f"export {MARKER_ENV}={marker}",
        f'rm -f "${MARKER_ENV}"  # a requeued job keeps its id: only a stop of this run counts',
        'stopping=0 step=""',
        "trap 'stopping=1; echo \"ltsam-launch: stop signal: asking the trainer to checkpoint\" >&2; "
        "kill -TERM \"$step\" 2>/dev/null || true' USR1 USR2 TERM",
        f"{step} &",
        "step=$!",
        'while :; do  # a trap interrupts wait: wait again until the step has ended',
        '  status=0; wait "$step" || status=$?',
        '  kill -0 "$step" 2>/dev/null || break',
        "done",
        f'if [ "$stopping" = 1 ] || [ "$status" = {REQUEUE_EXIT} ] || [ -e "${MARKER_ENV}" ]; then',
        '  echo "ltsam-launch: requeueing job $SLURM_JOB_ID; it resumes from its last checkpoint" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$status"',
    ]


def resume_flags(recipe: Recipe) -> list[str]:
    """`--resume auto` for `ltsam.train` unless the recipe resumes or overwrites itself: a requeued or
    resubmitted job continues its folder's newest complete checkpoint instead of being refused."""
    args = recipe.get("program.args") or {}
    if recipe.get("program.module") not in ("ltsam.train", "ltsam") or args.get("resume") or args.get("overwrite"):
        return []
    return ["--resume", "auto"]


def plan(recipe: Recipe) -> tuple[list[list[str]], dict[str, str], bool]:
    text, files = script(recipe)
    sbatch = (recipe.get(SECTION) or {}).get("executable") or tool("sbatch")
    command = [sbatch, str(log_dir(recipe) / SCRIPT_FILE)]
    return [command], {**files, SCRIPT_FILE: text}, bool((recipe.get(SECTION) or {}).get("submit", False))
