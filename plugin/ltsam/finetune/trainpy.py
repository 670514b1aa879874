"""``--finetune`` for timm's unmodified train.py (which takes no unknown flag): ``LTSAM_FINETUNE=adaptformer``
and ``LTSAM_FINETUNE_OPTIONS='bottleneck=8 blocks=4'`` (or the ``-c`` YAML keys ``ltsam_finetune`` and
``ltsam_finetune_options``). ``ltsam.timm`` wraps train.py's ``create_model``: the model it returns is prepared
by :func:`ltsam.finetune.prepare_model`, so train.py's optimizer factory (which skips frozen parameters) holds
only the trainable ones. Pretrained weights come from train.py's own ``--pretrained --pretrained-path FILE``,
checked as in :mod:`ltsam.finetune.pretrained` (a file for another model is an error, not a random start).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from ltsam.finetune import MODES, FinetuneOptions, prepare_model
from ltsam.finetune.pretrained import checked_load
from ltsam.trainpy import HOOK_MARKER, parse_options, requested

ENV_FINETUNE, ENV_FINETUNE_OPTIONS = "LTSAM_FINETUNE", "LTSAM_FINETUNE_OPTIONS"
YAML_FINETUNE, YAML_FINETUNE_OPTIONS = "ltsam_finetune", "ltsam_finetune_options"
_FIELDS = {f.name: f.type for f in dataclasses.fields(FinetuneOptions)}


def _option(key: str, value: Any, origin: str) -> Any:
    if key not in _FIELDS:
        raise ValueError(f"ltsam.timm: {origin}: '{key}' is not a fine-tuning option; valid: {', '.join(_FIELDS)}")
    if key == "lora_mlp":
        if str(value).lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"ltsam.timm: {origin}: lora_mlp={value!r} is not true or false")
        return str(value).lower() in ("1", "true")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ltsam.timm: {origin}: {key}={value!r} is not a whole number") from None


def finetune_spec(environ: Mapping[str, str] = os.environ, config: Mapping[str, Any] | None = None
                  ) -> tuple[str, FinetuneOptions] | None:
    """The mode and options asked for by the environment or the ``-c`` YAML; None for train.py's own (full)."""
    asked = requested(environ, config, ENV_FINETUNE, YAML_FINETUNE, MODES, "full", "a fine-tuning mode")
    if asked is None:
        return None
    mode, _, yaml_options = asked
    options = {key: _option(key, value, f"-c YAML key {YAML_FINETUNE_OPTIONS}") for key, value in yaml_options.items()}
    from_environment = parse_options(environ.get(ENV_FINETUNE_OPTIONS, ""), ENV_FINETUNE_OPTIONS, "bottleneck=8")
    options.update({key: _option(key, value, ENV_FINETUNE_OPTIONS) for key, value in from_environment.items()})
    return mode, FinetuneOptions(**options)


def install_finetune(namespace: ModuleType) -> None:
    """Under ``LTSAM_FINETUNE`` (or the YAML key): wrap train.py's ``create_model`` once."""
    spec = finetune_spec()
    create = getattr(namespace, "create_model", None)
    if spec is None or not callable(create) or getattr(create, HOOK_MARKER, False):
        return
    namespace.create_model = wrap_create_model(create, *spec)


def wrap_create_model(original: Callable[..., Any], mode: str, options: FinetuneOptions) -> Callable[..., Any]:
    @functools.wraps(original)
    def create_model(*args: Any, **kwargs: Any) -> Any:
        name = str(kwargs.get("model_name", args[0] if args else "the model"))
        if kwargs.get("pretrained"):
            overlay = kwargs.get("pretrained_cfg_overlay") or {}
            file = overlay.get("file")
            if file and not str(file).endswith(".npz"):  # timm < 1.0.31 kept a ViT tag's JAX loader for any file
                kwargs["pretrained_cfg_overlay"] = {**overlay, "custom_load": False}
            source = f"--pretrained-path '{file}'" if file else "the pretrained weights"
            model = checked_load(original, name, source, *args, **kwargs)
        else:
            model = original(*args, **kwargs)
        trainable = prepare_model(model, mode, options, name=name)
        print(f"ltsam.timm: --finetune {mode} on {name}: {sum(p.numel() for p in trainable):,} trainable of "
              f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
        return model

    setattr(create_model, HOOK_MARKER, True)
    return create_model
