"""ltsam: long-tailed classification with sharpness-aware optimizers, as a timm plugin.

Importing the package registers ``sam``, ``imbsam``, ``ssesam`` and ``focalsam`` in timm's optimizer
registry, so ``timm.optim.create_optimizer_v2(model, opt="ssesam", ...)`` works.
"""

from ltsam import models as models  # registers the CIFAR / digits models in timm
from ltsam.optim import register as _register_optimizers

__version__ = "0.1.0"

_register_optimizers()
