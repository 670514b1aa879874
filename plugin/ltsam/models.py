"""Small-image models of the long-tail papers, registered in timm so ``timm.create_model`` and ``--model`` find them.

* ``resnet32_cifar``: the 0.46 M-parameter CIFAR ResNet-32 of LDAM-DRW (kaidic/LDAM-DRW ``resnet_cifar.py``),
  used by Focal-SAM; ``use_norm=True`` gives its cosine (NormedLinear) head for LDAM.
* ``resnet34_cifar``: torchvision ``resnet34`` with a 3x3 stride-1 stem and no max-pool, as SSE-SAM and ImbSAM
  train on CIFAR (``reference/algorithms.md`` §12.1; the papers call it "ResNet-32").
* ``lt_cnn_small``: a ~94 k-parameter CNN for the embedded digits and MNIST, so CPU runs take seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
from torchvision.models.resnet import ResNet as TorchvisionResNet

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


class _Classifier(nn.Module):
    """The timm model surface the trainer and timm utilities use: features, head, classifier reset."""

    num_classes: int
    num_features: int
    head: nn.Module

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW: normalised features times normalised weight columns."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))


class _CifarBlock(nn.Module):
    """LDAM-DRW's BasicBlock with the parameter-free option-A shortcut (stride-2 subsample + zero channels)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes - in_planes if stride != 1 or in_planes != planes else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad is not None:
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return F.relu(out + shortcut)


class ResNetCifar(_Classifier):
    """ResNet-(6n+2) for 32x32 inputs with 16/32/64 channels (He et al., 2016, as in LDAM-DRW)."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 use_norm: bool = False) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNetCifar depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(_CifarBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.drop = nn.Dropout(drop_rate)
        self.head = NormedLinear(64, num_classes) if use_norm else nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


class ResNet34Cifar(_Classifier):
    """torchvision resnet34 with ``conv1 = Conv2d(in, 64, 3, 1, 1)`` and no max-pool (SSE-SAM's encoder)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> None:
        super().__init__()
        body = TorchvisionResNet(TorchvisionBasicBlock, [3, 4, 6, 3], num_classes=num_classes)
        body.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        body.maxpool = nn.Identity()
        self.head = body.fc
        body.fc = nn.Identity()
        self.body = body
        self.num_classes, self.num_features = num_classes, 512
        self.drop = nn.Dropout(drop_rate)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.body(x)  # global average pool over 4x4 = avg_pool2d(4) at 32x32 inputs


class SmallCNN(_Classifier):
    """Three conv-BN-ReLU layers and global pooling: works at 8x8 (digits) and 28x28 (MNIST)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_chans, width), *block(width, 2 * width), nn.MaxPool2d(2), *block(2 * width, 4 * width),
        )
        self.num_classes, self.num_features = num_classes, 4 * width
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def _cfg(**kwargs) -> dict:
    return {"num_classes": 10, "input_size": (3, 32, 32), "pool_size": None, "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR_MEAN, "std": CIFAR_STD, "first_conv": "conv1",
            "classifier": "head", **kwargs}


default_cfgs = generate_default_cfgs({
    "resnet32_cifar": _cfg(),
    "resnet34_cifar": _cfg(first_conv="body.conv1"),
    "lt_cnn_small": _cfg(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), first_conv="features.0"),
})


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """LDAM-DRW's 0.46 M ResNet-32 for CIFAR."""
    return build_model_with_cfg(ResNetCifar, "resnet32_cifar", pretrained, depth=32, **kwargs)


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> ResNet34Cifar:
    """torchvision ResNet-34 with a CIFAR stem (21.3 M params), SSE-SAM/ImbSAM's CIFAR model."""
    return build_model_with_cfg(ResNet34Cifar, "resnet34_cifar", pretrained, **kwargs)


@register_model
def lt_cnn_small(pretrained: bool = False, **kwargs) -> SmallCNN:
    """~94 k-parameter CNN for digits / MNIST on CPU (``in_chans`` defaults to 1)."""
    kwargs.setdefault("in_chans", 1)
    return build_model_with_cfg(SmallCNN, "lt_cnn_small", pretrained, **kwargs)
