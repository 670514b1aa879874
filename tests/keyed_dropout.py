"""Test instrument: dropout whose masks are a function of (layer, sample, point), so two schedules that forward
different subsets in a different order still drop the same units of each sample, and a count of how often each
sample is forwarded at each point.

The point is "w" while the weights are within ``tolerance`` of the step's starting weights (``start_step``),
"perturbed" otherwise. The sample is read from the input: ``tag(x)`` writes each sample's index into one pixel,
which every subset and every full-batch forward carries along.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from timm.layers import DropPath
from torch import nn


def tag(x: torch.Tensor) -> torch.Tensor:
    """A copy of the batch whose first pixel holds each sample's index (its key for the masks)."""
    x = x.clone()
    x.view(len(x), -1)[:, 0] = torch.arange(len(x), dtype=x.dtype)
    return x


class _Keyed:
    """Draws a keep mask per sample from (layer, sample, point); subclasses say its shape."""

    instrument: KeyedMasks
    layer: int

    def keep(self, x: torch.Tensor, p: float, per_sample: bool) -> torch.Tensor:
        ids, point = self.instrument.ids, self.instrument.point
        shape = (1,) * (x.dim() - 1) if per_sample else tuple(x.shape[1:])
        masks = []
        for i in ids.tolist():
            gen = torch.Generator().manual_seed((self.layer * 100_003 + i) * 2 + (point == "perturbed"))
            masks.append((torch.rand(shape, generator=gen) >= p).to(x.dtype) / (1 - p))
        return torch.stack(masks)


class KeyedDropout(_Keyed, nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep(x, self.p, per_sample=False) if self.training and self.p > 0 else x


class KeyedDropPath(_Keyed, DropPath):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep(x, self.drop_prob, per_sample=True) if self.training and self.drop_prob > 0 else x


class KeyedMasks(nn.Module):
    """Wraps a model: replaces its Dropout and DropPath layers by keyed ones (still Dropout / DropPath, so the
    engine sees random layers) and turns timm's fused attention off, whose dropout would draw inside SDPA."""

    def __init__(self, model: nn.Module, tolerance: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.tolerance = tolerance
        self.forwards: Counter[tuple[int, str]] = Counter()
        self.start: list[torch.Tensor] = []
        self.ids = torch.zeros(0, dtype=torch.long)
        self.point = "w"
        layer = 0
        for module in list(model.modules()):
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.Dropout):
                    keyed = KeyedDropout(child.p)
                elif isinstance(child, DropPath):
                    keyed = KeyedDropPath(child.drop_prob)
                else:
                    continue
                object.__setattr__(keyed, "instrument", self)  # not a submodule: no cycle in modules()
                keyed.layer, layer = layer, layer + 1
                setattr(module, child_name, keyed)
        self.layers = layer

    def start_step(self) -> None:
        """Record w (the step's starting weights) and forget the counts."""
        self.start = [p.detach().clone() for p in self.model.parameters()]
        self.forwards.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.ids = x.reshape(len(x), -1)[:, 0].round().long()
        with torch.no_grad():
            moved = sum(float((p - s).pow(2).sum()) for p, s in zip(self.model.parameters(), self.start))
        self.point = "w" if moved ** 0.5 < self.tolerance else "perturbed"
        if torch.is_grad_enabled():
            self.forwards.update((i, self.point) for i in self.ids.tolist())
        return self.model(x)


def keyed_pair(model: nn.Module) -> tuple[KeyedMasks, KeyedMasks]:
    """``model`` and an identical copy, each wrapped with its own instrument (so each counts its own forwards)."""
    twin = copy.deepcopy(model)
    return KeyedMasks(model), KeyedMasks(twin)
