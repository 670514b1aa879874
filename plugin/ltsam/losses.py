"""Long-tail losses that return PER-SAMPLE values, as the SAM-family optimizers re-weight samples themselves.

Each loss is a cross-entropy on adjusted logits, ``CE(a(z), y)``, optionally re-weighted per class by
deferred re-weighting (DRW, Cao et al. 2019): from epoch ``drw_epoch`` on, sample i is weighted by
``w_{y_i}``, ``w_c = (1 - beta) / (1 - beta^{n_c})`` normalised to sum to C. Call ``set_epoch`` each epoch.

=======  =========================================================  ======================
name     adjusted logits ``a(z)``                                   source
=======  =========================================================  ======================
ce       z                                                          -
ldam     z - s * m_y on the target logit, m_c ~ n_c^{-1/4},        Cao et al. 2019
         max_c m_c = max_m; DRW from epoch 160 by default
la       z + tau * log pi_c, pi_c = n_c / N                         Menon et al. 2021
vs       z / Delta_c + tau * log pi_c, Delta_c = (n_max/n_c)^gamma  Kini et al. 2021
bsce     z + log n_c                                                Ren et al. 2020
=======  =========================================================  ======================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ltsam.counts import CountsLike, load_class_counts
from ltsam_common.names import LOSSES

REDUCTIONS = ("none", "mean", "sum")


def drw_weights(class_counts: Sequence[int], beta: float = 0.9999) -> torch.Tensor:
    """Effective-number class weights (Cui et al. 2019) normalised to sum to the number of classes."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    w = (1.0 - beta) / (1.0 - beta**n)
    return (w / w.sum() * len(n)).float()


class LongTailLoss(nn.Module):
    """Cross-entropy on ``adjust(logits, target)`` with optional DRW; subclasses override ``adjust``.

    ``reduction='none'`` (default) returns one loss per sample, ``w_{y_i} * CE_i`` under DRW; ``mean`` is the
    weighted mean ``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (PyTorch's, and official LDAM-DRW's, convention).
    """

    def __init__(
        self,
        class_counts: CountsLike,
        label_smoothing: float = 0.0,
        drw_epoch: int | None = None,
        beta: float = 0.9999,
        reduction: str = "none",
    ) -> None:
        super().__init__()
        counts = load_class_counts(class_counts)
        if min(counts) <= 0:
            empty = [c for c, n in enumerate(counts) if n <= 0]
            raise ValueError(f"classes {empty[:10]} have no training sample; long-tail losses need n_c > 0")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.register_buffer("counts", torch.tensor(counts, dtype=torch.float32))
        self.register_buffer("drw", drw_weights(counts, beta))
        self.label_smoothing = label_smoothing
        self.drw_epoch = drw_epoch
        self.reduction = reduction
        self.epoch = 0

    @property
    def log_prior(self) -> torch.Tensor:
        return torch.log(self.counts / self.counts.sum())

    def set_epoch(self, epoch: int) -> None:
        """Switches DRW on once ``epoch >= drw_epoch``."""
        self.epoch = epoch

    @property
    def weight(self) -> torch.Tensor | None:
        return self.drw if self.drw_epoch is not None and self.epoch >= self.drw_epoch else None

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = self.adjust(logits.float(), target)
        return F.cross_entropy(
            z, target, weight=self.weight, label_smoothing=self.label_smoothing, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return (
            f"classes={len(self.counts)}, drw_epoch={self.drw_epoch}, label_smoothing={self.label_smoothing}"
        )


class CrossEntropy(LongTailLoss):
    """Plain cross-entropy (DRW off unless ``drw_epoch`` is given: CE-DRW)."""


class LDAMLoss(LongTailLoss):
    """LDAM: margin ``m_c = max_m * (n_min / n_c)^{1/4}``, ``s * m_y`` subtracted from the target's raw logit.

    As SSE-SAM uses it with a plain Linear head: ``CE(z - s * m_y * onehot(y))``; DRW from epoch 160.
    """

    def __init__(
        self,
        class_counts: CountsLike,
        max_m: float = 0.5,
        s: float = 30.0,
        drw_epoch: int | None = 160,
        **kwargs,
    ) -> None:
        super().__init__(class_counts, drw_epoch=drw_epoch, **kwargs)
        m = self.counts.pow(-0.25)
        self.register_buffer("margins", m * (max_m / m.max()))
        self.s = s

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = torch.zeros_like(logits).scatter_(
            1, target[:, None], (self.s * self.margins[target])[:, None]
        )
        return logits - margin


class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted loss: ``CE(z + tau * log pi)`` (SSE-SAM uses tau = 0.75)."""

    def __init__(self, class_counts: CountsLike, tau: float = 1.0, **kwargs) -> None:
        super().__init__(class_counts, **kwargs)
        self.tau = tau

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits + self.tau * self.log_prior


class VSLoss(LongTailLoss):
    """Vector scaling: ``CE(z / Delta + iota)``, ``Delta_c = (n_max/n_c)^gamma``, ``iota_c = tau log pi_c``"""

    def __init__(self, class_counts: CountsLike, gamma: float = 0.05, tau: float = 0.75, **kwargs) -> None:
        super().__init__(class_counts, **kwargs)
        self.register_buffer("delta", (self.counts.max() / self.counts).pow(gamma))
        self.tau = tau

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits / self.delta + self.tau * self.log_prior


class BalancedSoftmaxLoss(LongTailLoss):
    """Balanced softmax: ``CE(z + log n_c)``."""

    def adjust(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return logits + torch.log(self.counts)


_LOSSES: dict[str, type[LongTailLoss]] = {
    "ce": CrossEntropy,
    "ldam": LDAMLoss,
    "la": LogitAdjustedLoss,
    "vs": VSLoss,
    "bsce": BalancedSoftmaxLoss,
}


def create_loss(name: str, class_counts: CountsLike, **kwargs) -> LongTailLoss:
    """Loss by name (``ce, ldam, la, vs, bsce``); ``class_counts`` a list or a counts JSON file."""
    if name not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)}")
    return _LOSSES[name](class_counts, **kwargs)
