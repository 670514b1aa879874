"""What ltsam needs of timm beyond setup.cfg's ``timm>=`` floor, in one table, and the check that reads it.

The floor is the oldest timm with everything ``import ltsam`` needs: the optimizers (timm's optimizer registry)
and the train.py hook ``ltsam.timm`` (tests/test_timm_floor.py keeps it true; CI runs at the floor and at the
newest timm). Features that need a newer timm are listed in ``NEWER_TIMM`` and check it when they start, so an
older timm stops them with one sentence naming the release to install instead of an ImportError mid-run.
"""

from __future__ import annotations

import importlib

import timm

# timm name (module:attribute path) -> (first timm release with it, the ltsam feature that needs it, what for)
NEWER_TIMM: dict[str, tuple[str, str, str]] = {
    "timm.utils.summary:trim_summary": ("1.0.31", "ltsam train", "a resumed run's summary.csv"),
    "timm.utils:CheckpointSaver.state_dict": (
        "1.0.31", "ltsam train", "the checkpoint saver's ranking, kept in each checkpoint for an exact resume"),
}


def has(name: str) -> bool:
    """Whether the installed timm has ``name`` (``module:attr.attr``)."""
    module, attrs = name.split(":")
    try:
        obj = importlib.import_module(module)
    except ImportError:
        return False
    for attr in attrs.split("."):
        if not hasattr(obj, attr):
            return False
        obj = getattr(obj, attr)
    return True


def unmet(feature: str) -> str | None:
    """The sentence that stops ``feature`` on the installed timm, or None when it has every name it needs."""
    missing = {name: (release, why) for name, (release, user, why) in NEWER_TIMM.items()
               if user == feature and not has(name)}
    if not missing:
        return None
    release = max((r for r, _ in missing.values()), key=lambda r: tuple(int(p) for p in r.split(".")))
    names = "; ".join(f"{name.replace(':', '.')}, for {why}" for name, (_, why) in missing.items())
    return (f"{feature} needs timm>={release} ({names}), but timm {timm.__version__} is installed: "
            f"pip install -U 'timm>={release}'")
