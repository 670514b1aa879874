"""Each method against the official-style re-derivation in tests/official.py: parameters and BatchNorm
buffers agree within 1e-5 (fp32) over 5 steps of SGD with momentum and weight decay."""

from __future__ import annotations

import copy

import official
import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net
from torch import nn

import ltsam  # noqa: F401  (registers the optimizers)

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
TAIL = torch.tensor([c for c, n in enumerate(CLASS_COUNTS) if n < 20])


def make_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = conv_bn_net()
    return model, copy.deepcopy(model)


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def closure(index=None):
        xs, ys = (x, y) if index is None else (x[index], y[index])
        return nn.functional.cross_entropy(model(xs), ys, reduction="none")
    return closure


def run_ltsam(model, opt_name, steps, **kwargs):
    opt = timm.optim.create_optimizer_v2(
        model.parameters(), opt=opt_name, lr=LR, momentum=MOMENTUM, weight_decay=WD, base="momentum", **kwargs
    ).attach(model)
    for x, y in batches(steps):
        opt.step(closure_for(model, x, y), targets=y)
    return opt


def run_reference(model, step_fn, steps, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    for x, y in batches(steps):
        step_fn(model, opt, x, y, **kwargs)


def assert_same_state(a: nn.Module, b: nn.Module, tol: float = 1e-5) -> None:
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(ta.float(), tb.float(), atol=tol, rtol=0), f"{name} differs by {(ta - tb).abs().max()}"


def test_sam_matches_reference():
    ours, ref = make_pair()
    run_ltsam(ours, "sam", 5, rho=0.05)
    run_reference(ref, official.sam_step, 5, rho=0.05)
    assert_same_state(ours, ref)


def test_asam_matches_reference():
    ours, ref = make_pair()
    run_ltsam(ours, "sam", 5, rho=1.0, adaptive=True)
    run_reference(ref, official.sam_step, 5, rho=1.0, adaptive=True)
    assert_same_state(ours, ref)


def test_imbsam_matches_official():
    ours, ref = make_pair()
    run_ltsam(ours, "imbsam", 5, rho=0.1, eta=20, class_counts=CLASS_COUNTS)
    run_reference(ref, official.imbsam_step, 5, tail_classes=TAIL, rho=0.1)
    assert_same_state(ours, ref)


@pytest.mark.parametrize("stage", [1, 2])
def test_ssesam_matches_official_in_both_stages(stage):
    ours, ref = make_pair()
    opt = timm.optim.create_optimizer_v2(
        ours.parameters(), opt="ssesam", lr=LR, momentum=MOMENTUM, weight_decay=WD, base="momentum",
        head_rho=0.05, tail_rho=0.1, gamma=0.5, eta=20, epochs=2, class_counts=CLASS_COUNTS,
    ).attach(ours)
    opt.set_epoch(stage - 1)
    assert opt.stage == stage
    for x, y in batches(5):
        opt.step(closure_for(ours, x, y), targets=y)
    run_reference(ref, official.ssesam_step, 5, tail_classes=TAIL, head_rho=0.05 if stage == 1 else 0.0,
                  tail_rho=0.1)
    assert_same_state(ours, ref)


def test_focalsam_matches_official():
    ours, ref = make_pair()
    run_ltsam(ours, "focalsam", 5, rho=0.3, gamma=3.2, lam=0.8, class_counts=CLASS_COUNTS)
    run_reference(ref, official.focalsam_step, 5, class_counts=CLASS_COUNTS, rho=0.3, gamma=3.2, lam=0.8)
    assert_same_state(ours, ref)


def test_focalsam_with_lambda_above_one_keeps_negative_head_weights():
    """iNat uses lam=1.1: 1 - c_y < 0 for rare classes, unclipped as in the official code."""
    ours, ref = make_pair()
    run_ltsam(ours, "focalsam", 3, rho=0.2, gamma=2.0, lam=1.1, class_counts=CLASS_COUNTS)
    run_reference(ref, official.focalsam_step, 3, class_counts=CLASS_COUNTS, rho=0.2, gamma=2.0, lam=1.1)
    assert_same_state(ours, ref)
