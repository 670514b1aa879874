"""Run by tests/test_train_options.py under torchrun (one process): SSE-SAM through DeepSpeed ZeRO 1 with the
gradient_clipping ``ltsam train`` derives from --clip-grad 0.05."""

from __future__ import annotations

import os
import sys
from argparse import Namespace
from pathlib import Path

import deepspeed
import timm
import torch
from conftest import batches, conv_gn_net
from ddp_worker import METHODS
from test_optim_exact import closure_for

import ltsam.optim.deepspeed as ltsam_ds
from ltsam.train.main import deepspeed_clipping

if __name__ == "__main__":
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = conv_gn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, weight_decay=5e-4, **METHODS["ssesam"])
    clipping = deepspeed_clipping(Namespace(clip_grad=0.05, clip_mode="norm"), {}, Path("ds_config.json"))
    config = {"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "gradient_clipping": clipping}
    engine, _, _ = ltsam_ds.initialize(model, opt, config)
    for x, y in batches(4):
        ltsam_ds.step(engine, opt, closure_for(engine.module, x, y), targets=y)
    torch.save([p.detach().clone() for p in engine.module.parameters()], sys.argv[1])
    os._exit(0)  # DeepSpeed's CPU communication threads can abort a normal exit (see deepspeed_worker.py)
