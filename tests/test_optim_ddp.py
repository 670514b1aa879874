"""Two gloo processes with half batches each give the same update as one process with the whole batch (also
with micro-batches, also when one rank has no tail sample, also on a ViT whose only tail sample a rank forwards
alone, also with dropout drawn per sample on a ViT and on a conv-BN net, whose plan takes each group's
gradients at w from its own forward), and SyncBatchNorm's replay uses the statistics of both."""

from __future__ import annotations

from pathlib import Path

import processes
import torch
from ddp_worker import METHODS, train
from torch import nn

HERE = Path(__file__).parent


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [*processes.torchrun(2), str(HERE / "ddp_worker.py"), str(out)]
    result = processes.run(cmd, env=processes.env_with(tests_on_path=True))
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(out, weights_only=True)
    runs = [(name, train(name, kwargs)) for name, kwargs in METHODS.items()]
    runs.append(("ssesam micro_batches=2, tail on rank 0 only", train("ssesam", METHODS["ssesam"],
                                                                      tail_in_first_half=True)))
    runs += [(f"{name} ViT, one tail sample alone on rank 1", train(name, kwargs, one_tail_vit=True))
             for name, kwargs in METHODS.items()]
    # with BatchNorm each rank normalises its half: one process with the same halves as micro-batches
    runs += [(f"{name} {dropout} with dropout", train(name, METHODS[name], dropout=dropout,
                                                      micro_batches=2 if dropout == "bn" else 1))
             for name in ("ssesam", "focalsam") for dropout in ("vit", "bn")]
    for name, single in runs:
        for a, b in zip(single.parameters(), distributed[name]):
            assert torch.allclose(a.detach(), b, atol=1e-6), f"{name}: {(a - b).abs().max()}"
    assert "subset_forward=True with SyncBatchNorm" in distributed["subset with syncbn"]
    # SyncBatchNorm on 4 + 7 samples replayed twice = two BatchNorm forwards of all 11
    torch.manual_seed(0)
    x = torch.randn(11, 4, 3, 3) * 3 + 1
    for state, momentum in zip(distributed["syncbn"], (None, 0.1)):
        single = nn.BatchNorm2d(4, momentum=momentum)
        single(x)
        single(x)
        for key, value in single.state_dict().items():
            assert torch.allclose(value.float(), state[key].float(), atol=1e-6), key
