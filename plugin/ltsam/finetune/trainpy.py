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
from ltsam.trainpy import HOOK_MARKER, train_py_config

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
    config = train_py_config() if config is None else config
    mode = environ.get(ENV_FINETUNE) or config.get(YAML_FINETUNE)
    if not mode or mode == "full":
        return None
    origin = ENV_FINETUNE if environ.get(ENV_FINETUNE) else f"-c YAML key {YAML_FINETUNE}"
    if mode not in MODES:
        raise ValueError(f"ltsam.timm: {origin}={mode!r} is not a fine-tuning mode; choose one of {', '.join(MODES)}")
    options = {}
    yaml_options = config.get(YAML_FINETUNE_OPTIONS) or {}
    if not isinstance(yaml_options, Mapping):
        raise ValueError(f"ltsam.timm: -c YAML key {YAML_FINETUNE_OPTIONS} must be a mapping such as "
                         f"{{bottleneck: 8}}, got {yaml_options!r}")
    for key, value in yaml_options.items():
        options[key] = _option(key, value, f"-c YAML key {YAML_FINETUNE_OPTIONS}")
    for item in environ.get(ENV_FINETUNE_OPTIONS, "").replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"ltsam.timm: {ENV_FINETUNE_OPTIONS}: '{item}' is not key=value (e.g. 'bottleneck=8')")
        options[key] = _option(key, value, ENV_FINETUNE_OPTIONS)
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
            file = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
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
