"""How a stopped run asks its SLURM job to be requeued, through torchrun and DeepSpeed's runner alike.

A trainer stopped at a signal exits with ``REQUEUE_EXIT`` (``ltsam.train.preempt``), but torchrun turns any
failed child into its own exit status 1 (ChildFailedError), so the batch script cannot see the 75. The script
therefore also names a file in ``MARKER_ENV``: the trainer creates it when it stops for a requeue, and the
script requeues when the file exists. Torch-free, so the launcher and the trainer share the name.
"""

from __future__ import annotations

import os
from pathlib import Path

REQUEUE_EXIT = 75  # EX_TEMPFAIL: "try again later"; the value ltsam.train.preempt exits with
MARKER_ENV = "LTSAM_REQUEUE_MARKER"


def mark_requeue() -> Path | None:
    """Create the marker file the batch script checks, when the script named one; returns its path."""
    path = os.environ.get(MARKER_ENV)
    if not path:
        return None
    marker = Path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker
