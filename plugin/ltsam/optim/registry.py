"""Records that put the SAM family into timm's optimizer registry, one per name of ``ltsam_common.names``."""

from __future__ import annotations

from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry

from ltsam_common.names import SAM_METHODS

# every method's signature names eps, betas and momentum (protocol.merged_signature), which the engine hands to
# its base optimizer when the base takes them
_COMMON = dict(has_eps=True, has_betas=True, has_momentum=True, defaults={"base": "sgd"})

# class in ltsam.optim.methods and description, per method name (a name without an entry fails at import)
_METHODS = {
    "sam": ("SAM", "SAM / ASAM (adaptive=True) over any timm base optimizer"),
    "imbsam": ("ImbSAM", "ImbSAM: SAM on tail classes only (needs class_counts)"),
    "ssesam": ("SSESAM", "SSE-SAM: separate head/tail radii, head radius 0 in stage 2 (needs class_counts)"),
    "focalsam": ("FocalSAM", "Focal-SAM: class-weighted sharpness lam*(1-pi_y)^gamma (needs class_counts)"),
}

SAM_FAMILY = tuple(
    OptimInfo(name=name, opt_class=f"ltsam.optim.methods.{_METHODS[name][0]}", description=_METHODS[name][1],
              **_COMMON)
    for name in SAM_METHODS
)


def register() -> None:
    """Add the SAM family to timm's default registry (once: importing ltsam twice is harmless)."""
    known = set(default_registry.list_optimizers())
    for info in SAM_FAMILY:
        if info.name not in known:
            default_registry.register(info)
