"""Test-time ensembling (LIFT's TTE): each evaluation image is resized to (1 + 24/224) of the input size and
cut into five crops of the input size (corners and centre; ``ten`` adds their mirror images); the model's
logits are averaged over the crops. The transform yields a (crops, C, H, W) tensor per image, which
``ltsam.train.loop.evaluate`` recognises by its extra dimension."""

from __future__ import annotations

import torch
from torchvision import transforms as T

TTE_CROPS = {"five": 5, "ten": 10}
MARGIN = 24 / 224  # LIFT: resize to 224 + 24, crop 224


class _StackCrops:
    """Each crop to a normalised tensor, stacked (a class, not a lambda: loader workers pickle it)."""

    def __init__(self, mean, std) -> None:
        self.to_tensor = T.Compose([T.ToTensor(), T.Normalize(mean, std)])

    def __call__(self, crops) -> torch.Tensor:
        return torch.stack([self.to_tensor(crop) for crop in crops])


def tte_transform(data_config: dict, mode: str) -> T.Compose:
    """The evaluation transform of ``--tte five|ten`` for timm's data config (size, mean, std)."""
    size = data_config["input_size"][-1]
    crop = T.FiveCrop(size) if TTE_CROPS[mode] == 5 else T.TenCrop(size)
    return T.Compose([T.Resize(round(size * (1 + MARGIN))), crop,
                      _StackCrops(data_config["mean"], data_config["std"])])


def crop_mean_logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits, averaged over the crops of a (batch, crops, C, H, W) input."""
    batch, crops = x.shape[:2]
    return module(x.flatten(0, 1)).float().view(batch, crops, -1).mean(1)
