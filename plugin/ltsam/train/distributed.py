"""Process-group plumbing: start-up through timm, parameter broadcast, per-rank RNG, elastic restarts.

SAM-family optimizers all-reduce their own gradients, so their model is not wrapped in DDP; the ranks must
then start from identical weights (``broadcast_module``) and equalise BatchNorm buffers each epoch (timm's
``distribute_bn``).
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import init_distributed_device
from torch import nn
from torch.distributed.rendezvous import _rendezvous_handlers, register_rendezvous_handler, rendezvous

ATTEMPT_SCHEME = "ltsam-attempt"


def setup(args: argparse.Namespace) -> torch.device:
    """timm's ``init_distributed_device``: env:// (torchrun), gloo on CPU, nccl on CUDA.

    Under torchrun the agent's store outlives a failed group, and a restarted group reading it would find the
    dead workers' addresses (gloo: "connectFullMesh failed ... Connection refused"); every attempt therefore
    rendezvouses under its own key prefix.
    """
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if "TORCHELASTIC_RESTART_COUNT" in os.environ and getattr(args, "dist_url", None) is None:
        if ATTEMPT_SCHEME not in _rendezvous_handlers:
            register_rendezvous_handler(ATTEMPT_SCHEME, _attempt_rendezvous)
        args.dist_url = f"{ATTEMPT_SCHEME}://"
    return init_distributed_device(args)


def _attempt_rendezvous(url: str, **kwargs):
    """env:// rendezvous whose store keys are prefixed with torchrun's restart count."""
    store, rank, world_size = next(rendezvous("env://", **kwargs))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    yield dist.PrefixStore(f"ltsam/attempt_{attempt}", store), rank, world_size


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def restarted() -> bool:
    """True in a group torchrun restarted after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``--sync-bn``: BatchNorm statistics over the global batch (torch's SyncBatchNorm) instead of each rank's.

    One process needs nothing (its batch is the global batch). torch's SyncBatchNorm runs on CUDA (and XPU/HPU)
    only: on CPU it would fail at the first training forward, so it is refused here, before anything trains."""
    if not is_distributed():
        return model
    if device.type == "cpu":
        raise SystemExit("ltsam train: --sync-bn: torch's SyncBatchNorm does not run on CPU (gloo); train on GPUs "
                         "or drop --sync-bn (each rank then normalises over its own batch)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (what DDP's constructor does)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, 0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def rng_state() -> dict:
    """This process's torch, numpy and python RNG states, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_gather(local):
    """Every rank's ``local`` (any picklable value), in rank order, on every rank."""
    if not is_distributed():
        return [local]
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, local)
    return values


def gather(local):
    """Every rank's ``local`` (any picklable value) in rank order on rank 0, None on the others: for what only
    rank 0 writes, without a copy of every rank's value on every rank."""
    if not is_distributed():
        return [local]
    values: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, values, dst=0)
    return values


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value
