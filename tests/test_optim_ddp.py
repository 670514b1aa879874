"""Two gloo processes with half batches each give the same update as one process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from ddp_worker import METHODS, train

HERE = Path(__file__).parent


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(out, weights_only=True)
    for name, kwargs in METHODS.items():
        single = [p.detach() for p in train(name, kwargs).parameters()]
        for a, b in zip(single, distributed[name]):
            assert torch.allclose(a, b, atol=1e-6), f"{name}: {(a - b).abs().max()}"
