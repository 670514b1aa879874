"""Run by tests/test_optim_deepspeed.py under torchrun: SSE-SAM through DeepSpeed on half batches."""

from __future__ import annotations

import os
import sys

import deepspeed
import timm
import torch
import torch.distributed as dist
from conftest import batches, conv_gn_net
from ddp_worker import METHODS
from test_optim_exact import closure_for

import ltsam.optim.deepspeed as ltsam_ds

if __name__ == "__main__":
    stage, out, names = int(sys.argv[1]), sys.argv[2], sys.argv[3:] or list(METHODS)
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for name in names:
        kwargs = METHODS[name]
        torch.manual_seed(0)
        model = conv_gn_net()
        opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.05, weight_decay=5e-4, **kwargs)
        config = {"train_micro_batch_size_per_gpu": 16 // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage}}
        engine, _, _ = ltsam_ds.initialize(model, opt, config)
        for x, y in batches(4):
            share = len(y) // world
            xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
            ltsam_ds.step(engine, opt, closure_for(engine.module, xs, ys), targets=ys)
        result[name] = [p.detach().clone() for p in engine.module.parameters()]
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    # DeepSpeed's CPU communication threads can abort the interpreter's own exit ("terminate called without an
    # active exception"); the result is on disk, so leave without running those destructors
    os._exit(0)
