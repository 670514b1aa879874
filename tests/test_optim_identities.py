"""Identities between the methods (algorithms.md §9) and the pass budget of each step."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import CLASS_COUNTS, batches, conv_bn_net, conv_gn_net
from test_optim_exact import closure_for
from torch import nn

import ltsam  # noqa: F401

HP = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, base="momentum")


def train(model, opt_name, steps=4, tail=True, epoch=0, **kwargs):
    opt = timm.optim.create_optimizer_v2(model.parameters(), opt=opt_name, **HP, **kwargs).attach(model)
    opt.set_epoch(epoch)
    for x, y in batches(steps, tail=tail):
        opt.step(closure_for(model, x, y), targets=y)
    return opt


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a, b, tol=1e-6):
    for pa, pb in zip(a, b):
        assert torch.allclose(pa, pb, atol=tol, rtol=0), (pa - pb).abs().max()


def test_ssesam_stage2_equals_imbsam_with_tail_weight_one():
    torch.manual_seed(0)
    a = conv_bn_net()
    b = copy.deepcopy(a)
    train(a, "ssesam", head_rho=0.05, tail_rho=0.1, gamma=0.5, eta=20, epochs=2, epoch=1, class_counts=CLASS_COUNTS)
    train(b, "imbsam", rho=0.1, eta=20, tail_weight=1.0, class_counts=CLASS_COUNTS)
    assert_params_close(params_of(a), params_of(b), tol=0)


def test_focalsam_lambda1_gamma0_equals_sam():
    torch.manual_seed(0)
    a = conv_bn_net()
    b = copy.deepcopy(a)
    train(a, "focalsam", rho=0.1, lam=1.0, gamma=0.0, class_counts=CLASS_COUNTS)
    train(b, "sam", rho=0.1)
    assert_params_close(params_of(a), params_of(b))


@pytest.mark.parametrize("name,kwargs", [
    ("sam", dict(rho=0.0)),
    ("imbsam", dict(rho=0.0, tail_weight=1.0, class_counts=CLASS_COUNTS)),
    ("ssesam", dict(head_rho=0.0, tail_rho=0.0, epochs=10, class_counts=CLASS_COUNTS)),
    ("focalsam", dict(rho=0.0, class_counts=CLASS_COUNTS)),
])
def test_radius_zero_equals_base_optimizer(name, kwargs):
    torch.manual_seed(0)
    a = conv_bn_net()
    b = copy.deepcopy(a)
    train(a, name, **kwargs)
    opt = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for x, y in batches(4):
        opt.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    assert_params_close(params_of(a), params_of(b))


def step_seeing_offsets(model: nn.Module, opt) -> list[list[torch.Tensor]]:
    """One step on the first test batch; for each forward, how far each parameter is from w."""
    x, y = batches(1)[0]
    w = params_of(model)
    seen = []

    def closure(index=None):
        seen.append([p.detach() - p0 for p, p0 in zip(model.parameters(), w)])
        return closure_for(model, x, y)(index)

    opt.step(closure, targets=y)
    return seen


@pytest.mark.parametrize("adaptive,rho", [(False, 0.07), (True, 0.7)])
def test_perturbation_has_norm_rho(adaptive, rho):
    torch.manual_seed(0)
    model = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(model.parameters(), opt="sam", rho=rho, adaptive=adaptive, **HP)
    opt.attach(model)
    w = params_of(model)
    seen = step_seeing_offsets(model, opt)
    eps = seen[1]
    if adaptive:
        # ASAM: ||eps / |w| || = rho (entries with w = 0 get eps = 0 and drop out)
        norm = torch.cat([(e[p0 != 0] / p0[p0 != 0].abs()) for e, p0 in zip(eps, w)]).norm()
    else:
        norm = torch.cat([e.flatten() for e in eps]).norm()
    assert abs(norm.item() - rho) < 1e-5 * rho
    assert all(bool((e == 0).all()) for e in seen[0])  # the first forward runs at w


@pytest.mark.parametrize("name,kwargs", [
    ("imbsam", dict(rho=0.1, eta=20)),
    ("ssesam", dict(head_rho=0.05, tail_rho=0.1, eta=20, epochs=10)),
])
def test_batch_without_tail_gives_no_nan(name, kwargs):
    torch.manual_seed(0)
    model = conv_bn_net()
    opt = train(model, name, tail=False, class_counts=CLASS_COUNTS, **kwargs)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())
    # with no tail sample the tail group costs no pass: only the head's perturbation (SSE-SAM) or nothing
    assert opt.last_passes.forward == (2 if name == "ssesam" else 1)


class PassCounter:
    """Counts forwards and backwards through the classifier, independently of the engine's own count."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = self.backward = 0
        self.samples: list[int] = []
        head = model[-1]
        head.register_forward_hook(self._on_forward)
        head.register_full_backward_pre_hook(self._on_backward)

    def _on_forward(self, module, inputs, output):
        self.forward += 1
        self.samples.append(inputs[0].shape[0])

    def _on_backward(self, module, grad_output):
        self.backward += 1


def test_subset_forward_without_batchnorm_is_exact_and_smaller():
    """GroupNorm does not couple samples: every pass forwards only its group's samples, same update."""
    torch.manual_seed(0)
    a = conv_gn_net()
    b = copy.deepcopy(a)
    counter = PassCounter(a)
    kw = dict(head_rho=0.05, tail_rho=0.1, eta=20, epochs=10, class_counts=CLASS_COUNTS)
    train(a, "ssesam", steps=3, **kw)
    train(b, "ssesam", steps=3, subset_forward=False, **kw)
    assert_params_close(params_of(a), params_of(b), tol=1e-6)
    tails = [int((y >= 6).sum()) for _, y in batches(3)]
    # per step: head and tail at w (perturbation directions), then head and tail at their perturbed weights
    assert counter.samples == [n for t in tails for n in (16 - t, t, 16 - t, t)]


@pytest.mark.parametrize("name,kwargs,epoch", [
    ("imbsam", dict(rho=0.1, eta=20), 0),
    ("ssesam", dict(head_rho=0.05, tail_rho=0.1, eta=20, gamma=0.5, epochs=2), 1),
    ("focalsam", dict(rho=0.2), 0),
])
def test_subset_forward_is_exact_for_every_method(name, kwargs, epoch):
    torch.manual_seed(0)
    a = conv_gn_net()
    b = copy.deepcopy(a)
    train(a, name, steps=3, epoch=epoch, class_counts=CLASS_COUNTS, **kwargs)
    train(b, name, steps=3, epoch=epoch, class_counts=CLASS_COUNTS, subset_forward=False, **kwargs)
    assert_params_close(params_of(a), params_of(b), tol=1e-6)
