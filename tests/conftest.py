"""Shared fixtures: small models and a long-tailed toy batch, all on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# ten classes, the last four have fewer than 20 samples: with eta=20 they are the tail
CLASS_COUNTS = [500, 300, 180, 100, 60, 36, 19, 12, 7, 4]


def conv_bn_net(num_classes: int = 10) -> nn.Module:
    """conv-BN-conv-BN-fc, the net of algorithms.md §9."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def conv_gn_net(num_classes: int = 10) -> nn.Module:
    """The same net with GroupNorm: no batch coupling, so subset forwards are exact."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def batches(steps: int, batch: int = 16, seed: int = 0, tail: bool = True):
    """Fixed random batches; every batch holds head and (unless tail=False) tail labels."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, 3, 8, 8, generator=gen)
        high = 6 if not tail else 10
        y = torch.randint(0, high, (batch,), generator=gen)
        if tail:
            y[0], y[1] = 8, 9
        out.append((x, y))
    return out


@pytest.fixture
def counts() -> list[int]:
    return list(CLASS_COUNTS)


@pytest.fixture(scope="module")
def one_thread():
    """In-process training on two cores shared with other tests: one intra-op thread avoids oversubscription;
    the module's previous thread count comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
