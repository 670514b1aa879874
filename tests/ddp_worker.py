"""Run by tests/test_optim_ddp.py under torchrun: each rank steps on its half of every batch."""

from __future__ import annotations

import sys

import timm
import torch
import torch.distributed as dist
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from keyed_dropout import KeyedMasks, tag
from test_optim_dropout import dropout_bn_net, dropout_vit
from test_optim_exact import closure_for
from test_optim_property import vit

import ltsam  # noqa: F401
from ltsam.optim.batchnorm import StatsRecorder

DROPOUT_MODELS = {"vit": dropout_vit, "bn": dropout_bn_net}


def train(name: str, kwargs: dict, rank: int = 0, world: int = 1, micro_batches: int = 1,
          tail_in_first_half: bool = False, one_tail_vit: bool = False, dropout: str | None = None
          ) -> torch.nn.Module:
    """``tail_in_first_half``: the second half of every batch holds head classes only, so with 2 ranks the
    tail's passes run on rank 0 alone. ``one_tail_vit``: a timm ViT, and each batch's only tail sample sits in
    the second half, so rank 1 forwards it alone in its tail passes (and rank 0 has none). ``dropout``: a ViT
    or conv-BN net with dropout whose masks are drawn per (sample, point) (tests/keyed_dropout.py), the samples
    numbered over the whole batch, so ranks and micro-batches draw the same masks."""
    torch.manual_seed(0)
    if dropout:
        model = KeyedMasks(DROPOUT_MODELS[dropout]())
    else:
        model = vit() if one_tail_vit else conv_gn_net()
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.05, weight_decay=5e-4, **kwargs).attach(model)
    for x, y in batches(4):
        if dropout:
            x = tag(x)
            model.start_step()
        if tail_in_first_half:
            y = torch.cat([y[: len(y) // 2], y[len(y) // 2:] % 6])
        if one_tail_vit:
            y = y % 6
            y[11] = 9
        share = len(y) // world
        xs, ys = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        opt.step(closure_for(model, xs, ys), targets=ys, micro_batches=micro_batches)
    return model


def syncbn_replay(rank: int) -> list[dict]:
    """SyncBatchNorm buffers after replaying twice the statistics of this rank's share (4 or 7 samples of
    11); SyncBatchNorm has no CPU forward under torch.distributed, so the share is recorded directly."""
    torch.manual_seed(0)
    x = torch.randn(11, 4, 3, 3) * 3 + 1
    layers = [torch.nn.SyncBatchNorm(4, momentum=None), torch.nn.SyncBatchNorm(4, momentum=0.1)]
    recorder = StatsRecorder(layers)
    for layer in layers:
        recorder._record(layer, (x[:4] if rank == 0 else x[4:],), None)
    recorder.replay(2)
    return [layer.state_dict() for layer in layers]


METHODS = {
    "sam": dict(rho=0.05),
    "imbsam": dict(rho=0.1, eta=20, class_counts=CLASS_COUNTS),
    "ssesam": dict(head_rho=0.05, tail_rho=0.1, eta=20, epochs=10, class_counts=CLASS_COUNTS),
    "focalsam": dict(rho=0.2, class_counts=CLASS_COUNTS),
}

def subset_forward_with_syncbn() -> str:
    """The refusal of subset_forward=True with SyncBatchNorm (ranks would run different forwards)."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(conv_bn_net())
    opt = timm.optim.create_optimizer_v2(model, opt="sam", subset_forward=True).attach(model)
    x, y = batches(1)[0]
    try:
        opt.step(closure_for(model, x, y), targets=y)
    except ValueError as err:
        return str(err)
    return "not refused"


if __name__ == "__main__":
    dist.init_process_group("gloo")
    out = {}
    for name, kwargs in METHODS.items():
        model = train(name, kwargs, dist.get_rank(), dist.get_world_size())
        out[name] = [p.detach() for p in model.parameters()]
    model = train("ssesam", METHODS["ssesam"], dist.get_rank(), dist.get_world_size(), micro_batches=2,
                  tail_in_first_half=True)
    out["ssesam micro_batches=2, tail on rank 0 only"] = [p.detach() for p in model.parameters()]
    for name, kwargs in METHODS.items():
        model = train(name, kwargs, dist.get_rank(), dist.get_world_size(), micro_batches=2, one_tail_vit=True)
        out[f"{name} ViT, one tail sample alone on rank 1"] = [p.detach() for p in model.parameters()]
    for name in ("ssesam", "focalsam"):  # with BatchNorm: each group's forwards at w, one all-reduce per direction
        for dropout in DROPOUT_MODELS:
            model = train(name, METHODS[name], dist.get_rank(), dist.get_world_size(), dropout=dropout)
            out[f"{name} {dropout} with dropout"] = [p.detach() for p in model.parameters()]
    out["syncbn"] = syncbn_replay(dist.get_rank())
    out["subset with syncbn"] = subset_forward_with_syncbn()
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()
