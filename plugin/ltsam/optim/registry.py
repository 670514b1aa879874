"""Records that put the SAM family into timm's optimizer registry, and the public way to add a method.

``register(name, cls)`` is all a new method needs (a :class:`~ltsam.optim.engine.SAMFamily` subclass): after
it, ``timm.optim.create_optimizer_v2(model, opt=name)``, ``timm.optim.list_optimizers()`` and train.py's
``--opt name`` (with the defining module in ``--device-modules``) see it. timm keeps its registry private
(``timm.optim._optim_factory.default_registry``); this module is the one place ltsam touches it.
"""

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


def register(name: str, cls: type, description: str = "") -> OptimInfo:
    """Add a SAM-family method to timm's optimizer registry under ``name`` and return its record.

    ``name`` is lower case without '_' (timm reads ``a_b`` as optimizer b wrapped by a). Registering the same
    class again is harmless (re-imported modules); another class under a taken name is refused.
    """
    from ltsam.optim.engine import SAMFamily

    if not (isinstance(cls, type) and issubclass(cls, SAMFamily)):
        raise TypeError(f"register('{name}', {cls!r}): the class must subclass ltsam.optim.SAMFamily")
    if not name or name != name.lower() or "_" in name:
        raise ValueError(f"register('{name}', ...): use a lower-case name without '_' (timm splits names on '_')")
    if name in default_registry.list_optimizers():
        known = default_registry.get_optimizer_info(name).opt_class
        if known is cls or known == f"{cls.__module__}.{cls.__qualname__}":
            return default_registry.get_optimizer_info(name)
        raise ValueError(f"register('{name}', {cls.__qualname__}): timm already has an optimizer '{name}' ({known}); "
                         "choose another name")
    info = OptimInfo(name=name, opt_class=cls, description=description or (cls.__doc__ or "").strip().split("\n")[0],
                     **_COMMON)
    default_registry.register(info)
    return info


def register_family() -> None:
    """Add ltsam's own methods to timm's default registry (once: importing ltsam twice is harmless)."""
    known = set(default_registry.list_optimizers())
    for info in SAM_FAMILY:
        if info.name not in known:
            default_registry.register(info)
