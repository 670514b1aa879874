"""The one list of each kind of name: SAM-family methods, long-tail losses, class-aware samplers,
fine-tuning modes.

The optimizer registry, the engine, the trainer's flags, the losses, the samplers, the launcher's checks,
``tools/reproduce.py`` and the tests all read these tuples, so a new method or loss is added in one place
(plus its implementation). No torch here: see ``ltsam_common``.
"""

from __future__ import annotations

SAM_METHODS = ("sam", "imbsam", "ssesam", "focalsam")  # timm optimizer names (no '_': timm splits on it)
LOSSES = ("ce", "ldam", "la", "vs", "bsce")  # ltsam.losses.create_loss / --loss
SAMPLERS = ("balanced", "sqrt", "progressive", "repeat")  # ltsam.data.samplers.create_sampler / --sampler
# ltsam.finetune.prepare_model / --finetune / LTSAM_FINETUNE
FINETUNE_MODES = ("full", "classifier", "bias", "ln", "vpt-shallow", "vpt-deep", "adapter", "adaptformer", "lora",
                  "ssf")


def sam_method(opt: str) -> str | None:
    """The SAM-family method an ``--opt`` value selects, by timm's rule (lower case, the part after the last
    '_', so ``lookahead_ssesam`` is ``ssesam``), or None for any other optimizer."""
    name = str(opt).lower().split("_")[-1]
    return name if name in SAM_METHODS else None
