"""Pretrained backbones through timm's own pretrained-config mechanism, with a check timm does not make.

``--pretrained-path FILE`` is timm's ``pretrained_cfg_overlay=dict(file=FILE)`` (as train.py's flag of that
name): timm loads the file with the model's own checkpoint filter (CLIP's OpenAI layout, position-embedding
resampling). When the classifier is replaced, timm loads non-strictly and only logs the keys it did not find,
so a file for another model would train from random weights without a word; here every missing weight other
than the classifier's is an error naming the file and the model.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from timm.models import create_model
from torch import nn

_logger = logging.getLogger("ltsam.finetune")
_MISSING = re.compile(r"Missing keys \((.*)\) discovered while loading pretrained weights")


class PretrainedError(ValueError):
    """Pretrained weights that do not fit the model, in one sentence."""


class _MissingKeys(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = _MISSING.search(record.getMessage())
        if found:
            self.keys += [k.strip() for k in found.group(1).split(",") if k.strip()]


@contextmanager
def _missing_keys() -> Iterator[_MissingKeys]:
    logger = logging.getLogger("timm.models._builder")
    handler, level = _MissingKeys(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def create_backbone(name: str, pretrained: bool = False, pretrained_path: str | None = None,
                    **kwargs) -> nn.Module:
    """``timm.create_model`` with hub weights (``pretrained``) or a local file (``pretrained_path``, which
    implies ``pretrained``); refuses a weights file that leaves any non-classifier weight of ``name`` unset."""
    if pretrained_path:
        if not Path(pretrained_path).is_file():
            raise PretrainedError(f"--pretrained-path '{pretrained_path}' does not exist")
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": pretrained_path}
        pretrained = True
    if not pretrained:
        return create_model(name, **kwargs)
    source = f"--pretrained-path '{pretrained_path}'" if pretrained_path else "the pretrained weights"
    model = checked_load(create_model, name, source, name, pretrained=True, **kwargs)
    notes = model.pretrained_cfg.get("notes") or ()
    if notes:  # e.g. OpenAI's CLIP weights under a GELU tower: "natively QuickGELU, use quickgelu model variant"
        _logger.warning("ltsam: timm's note on the weights of %s: %s", name, "; ".join(notes))
    return model


def checked_load(create: Callable[..., nn.Module], name: str, source: str, *args, **kwargs) -> nn.Module:
    """``create(*args, **kwargs)`` (timm's ``create_model`` or train.py's), refusing pretrained weights that
    leave a non-classifier weight of model ``name`` unset; ``source`` names the weights in the error."""
    with _missing_keys() as missing:
        try:
            model = create(*args, **kwargs)
        except RuntimeError as err:  # strict load (same classes) or a stem that cannot be adapted
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0])[:200] if lines else type(err).__name__
            raise PretrainedError(f"{source}: not weights of model '{name}' ({detail})") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    backbone_missing = [k for k in missing.keys if not k.startswith(tuple(c + "." for c in classifier))]
    if backbone_missing:
        raise PretrainedError(f"{source}: not weights of model '{name}' ({len(backbone_missing)} of its weights "
                              f"are missing, e.g. '{backbone_missing[0]}'); pass the file made for '{name}' or "
                              "the matching --model")
    return model
