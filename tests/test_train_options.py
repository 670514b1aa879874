"""``ltsam train``'s optimizer options against plain re-derivations: the official weight-decay profile,
--clip-grad with a SAM-family optimizer, and a scheduled radius."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import official
import pytest
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net
from test_optim_exact import LR, MOMENTUM, TAIL, WD, assert_same_state

from ltsam.counts import save_class_counts
from ltsam.losses import create_loss
from ltsam.train.args import parse_args
from ltsam.train.loop import StepContext, train_step
from ltsam.train.main import build_optimizer

SSESAM = ["--opt", "ssesam", "--eta", "20", "--opt-kwargs", "base=momentum", "head_rho=0.05", "tail_rho=0.1"]


def trainer(tmp_path, model, *flags: str):
    """The optimizer and step context ``ltsam train`` builds from these flags (same lr, momentum, wd as the
    re-derivations in test_optim_exact)."""
    args = parse_args(["--lr", str(LR), "--momentum", str(MOMENTUM), "--weight-decay", str(WD), *flags])
    counts = save_class_counts(CLASS_COUNTS, tmp_path / "counts.json")
    optimizer = build_optimizer(args, model, counts)
    if hasattr(optimizer, "attach"):
        optimizer.attach(model)
    criterion = create_loss("ce", CLASS_COUNTS)
    return optimizer, StepContext(model, model, optimizer, criterion, nullcontext, None, args.clip_grad,
                                  args.clip_mode)


def test_official_wd_profile_decays_every_parameter_as_the_official_code(tmp_path):
    torch.manual_seed(0)
    ours = conv_bn_net()
    ref, timm_grouped = copy.deepcopy(ours), copy.deepcopy(ours)
    optimizer, ctx = trainer(tmp_path, ours, *SSESAM, "--wd-profile", "official")
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == WD for p in ours.parameters())  # 1-d parameters (bias, BN) decayed too
    _, timm_ctx = trainer(tmp_path, timm_grouped, *SSESAM)  # the default profile: timm's grouping
    reference = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches(4):
        train_step(ctx, x, y)
        train_step(timm_ctx, x, y)
        official.ssesam_step(ref, reference, x, y, tail_classes=TAIL, head_rho=0.05, tail_rho=0.1)
    assert_same_state(ours, ref)
    bias_gap = max((a - b).abs().max() for a, b in zip(timm_grouped.parameters(), ref.parameters())
                   if a.dim() == 1)
    assert bias_gap > 1e-5  # timm's profile leaves 1-d parameters undecayed: a different update


def test_official_wd_profile_refuses_a_competing_grouping(tmp_path):
    with pytest.raises(SystemExit, match="filter_bias_and_bn groups parameters, --wd-profile official"):
        trainer(tmp_path, conv_bn_net(), "--wd-profile", "official", "--opt-kwargs", "filter_bias_and_bn=True")
