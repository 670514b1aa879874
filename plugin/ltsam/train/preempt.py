"""Stopping at a signal without losing work: SIGTERM (what SLURM and torchrun send before a kill), SIGUSR1, or
a first SIGINT (Ctrl-C; a second one interrupts at once).

The handler only records the signal. The loop sums the record over ranks together with each update's loss
(no extra collective), so every rank stops after the same update; the trainer then writes a checkpoint holding
the position inside the epoch and exits with ``REQUEUE_EXIT``, which ``ltsam-launch``'s SLURM script turns
into ``scontrol requeue``. The requeued run (``--resume auto``) continues bit-identically.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from ltsam_common.requeue import REQUEUE_EXIT as REQUEUE_EXIT  # the one value, re-exported for the trainer

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# test-only: the process of rank LTSAM_SIGNAL_RANK (default 0) sends itself SIGTERM right after update
# LTSAM_SIGNAL_AT_STEP, as SLURM would at that moment
SIGNAL_ENV = ("LTSAM_SIGNAL_AT_STEP", "LTSAM_SIGNAL_RANK")


class Preempted(Exception):
    """The run stopped at a signal after writing its checkpoint; the message says where and how to go on."""


class StopRequest:
    """Context manager: while inside, SIGTERM / SIGUSR1 / a first SIGINT are recorded instead of ending the
    process; after a first SIGINT the next one raises KeyboardInterrupt, as Python's own handler does."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python handles signals only there
            self._previous = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    @property
    def flag(self) -> float:
        """1.0 once a stop signal arrived: summed over ranks with the loss, any rank's signal stops all."""
        return 0.0 if self.signum is None else 1.0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def fault_hook_due(step: int, at_variable: str, rank_variable: str, default_rank: int) -> bool:
    """Whether a test-only hook fires now: this process's rank is the chosen one and ``step`` the chosen update."""
    at = os.environ.get(at_variable)
    return at is not None and int(at) == step and \
        int(os.environ.get("RANK", "0")) == int(os.environ.get(rank_variable, default_rank))


def maybe_signal(step: int) -> None:
    """The test hook of ``SIGNAL_ENV``."""
    if fault_hook_due(step, *SIGNAL_ENV, default_rank=0):
        os.kill(os.getpid(), signal.SIGTERM)
