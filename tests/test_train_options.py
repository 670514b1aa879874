"""``ltsam train``'s optimizer options against plain re-derivations: the official weight-decay profile,
--clip-grad with a SAM-family optimizer, and a scheduled radius."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import official
import pytest
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net
from test_optim_exact import LR, MOMENTUM, TAIL, WD, assert_same_state, closure_for

from ltsam.counts import save_class_counts
from ltsam.losses import create_loss
from ltsam.train.args import parse_args
from ltsam.train.loop import StepContext, train_step
from ltsam.train.main import build_optimizer
from ltsam_common.names import SAM_METHODS

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


METHOD_FLAGS = {"sam": [], "imbsam": ["--eta", "20"], "ssesam": ["--eta", "20"], "focalsam": []}


@pytest.mark.parametrize("method", SAM_METHODS)
def test_clip_grad_clips_the_sam_update_direction(tmp_path, method):
    """--clip-grad with a SAM-family optimizer: sam_gradient -> clip_grad_norm_(G) -> base step."""
    torch.manual_seed(1)
    ours = conv_bn_net()
    ref, unclipped = copy.deepcopy(ours), copy.deepcopy(ours)
    flags = ["--opt", method, *METHOD_FLAGS[method], "--opt-kwargs", "base=momentum"]
    _, ctx = trainer(tmp_path, ours, *flags, "--clip-grad", "0.05")
    reference, _ = trainer(tmp_path, ref, *flags)
    _, plain = trainer(tmp_path, unclipped, *flags)
    norms = []
    for x, y in batches(3):
        train_step(ctx, x, y)
        train_step(plain, x, y)
        params, update, _ = reference.sam_gradient(closure_for(ref, x, y), targets=y)
        for p, g in zip(params, update):
            p.grad = g
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        reference.base_optimizer.step()
    assert min(norms) > 0.05  # clipping was active at every step
    assert_same_state(ours, ref, tol=1e-6)
    gap = max((a - b).abs().max() for a, b in zip(ours.state_dict().values(), unclipped.state_dict().values()))
    assert gap > 1e-4  # and it changed the update


def test_clip_grad_under_deepspeed_is_gradient_clipping(tmp_path):
    from argparse import Namespace

    from ltsam.train.main import deepspeed_clipping

    args = Namespace(clip_grad=1.5, clip_mode="norm")
    assert deepspeed_clipping(args, {}, tmp_path) == 1.5
    assert deepspeed_clipping(Namespace(clip_grad=None, clip_mode="norm"), {}, tmp_path) == 0.0  # not DS's 1.0
    assert deepspeed_clipping(Namespace(clip_grad=None, clip_mode="norm"), {"gradient_clipping": 2}, tmp_path) == 2
    with pytest.raises(SystemExit, match="--clip-grad 1.5 and --deepspeed-config .* gradient_clipping 2 disagree"):
        deepspeed_clipping(args, {"gradient_clipping": 2}, tmp_path)
    with pytest.raises(SystemExit, match="--clip-mode value: DeepSpeed clips by norm only"):
        deepspeed_clipping(Namespace(clip_grad=1.0, clip_mode="value"), {}, tmp_path)


def test_clip_grad_with_a_grad_scaler_clips_the_unscaled_direction(tmp_path):
    """The clip runs inside the scaler's step, after unscaling: a scale of 1024 changes nothing."""
    torch.manual_seed(2)
    scaled = conv_bn_net()
    ref = copy.deepcopy(scaled)
    flags = ["--opt", "ssesam", "--eta", "20", "--clip-grad", "0.05"]
    _, ctx = trainer(tmp_path, scaled, *flags)
    ctx.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, plain = trainer(tmp_path, ref, *flags)
    for x, y in batches(3):
        train_step(ctx, x, y)
        train_step(plain, x, y)
    assert ctx.scaler.get_scale() == 1024.0  # no step was skipped
    assert_same_state(scaled, ref, tol=1e-6)
