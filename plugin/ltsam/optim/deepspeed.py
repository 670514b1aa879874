"""SAM-family steps under DeepSpeed (ZeRO 0, 1 and 2).

The engine computes the update direction G on the model's full, replicated parameters (its all-reduce makes
every perturbation use the global gradient); DeepSpeed then receives G as the gradient of the linear
surrogate sum(p * G), so its own machinery (ZeRO partitioning, bf16 master weights, clipping, the base
optimizer's step) applies it. ZeRO 3 partitions the parameters themselves, so no rank can perturb the full
weights: it is refused, as is fp16 (the engine's passes run unscaled; use bf16). DeepSpeed clips gradients
to norm 1.0 unless told otherwise; ltsam sets ``gradient_clipping: 0`` when the config is silent, so a run
under DeepSpeed makes the same update as one without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ltsam.optim.engine import LossClosure, SAMFamily


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed configuration ltsam cannot honour exactly."""


def check_config(config: dict[str, Any], optimizer: torch.optim.Optimizer, device_type: str = "cpu") -> dict:
    """Validate a ds_config for this optimizer; return it with clipping explicit and what a wrapped base needs."""
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    fp16 = bool(config.get("fp16", {}).get("enabled", False))
    if fp16 and device_type == "cpu":
        raise DeepSpeedConfigError("ds_config fp16.enabled=true: DeepSpeed has no fp16 on CPU; use bf16 or fp32")
    if isinstance(optimizer, SAMFamily):
        name = type(optimizer).__name__
        if stage == 3:
            raise DeepSpeedConfigError(
                f"ds_config zero_optimization.stage=3 with {name}: ZeRO 3 partitions the weights, so no rank "
                "can perturb them; use stage 0, 1 or 2"
            )
        if fp16:
            raise DeepSpeedConfigError(f"ds_config fp16.enabled=true with {name}: use bf16 (or fp32)")
        config = {**config, "zero_allow_untested_optimizer": True}
    return {"gradient_clipping": 0.0, **config}


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any], **kwargs):
    """``deepspeed.initialize`` for any optimizer; a SAM-family one hands DeepSpeed its base optimizer."""
    import deepspeed

    device_type = deepspeed.get_accelerator().device_name()
    config = check_config(config, optimizer, "cpu" if device_type == "cpu" else device_type)
    base = optimizer.base_optimizer if isinstance(optimizer, SAMFamily) else optimizer
    engine, _, loader, scheduler = deepspeed.initialize(model=model, optimizer=base, config=config, **kwargs)
    if isinstance(optimizer, SAMFamily):
        optimizer.attach(engine.module)
    return engine, loader, scheduler


def step(engine, optimizer: SAMFamily, closure: LossClosure, targets: Tensor | None = None,
         micro_batches: int = 1) -> Tensor:
    """One SAM-family update through a DeepSpeed engine (``micro_batches`` as in ``SAMFamily.step``); returns
    the batch's mean loss."""
    params, grads, loss = optimizer.sam_gradient(closure, targets, micro_batches=micro_batches)
    with torch.enable_grad():
        surrogate = sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads))
    engine.backward(surrogate)
    engine.step()
    return loss
