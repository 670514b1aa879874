"""Run by tests/test_frameworks_accelerate.py under torchrun (2 processes): the README's Accelerate loop.

Writes, from rank 0, the parameters after each configuration and the message of the refused
``accelerator.accumulate`` step."""

from __future__ import annotations

import functools
import sys

import timm
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from conftest import CLASS_COUNTS, batches, conv_gn_net
from torch.utils.data import DataLoader, TensorDataset

import ltsam  # noqa: F401
from ltsam.optim import unwrap

PER_PROCESS = 16
CONFIGS = {  # name: (method, options, mixed precision, micro-batches)
    "sam": ("sam", {}, "no", 1),
    "ssesam": ("ssesam", {"class_counts": CLASS_COUNTS, "epochs": 2, "gamma": 0.5}, "no", 1),
    "focalsam micro_batches=2": ("focalsam", {"class_counts": CLASS_COUNTS}, "no", 2),
    "imbsam bf16": ("imbsam", {"class_counts": CLASS_COUNTS}, "bf16", 1),
}


def dataset() -> TensorDataset:
    return TensorDataset(*map(torch.cat, zip(*batches(2))))


def create(model: torch.nn.Module, method: str, options: dict) -> torch.optim.Optimizer:
    return timm.optim.create_optimizer_v2(model, opt=method, lr=0.05, weight_decay=5e-4, **options)


def fresh_accelerator(**options) -> Accelerator:
    """An Accelerator with these options in a process that made others before (its state is a singleton)."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=True, **options)


def run(method: str, options: dict, mixed_precision: str, micro_batches: int) -> list[torch.Tensor]:
    """The README recipe: Accelerate places, shards and autocasts; the engine steps (and all-reduces)."""
    torch.manual_seed(0)
    accelerator = fresh_accelerator(mixed_precision=mixed_precision)
    model = conv_gn_net()
    opt = create(model, method, options)
    model, opt, loader = accelerator.prepare(model, opt, DataLoader(dataset(), batch_size=PER_PROCESS))
    net = accelerator.unwrap_model(model)  # the engine all-reduces itself: forwards on the unwrapped model
    sam = unwrap(opt).attach(net)
    for epoch in range(2):
        sam.set_epoch(epoch)
        for x, y in loader:
            def closure(index=None, x=x, y=y):
                xs, ys = (x, y) if index is None else (x[index], y[index])
                return torch.nn.functional.cross_entropy(net(xs).float(), ys, reduction="none")

            sam.set_targets(y)
            if micro_batches == 1:
                opt.step(closure)  # AcceleratedOptimizer.step: drops the return value, sam.last_loss keeps it
            else:
                sam.step(closure, micro_batches=micro_batches)
            assert torch.isfinite(sam.last_loss)
    result = [p.detach().float().clone() for p in net.parameters()]
    accelerator.free_memory()
    return result


def losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y, reduction="none")


def refused_accumulation() -> str:
    accelerator = fresh_accelerator(gradient_accumulation_steps=2)
    model = conv_gn_net()
    model, opt = accelerator.prepare(model, create(model, "sam", {}))
    unwrap(opt).attach(accelerator.unwrap_model(model))
    x, y = dataset().tensors
    try:
        for part in range(2):
            with accelerator.accumulate(model):
                xs, ys = x[part * 8:(part + 1) * 8], y[part * 8:(part + 1) * 8]
                opt.step(functools.partial(losses, model, xs, ys))
    except RuntimeError as err:
        return str(err)
    return "not refused"


if __name__ == "__main__":
    results = {name: run(*config) for name, config in CONFIGS.items()}
    results["accumulate"] = refused_accumulation()
    if PartialState().is_main_process:
        torch.save(results, sys.argv[1])
