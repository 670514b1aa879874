"""SAM-family optimizers for timm: one engine, four methods, registered by name."""

from ltsam.optim.engine import Group, PassPlan, SAMFamily
from ltsam.optim.methods import SAM, SSESAM, ClassAware, FocalSAM, ImbSAM
from ltsam.optim.protocol import unwrap
from ltsam.optim.registry import SAM_FAMILY, register, register_family

__all__ = ["SAM", "SSESAM", "ClassAware", "FocalSAM", "Group", "ImbSAM", "PassPlan", "SAMFamily", "SAM_FAMILY",
           "register", "register_family", "unwrap"]
