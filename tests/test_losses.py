"""Each long-tail loss against its closed form, written out with plain Python math."""

from __future__ import annotations

import math

import pytest
import torch

from ltsam.counts import save_class_counts
from ltsam.losses import create_loss
from ltsam_common.names import LOSSES

COUNTS = [100, 10, 1]
LOGITS = [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]]
TARGETS = [0, 1, 2]


def _ce(z: list[float], y: int) -> float:
    return math.log(sum(math.exp(v) for v in z)) - z[y]


def _run(name: str, **kw) -> list[float]:
    loss = create_loss(name, COUNTS, **kw)
    return loss(torch.tensor(LOGITS), torch.tensor(TARGETS)).tolist()


def _close(got: list[float], expected: list[float]) -> None:
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_cross_entropy_per_sample():
    _close(_run("ce"), [_ce(z, y) for z, y in zip(LOGITS, TARGETS)])


def test_label_smoothing():
    eps = 0.1
    expected = []
    for z, y in zip(LOGITS, TARGETS):
        lse = math.log(sum(math.exp(v) for v in z))
        expected.append((1 - eps) * (lse - z[y]) + eps / 3 * sum(lse - v for v in z))
    _close(_run("ce", label_smoothing=eps), expected)


def test_logit_adjusted():
    tau = 0.75
    prior = [n / sum(COUNTS) for n in COUNTS]
    expected = [_ce([v + tau * math.log(p) for v, p in zip(z, prior)], y) for z, y in zip(LOGITS, TARGETS)]
    _close(_run("la", tau=tau), expected)


def test_balanced_softmax():
    expected = [_ce([v + math.log(n) for v, n in zip(z, COUNTS)], y) for z, y in zip(LOGITS, TARGETS)]
    _close(_run("bsce"), expected)


def test_vs():
    gamma, tau = 0.05, 0.75
    prior = [n / sum(COUNTS) for n in COUNTS]
    delta = [(max(COUNTS) / n) ** gamma for n in COUNTS]
    expected = [
        _ce([v / d + tau * math.log(p) for v, d, p in zip(z, delta, prior)], y)
        for z, y in zip(LOGITS, TARGETS)
    ]
    _close(_run("vs"), expected)


def test_ldam_margin_and_drw():
    s = 30.0
    # m_c = 0.5 * (n_min / n_c)^(1/4): the rarest class gets the full 0.5
    margins = [0.5 * (1 / n) ** 0.25 for n in COUNTS]
    expected = []
    for z, y in zip(LOGITS, TARGETS):
        shifted = [v - (s * margins[y] if c == y else 0.0) for c, v in enumerate(z)]
        expected.append(_ce(shifted, y))
    loss = create_loss("ldam", COUNTS)
    x, t = torch.tensor(LOGITS), torch.tensor(TARGETS)
    _close(loss(x, t).tolist(), expected)
    loss.set_epoch(159)
    _close(loss(x, t).tolist(), expected)  # DRW starts at epoch 160
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [3 * r / sum(raw) for r in raw]
    loss.set_epoch(160)
    _close(loss(x, t).tolist(), [w[y] * e for y, e in zip(TARGETS, expected)])
    loss.reduction = "mean"
    weighted_mean = sum(w[y] * e for y, e in zip(TARGETS, expected)) / sum(w[y] for y in TARGETS)
    assert loss(x, t).item() == pytest.approx(weighted_mean, rel=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_every_listed_loss_builds_and_is_a_trainer_choice(name):
    """The one list of loss names drives the factory and ``ltsam train --loss``: neither may miss a name."""
    from ltsam_common.train_args import build_parser

    loss = create_loss(name, COUNTS)
    assert loss(torch.tensor(LOGITS), torch.tensor(TARGETS)).shape == (3,)
    loss_flag = next(a for a in build_parser()._actions if a.dest == "loss")
    assert tuple(loss_flag.choices) == LOSSES


def test_factory_errors_and_counts_file(tmp_path):
    with pytest.raises(ValueError, match=f"unknown loss 'focal'; valid names: {', '.join(LOSSES)}"):
        create_loss("focal", COUNTS)
    with pytest.raises(ValueError, match=r"classes \[1\] have no training sample"):
        create_loss("la", [5, 0, 1])
    path = save_class_counts(COUNTS, tmp_path / "counts.json")
    assert create_loss("bsce", path)(torch.tensor(LOGITS), torch.tensor(TARGETS)).shape == (3,)


def test_gradients_flow_per_sample():
    x = torch.tensor(LOGITS, requires_grad=True)
    losses = create_loss("vs", COUNTS)(x, torch.tensor(TARGETS))
    losses[1].backward()
    assert x.grad[0].abs().sum() == 0 and x.grad[1].abs().sum() > 0
