"""SAM-family optimizers for timm: one engine, four methods, registered by name."""

from ltsam.optim.engine import Group, SAMFamily
from ltsam.optim.methods import SAM, SSESAM, FocalSAM, ImbSAM
from ltsam.optim.registry import SAM_FAMILY, register

__all__ = ["SAM", "SSESAM", "FocalSAM", "Group", "ImbSAM", "SAMFamily", "SAM_FAMILY", "register"]
