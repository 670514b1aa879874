"""The BatchNorm policy: the allow-list of batch-coupled layers (BatchNorm, EvoNorm-B), unknown layers with
running statistics, and the decision logged once (SyncBatchNorm's all-rank replay: tests/test_optim_ddp.py)."""

from __future__ import annotations

import copy
import logging

import official
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net
from test_optim_engine import HP, Counter, assert_state_close, make, reference_opt
from test_optim_exact import closure_for
from timm.layers import EvoNorm2dB0, EvoNorm2dS0
from torch import nn

import ltsam  # noqa: F401
from ltsam.optim.batchnorm import batch_policy

TAIL = torch.tensor([c for c, n in enumerate(CLASS_COUNTS) if n < 20])


def norm_net(norm) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), norm(8), nn.Conv2d(8, 8, 3, padding=1, stride=2), norm(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


class BatchStdNorm(nn.Module):
    """A custom layer that divides by the batch's standard deviation and keeps a running variance."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.var(dim=(0, 2, 3), keepdim=True)
        if self.training:
            self.running_var.lerp_(var.flatten().detach(), 0.1)
        return x / (var + 1e-5).sqrt()


def test_evonorm_b0_is_batch_coupled_and_its_running_var_replayed_exactly():
    torch.manual_seed(0)
    ours = norm_net(EvoNorm2dB0)
    ref = copy.deepcopy(ours)
    counter = Counter(ours)
    opt = make("ssesam", ours)
    ref_opt = reference_opt(ref)
    for x, y in batches(3):
        opt.step(closure_for(ours, x, y), targets=y)
        official.ssesam_step(ref, ref_opt, x, y, tail_classes=TAIL, head_rho=0.05, tail_rho=0.1)
    assert counter.samples == [16] * 9  # 3 full-batch forwards per step (the official 4th is replayed)
    assert_state_close(ours, ref)  # running_var included


def test_per_sample_layers_and_eval_mode_batchnorm_allow_subset_forwards():
    for model in (norm_net(EvoNorm2dS0), conv_bn_net().eval()):
        policy = batch_policy(model)
        assert not policy.coupled, type(model[1]).__name__
        model.train()
    assert batch_policy(norm_net(EvoNorm2dB0)).coupled
    assert [type(m).__name__ for m in batch_policy(conv_bn_net()).replayable] == ["BatchNorm2d"] * 2
    bn_act = timm.layers.BatchNormAct2d(8)
    assert batch_policy(nn.Sequential(bn_act)).replayable == [bn_act]


def test_unknown_layer_with_running_statistics_is_treated_as_coupled_and_named_once(caplog):
    torch.manual_seed(0)
    model = norm_net(BatchStdNorm)
    counter = Counter(model)
    opt = make("imbsam", model)
    with caplog.at_level(logging.INFO, logger="ltsam.optim"):
        for x, y in batches(2):
            opt.step(closure_for(model, x, y), targets=y)
    assert counter.samples == [16] * 4  # full-batch forwards, as with BatchNorm
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1 (BatchStdNorm)" in warnings[0].getMessage()
    assert "NOT replayed" in warnings[0].getMessage()


def test_the_decision_is_logged_once_and_again_when_it_changes(caplog):
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="sam", **HP).attach(model)
    x, y = batches(1)[0]
    with caplog.at_level(logging.INFO, logger="ltsam.optim"):
        for _ in range(2):
            opt.step(closure_for(model, x, y), targets=y)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        opt.step(closure_for(model, x, y), targets=y)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "BatchNorm2d x2 (buffers replayed)" in messages[0] and "no batch-coupled layer" in messages[1]


@pytest.mark.parametrize("name", ["sam", "focalsam"])
def test_batchnorm_act_from_timm_is_replayed_like_batchnorm(name):
    torch.manual_seed(0)
    ours = norm_net(timm.layers.BatchNormAct2d)
    plain = norm_net(nn.BatchNorm2d)
    plain.load_state_dict(ours.state_dict())  # BatchNormAct2d's default act is ReLU: same function as BN + ReLU
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, i, out: torch.relu(out))
    opt_ours, opt_plain = make(name, ours), make(name, plain)
    for x, y in batches(3):
        opt_ours.step(closure_for(ours, x, y), targets=y)
        opt_plain.step(closure_for(plain, x, y), targets=y)
    assert_state_close(ours, plain, tol=1e-6)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("epoch", [0, 1])  # SSE-SAM stage 1 replays once per step, stage 2 twice
def test_split_batchnorm_from_timm_is_replayed_split_by_split(epoch):
    """timm's SplitBatchNorm2d (train.py --split-bn) updates its own buffers from the first split only and each
    aux_bn from another split: a replay of the whole batch's statistics into it would be wrong."""
    torch.manual_seed(0)
    ours = timm.layers.convert_splitbn_model(conv_bn_net(), 2)
    ref = copy.deepcopy(ours)
    opt, ref_opt = make("ssesam", ours, epoch=epoch), reference_opt(ref)
    for x, y in batches(3):
        opt.step(closure_for(ours, x, y), targets=y)
        official.ssesam_step(ref, ref_opt, x, y, tail_classes=TAIL, head_rho=0.05 if epoch == 0 else 0.0,
                             tail_rho=0.1)
    assert_state_close(ours, ref, tol=1e-6)  # every split's running buffers included
