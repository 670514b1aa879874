"""Layers that draw random numbers in training mode (dropout, stochastic depth), and what they mean for a step.

The official codes run every forward on the whole batch, and each forward draws new dropout masks. The engine
forwards subsets and takes several gradients of one forward, so its random draws cannot be the official ones
draw for draw; what it keeps is the structure that makes the step *equal in distribution*:

* every layer below draws each sample's mask independently of the other samples, so forwarding a subset
  draws that subset's masks as the whole-batch forward would;
* every gradient term of one sample at one point (w, or a group's w + eps) comes from one forward, as in the
  official codes (Focal-SAM's two gradients at w share the forward's masks): the plan never forwards a sample
  twice at a point with gradient. A compiled model, which gives one gradient per forward, is refused where it
  would need that (a Focal-SAM step: both of its weightings touch every sample);
* with BatchNorm a sample's gradient also depends on the other samples' masks, and the statistics the engine
  would replay were, in the official run, those of a repeated forward with fresh masks: with random layers
  active the engine runs the official forwards instead (each group's gradients at w from its own forward at
  w, the skipped forwards as forwards at w without gradient), so even torch's real draws are the official ones.

With the same masks per sample and point the step is then the official one (``tests/test_optim_dropout.py``);
where every pass is a whole-batch forward in the official order (``sam``, ``focalsam``) even torch's random
draws are the official ones. Allow-listed: torch's Dropout family, timm's DropPath and PatchDropout, each with a
positive rate in training mode. timm's DropBlock2d normalises its mask over the whole batch: it is
batch-coupled (:mod:`ltsam.optim.batchnorm`). Random draws inside a forward (``F.dropout`` called directly)
cannot be seen; they are per-sample in timm's models (e.g. a ResNet's ``drop_rate`` before its classifier). The
one such draw between BatchNorm layers in timm, a DenseNet layer's ``F.dropout`` (``proj_drop_rate``), is listed by
its rate: the replays must draw anew there.
"""

from __future__ import annotations

from timm.layers import DropBlock2d, DropPath, PatchDropout
from timm.models.densenet import DenseLayer
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

# each per-sample random layer and the attribute holding its rate
_RATES: tuple[tuple[type[nn.Module], str], ...] = (
    (_DropoutNd, "p"), (DropPath, "drop_prob"), (PatchDropout, "prob"),
    (DenseLayer, "drop_rate"),  # F.dropout inside its forward, before the next layer's BatchNorm
)


def is_random(module: nn.Module) -> bool:
    """True for an allow-listed per-sample random layer that draws in this forward (training, positive rate)."""
    return module.training and any(isinstance(module, kind) and getattr(module, rate) > 0 for kind, rate in _RATES)


def is_batch_coupled_random(module: nn.Module) -> bool:
    """A random layer whose output for one sample depends on the others' draws (DropBlock2d's batch-wide scale)."""
    return isinstance(module, DropBlock2d) and module.training and module.drop_prob > 0
