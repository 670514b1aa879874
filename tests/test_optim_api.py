"""The optimizers as a user meets them: timm's registry, errors, checkpoints, mixed precision."""

from __future__ import annotations

import copy
import io
import json

import pytest
import timm
import timm.scheduler
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net
from test_optim_exact import closure_for
from torch import nn

import ltsam  # noqa: F401
from ltsam.optim import SSESAM
from ltsam_common.names import SAM_METHODS

NAMES = list(SAM_METHODS)


def test_every_name_is_in_timms_registry():
    listed = timm.optim.list_optimizers()
    for name in NAMES:
        assert name in listed
        assert timm.optim.get_optimizer_info(name).name == name


@pytest.mark.parametrize("name", NAMES)
def test_create_optimizer_v2_builds_each_with_timm_param_groups(name, tmp_path):
    counts_file = tmp_path / "counts.json"
    ltsam.counts.save_class_counts(CLASS_COUNTS, counts_file)
    extra = {} if name == "sam" else {"class_counts": str(counts_file)}
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt=name, lr=0.1, weight_decay=1e-3, epochs=3, **extra)
    assert type(opt.base_optimizer) is torch.optim.SGD
    # timm's groups: no weight decay on 1-d params, decay on the rest, shared with the base optimizer
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 1e-3]
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_base_can_be_any_timm_optimizer_and_gets_its_own_options():
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="sam", lr=1e-3, weight_decay=0.05, base="adamw",
                                         betas=(0.8, 0.99), eps=1e-6)
    assert type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.8, 0.99) and opt.param_groups[0]["eps"] == 1e-6
    assert "momentum" not in opt.param_groups[0]


def test_lr_scheduler_reaches_the_base_optimizer():
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="sam", lr=0.1)
    sched, _ = timm.scheduler.create_scheduler_v2(opt, sched="cosine", num_epochs=10, warmup_epochs=0)
    sched.step(5)
    assert opt.base_optimizer.param_groups[0]["lr"] < 0.1


def test_step_without_closure_targets_or_model_is_refused():
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="imbsam", class_counts=CLASS_COUNTS)
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="needs targets"):
        opt.step(closure_for(model, x, y))
    with pytest.raises(RuntimeError, match=r"opt.attach\(model\)"):
        opt.step(closure_for(model, x, y), targets=y)
    opt.attach(model)
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda idx=None: nn.functional.cross_entropy(model(x), y), targets=y)
    with pytest.raises(ValueError, match="target 10 is out of range for 10 classes"):
        opt.step(closure_for(model, x, y), targets=torch.full_like(y, 10))


def test_bad_construction_names_the_problem(tmp_path):
    model = conv_bn_net()
    with pytest.raises(ValueError, match="needs class_counts"):
        timm.optim.create_optimizer_v2(model, opt="ssesam")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        timm.optim.create_optimizer_v2(model, opt="ssesam", class_counts=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"counts": [1, 2]}))
    with pytest.raises(ValueError, match="bad.json.*class_counts"):
        timm.optim.create_optimizer_v2(model, opt="focalsam", class_counts=str(bad))
    with pytest.raises(ValueError, match="head_rho=-1"):
        timm.optim.create_optimizer_v2(model, opt="ssesam", class_counts=CLASS_COUNTS, head_rho=-1)
    with pytest.raises(ValueError, match="base='ssesam'"):
        timm.optim.create_optimizer_v2(model, opt="sam", base="ssesam")
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", class_counts=CLASS_COUNTS).attach(model)
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="needs epochs"):
        opt.step(closure_for(model, x, y), targets=y)


def test_ssesam_stage_switches_after_ceil_gamma_epochs():
    opt = SSESAM(conv_bn_net().parameters(), class_counts=CLASS_COUNTS, gamma=0.7, epochs=200)
    stages = []
    for _ in range(200):
        stages.append(opt.stage)
        opt.next_epoch()
    assert stages.count(1) == 140 and stages[140:] == [2] * 60


def test_state_dict_round_trip_continues_bit_identically():
    """Stop after 3 steps (inside SSE-SAM stage 1 -> 2), save through torch.save, resume in a new process
    image of the model and optimizer, and match an uninterrupted run exactly."""
    torch.manual_seed(0)
    model = conv_bn_net()
    kw = dict(lr=0.05, weight_decay=5e-4, class_counts=CLASS_COUNTS, eta=20, gamma=0.5, epochs=2)
    data = batches(6)

    def run(m, opt, chunk):
        for i, (x, y) in enumerate(chunk):
            opt.step(closure_for(m, x, y), targets=y)
            if i == 1:
                opt.next_epoch()

    straight = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(straight, opt="ssesam", **kw).attach(straight)
    run(straight, opt, data[:3])
    run(straight, opt, data[3:])

    first = copy.deepcopy(model)
    opt = timm.optim.create_optimizer_v2(first, opt="ssesam", **kw).attach(first)
    run(first, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # timm's CheckpointSaver/resume load with weights_only
    assert saved["optimizer"]["ltsam"]["epoch"] == 1
    assert any("momentum_buffer" in s for s in saved["optimizer"]["state"].values())

    resumed = conv_bn_net()
    resumed.load_state_dict(saved["model"])
    opt = timm.optim.create_optimizer_v2(resumed, opt="ssesam", **kw).attach(resumed)
    opt.load_state_dict(saved["optimizer"])
    assert opt.epoch == 1 and opt.state is opt.base_optimizer.state
    run(resumed, opt, data[3:])
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp16_grad_scaler_skips_a_non_finite_step_and_counts_it():
    torch.manual_seed(0)
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, class_counts=CLASS_COUNTS, eta=20,
                                         epochs=10).attach(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]

    def poisoned(index=None):
        losses = closure_for(model, x, y)(index)
        return losses * torch.tensor(float("inf"))

    opt.step(poisoned, targets=y, scaler=scaler)
    assert opt.skipped_steps == 1
    assert scaler.get_scale() == 2.0**11  # backed off once
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_grad_scaler_step_equals_unscaled_step():
    torch.manual_seed(0)
    a = conv_bn_net()
    b = copy.deepcopy(a)
    kw = dict(opt="focalsam", lr=0.05, class_counts=CLASS_COUNTS)
    opt_a = timm.optim.create_optimizer_v2(a, **kw).attach(a)
    opt_b = timm.optim.create_optimizer_v2(b, **kw).attach(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches(3):
        opt_a.step(closure_for(a, x, y), targets=y, scaler=scaler)
        opt_b.step(closure_for(b, x, y), targets=y)
    assert opt_a.skipped_steps == 0
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_bf16_autocast_closure_trains():
    torch.manual_seed(0)
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model, opt="ssesam", lr=0.05, class_counts=CLASS_COUNTS, eta=20,
                                         epochs=10).attach(model)
    x, y = batches(1)[0]

    def closure(index=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return closure_for(model, x, y)(index)

    losses = [float(opt.step(closure, targets=y)) for _ in range(5)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_sam_gradient_applied_through_a_surrogate_backward_equals_step():
    """The DeepSpeed path: G from sam_gradient(), handed over as the gradient of sum(p * G)."""
    torch.manual_seed(0)
    a = conv_bn_net()
    b = copy.deepcopy(a)
    kw = dict(opt="ssesam", lr=0.05, class_counts=CLASS_COUNTS, eta=20, epochs=10)
    opt_a = timm.optim.create_optimizer_v2(a, **kw).attach(a)
    opt_b = timm.optim.create_optimizer_v2(b, **kw).attach(b)
    for x, y in batches(3):
        opt_a.step(closure_for(a, x, y), targets=y)
        params, grads, _ = opt_b.sam_gradient(closure_for(b, x, y), targets=y)
        opt_b.zero_grad()
        sum((p * g).sum() for p, g in zip(params, grads)).backward()
        opt_b.base_optimizer.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
