"""Records that put the SAM family into timm's optimizer registry (names without '_': timm splits on it)."""

from __future__ import annotations

from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry

# eps, betas and momentum all reach the wrapper, which hands them to the base optimizer's own timm record
_COMMON = dict(has_eps=True, has_betas=True, has_momentum=True, defaults={"base": "sgd"})

SAM_FAMILY = (
    OptimInfo(name="sam", opt_class="ltsam.optim.methods.SAM",
              description="SAM / ASAM (adaptive=True) over any timm base optimizer", **_COMMON),
    OptimInfo(name="imbsam", opt_class="ltsam.optim.methods.ImbSAM",
              description="ImbSAM: SAM on tail classes only (needs class_counts)", **_COMMON),
    OptimInfo(name="ssesam", opt_class="ltsam.optim.methods.SSESAM",
              description="SSE-SAM: separate head/tail radii, head radius 0 in stage 2 (needs class_counts)",
              **_COMMON),
    OptimInfo(name="focalsam", opt_class="ltsam.optim.methods.FocalSAM",
              description="Focal-SAM: class-weighted sharpness lam*(1-pi_y)^gamma (needs class_counts)", **_COMMON),
)


def register() -> None:
    """Add the SAM family to timm's default registry (once: importing ltsam twice is harmless)."""
    known = set(default_registry.list_optimizers())
    for info in SAM_FAMILY:
        if info.name not in known:
            default_registry.register(info)
