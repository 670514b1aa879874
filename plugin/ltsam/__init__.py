"""ltsam: long-tailed classification with sharpness-aware optimizers, as a timm plugin.

Importing the package registers ``sam``, ``imbsam``, ``ssesam`` and ``focalsam`` in timm's optimizer
registry, so ``timm.optim.create_optimizer_v2(model, opt="ssesam", ...)`` works.
"""

import sys as _sys

from ltsam import models as models  # registers the CIFAR / digits models in timm
from ltsam.optim.registry import register_family as _register_optimizers
from ltsam.trainpy import guard_train_py as _guard_train_py

__version__ = "0.1.0"

_register_optimizers()
_guard_train_py(_sys.modules.get("__main__"))  # in timm's train.py: a SAM --opt without the hook names the fix
