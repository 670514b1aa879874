"""Run by tests/test_optim_ddp.py under torchrun: each rank steps on its half of every batch."""

from __future__ import annotations

import sys

import timm
import torch
import torch.distributed as dist
from conftest import CLASS_COUNTS, batches, conv_gn_net
from test_optim_exact import closure_for

import ltsam  # noqa: F401


def train(name: str, kwargs: dict, rank: int = 0, world: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    model = conv_gn_net()
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.05, weight_decay=5e-4, **kwargs).attach(model)
    for x, y in batches(4):
        share = len(y) // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.step(closure_for(model, xs, ys), targets=ys)
    return model


METHODS = {
    "sam": dict(rho=0.05),
    "imbsam": dict(rho=0.1, eta=20, class_counts=CLASS_COUNTS),
    "ssesam": dict(head_rho=0.05, tail_rho=0.1, eta=20, epochs=10, class_counts=CLASS_COUNTS),
    "focalsam": dict(rho=0.2, class_counts=CLASS_COUNTS),
}

if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = {}
    for name, kwargs in METHODS.items():
        model = train(name, kwargs, dist.get_rank(), dist.get_world_size())
        out[name] = [p.detach() for p in model.parameters()]
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()
