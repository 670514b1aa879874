"""Run a plan: write its files next to the run's output, start each command without a shell, forward
SIGINT/SIGTERM to the child and return the child's exit code (128 + N when a signal N ended it)."""

from __future__ import annotations

import signal
import subprocess
from types import FrameType

from ltsam_launch.backends import Plan, environment

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def write_files(plan: Plan) -> None:
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    for name, text in plan.files.items():
        (plan.log_dir / name).write_text(text)


def run(argv: list[str], env: dict[str, str]) -> int:
    """One command; the child gets its own session so a terminal Ctrl-C reaches it once, through us."""
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        if child:
            child[0].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        child.append(subprocess.Popen(argv, env=env, start_new_session=True))
        code = child[0].wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code


def execute(plan: Plan) -> int:
    """Write the files, then run the commands in order, stopping at the first failure."""
    write_files(plan)
    if not plan.execute:
        return 0
    env = environment(plan)
    for argv in plan.commands:
        code = run(argv, env)
        if code:
            return code
    return 0
