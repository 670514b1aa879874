"""Plain re-derivations of each method's step as the official code runs it (full-batch forwards, masks,
one backward per loss), written from reference/algorithms.md and independent of ltsam's engine."""

from __future__ import annotations

import torch
from torch import nn


def _grads(model: nn.Module) -> list[torch.Tensor | None]:
    """p.grad of each parameter; None where the backward did not reach it (the official codes skip those)."""
    return [p.grad.detach().clone() if p.grad is not None else None for p in model.parameters()]


def _sum(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _perturb(model: nn.Module, grads: list[torch.Tensor | None], rho: float, delta: float) -> list[torch.Tensor]:
    norm = torch.norm(torch.stack([g.norm(2) for g in grads if g is not None]), 2)
    eps = [torch.zeros_like(p) if g is None else g * (rho / (norm + delta)) for p, g in zip(model.parameters(), grads)]
    with torch.no_grad():
        for p, e in zip(model.parameters(), eps):
            p.add_(e)
    return eps


def _restore(model: nn.Module, eps: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, e in zip(model.parameters(), eps):
            p.sub_(e)


def _set_grads(model: nn.Module, grads: list[torch.Tensor | None]) -> None:
    """Gradients for the base step; a parameter without one keeps None, so torch's optimizers skip it."""
    for p, g in zip(model.parameters(), grads):
        p.grad = None if g is None else g.clone()


def per_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def sam_step(model, opt, x, y, rho, adaptive=False, bypass_bn=False):
    """davda54/sam: eps from the mean loss, second forward at w + eps, restore, base step. ``bypass_bn``:
    davda54's example/utility/bypass_bn.py, BatchNorm momentum 0 during the second forward (nothing else
    restored: num_batches_tracked counts both forwards)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if bypass_bn else []
    opt.zero_grad()
    per_sample(model, x, y).mean().backward()
    grads = _grads(model)
    params = [p.detach().clone() for p in model.parameters()]
    if adaptive:
        norm = torch.norm(torch.stack([(p.abs() * g).norm(2) for p, g in zip(params, grads)]), 2)
        eps = [p.pow(2) * g * (rho / (norm + 1e-12)) for p, g in zip(params, grads)]
        with torch.no_grad():
            for p, e in zip(model.parameters(), eps):
                p.add_(e)
    else:
        _perturb(model, grads, rho, 1e-12)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0
    opt.zero_grad()
    per_sample(model, x, y).mean().backward()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    with torch.no_grad():
        for p, old in zip(model.parameters(), params):
            p.copy_(old)
    opt.step()


def imbsam_step(model, opt, x, y, tail_classes, rho, tail_weight=2.0):
    """cool-xuan/Imbalanced_SAM trainval.py (2023-09-15): 2 forwards, 3 backwards."""
    batch = len(y)
    tail = torch.isin(y, tail_classes)
    opt.zero_grad()
    losses = per_sample(model, x, y)
    (losses[~tail].sum() / batch).backward(retain_graph=True)
    head_grads = _grads(model)
    opt.zero_grad()
    (tail_weight * losses[tail].sum() / batch).backward()
    eps = _perturb(model, _grads(model), rho, 1e-16)
    opt.zero_grad()
    (tail_weight * per_sample(model, x, y)[tail].sum() / batch).backward()
    _restore(model, eps)
    _set_grads(model, [_sum(h, g) for h, g in zip(head_grads, _grads(model))])
    opt.step()


def ssesam_step(model, opt, x, y, tail_classes, head_rho, tail_rho):
    """Zemdalk/SSE-SAM forbackward: 4 forwards, 4 backwards, head and tail perturbed one after the other."""
    batch = len(y)
    tail = torch.isin(y, tail_classes)
    total = None
    for mask, rho in ((~tail, head_rho), (tail, tail_rho)):
        opt.zero_grad()
        (per_sample(model, x, y)[mask].sum() / batch).backward()
        eps = _perturb(model, _grads(model), rho, 1e-16)
        opt.zero_grad()
        (per_sample(model, x, y)[mask].sum() / batch).backward()
        _restore(model, eps)
        grads = _grads(model)
        total = grads if total is None else [_sum(t, g) for t, g in zip(total, grads)]
    _set_grads(model, total)
    opt.step()


def focalsam_step(model, opt, x, y, class_counts, rho, gamma, lam):
    """scongl/Focal-SAM focal_sam_step: 2 forwards, 3 backwards, c_y = lam * (1 - pi_y) ** gamma."""
    batch = len(y)
    prior = torch.tensor(class_counts, dtype=torch.float64) / sum(class_counts)
    c = (lam * (1 - prior) ** gamma).float()[y]
    opt.zero_grad()
    losses = per_sample(model, x, y)
    ((1 - c) * losses).sum().div(batch).backward(retain_graph=True)
    other = _grads(model)
    opt.zero_grad()
    (c * losses).sum().div(batch).backward()
    eps = _perturb(model, _grads(model), rho, 1e-12)
    opt.zero_grad()
    (c * per_sample(model, x, y)).sum().div(batch).backward()
    _restore(model, eps)
    _set_grads(model, [_sum(o, g) for o, g in zip(other, _grads(model))])
    opt.step()
