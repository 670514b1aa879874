"""timm's own train.py as ltsam sees it: class-aware sampling from the environment, counts checks, start-up guard.

train.py accepts no unknown flags, so what ``--device-modules ltsam.timm`` adds is configured outside its CLI:

* ``LTSAM_SAMPLER`` = ``balanced`` | ``sqrt`` | ``progressive`` | ``repeat``, and ``LTSAM_SAMPLER_OPTIONS``
  (``"num_samples=4000 seed=0 epochs=90 threshold=0.001"``, space- or comma-separated), or the same as keys
  ``ltsam_sampler`` / ``ltsam_sampler_options`` (a mapping) in train.py's ``-c`` YAML; the environment wins.
  The training loader is rebuilt around :func:`ltsam.data.samplers.create_sampler` (DDP-aware, seeded by
  train.py's ``--seed`` unless ``seed=`` is given, epochs of ``progressive`` = the scheduled total); a ``wds/``
  training set is read by :class:`ltsam.data.stream.ClassAwareReaderWds`, which re-balances the stream on the
  ``.cls`` label before decoding (shards whose ``_info.json`` carries class counts, as ltsam's writer gives).
* ``LTSAM_CLASS_COUNTS=/abs/counts.json``: the counts file of a SAM-family optimizer. Any path works here,
  while ``--opt-kwargs class_counts=/abs/counts.json`` dies in the option parser of timm < 1.0.30
  (``ast.literal_eval`` raises SyntaxError on a leading ``/`` or ``.``, and only ValueError is caught).

Labels come from the data set timm built without decoding an image: ImageFolder / tar readers' ``samples``,
torchvision data sets' ``targets``, the class counts of ltsam's shards. Counts are checked against them (and
against class names stored in the counts file) before the first batch; where the labels are not visible,
every batch's labels are checked against the number of classes in the counts file.

``import ltsam`` (also ``--device-modules ltsam``) calls :func:`guard_train_py`, so that a SAM-family
``--opt`` or ``LTSAM_SAMPLER`` without the hook stops at start-up with the fix instead of failing later.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import logging
import os
import sys
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch.distributed as dist
from torch.utils.data import IterableDataset

from ltsam.data.samplers import SAMPLERS, ClassAwareSampler, create_lt_loader, create_sampler

_logger = logging.getLogger(__name__)

HOOK_MARKER = "_ltsam_hooked"  # set on train.py's train_one_epoch once ltsam.timm wrapped it
ENV_SAMPLER = "LTSAM_SAMPLER"
ENV_SAMPLER_OPTIONS = "LTSAM_SAMPLER_OPTIONS"
ENV_CLASS_COUNTS = "LTSAM_CLASS_COUNTS"
YAML_SAMPLER, YAML_SAMPLER_OPTIONS = "ltsam_sampler", "ltsam_sampler_options"
ADD_HOOK = "add --device-modules ltsam.timm"
COUNTS_ORDER = "counts follow ImageFolder's sorted class-folder order (class_to_idx)"

_SAMPLER_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # sampler -> its SamplerSpec
_COUNTS_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its class_counts
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # optimizers whose counts were checked against the data


@dataclass(frozen=True)
class SamplerSpec:
    """One class-aware sampler as asked for in the environment / YAML; None fields follow train.py."""

    name: str
    num_samples: int | None = None  # draws per epoch over all ranks (default: the data set's size)
    seed: int | None = None  # default: train.py's --seed
    epochs: int | None = None  # progressive: default the scheduled total (epochs + cooldown)
    threshold: float | None = None  # repeat: LVIS threshold

    def sampler_kwargs(self) -> dict[str, Any]:
        if self.name == "repeat":
            return {} if self.threshold is None else {"threshold": self.threshold}
        return {} if self.num_samples is None else {"num_samples": self.num_samples}


_OPTION_TYPES = {f.name: (float if f.name == "threshold" else int) for f in fields(SamplerSpec) if f.name != "name"}
_OPTION_OWNERS = {"threshold": ("repeat",), "epochs": ("progressive",), "num_samples": ("balanced", "sqrt",
                                                                                       "progressive")}


def train_py_config() -> dict[str, Any]:
    """The YAML of train.py's ``-c/--config`` (read the way train.py reads it), or {}."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-c", "--config", default="")
    known, _ = parser.parse_known_args(sys.argv[1:])
    if not known.config:
        return {}
    import yaml

    with open(known.config) as f:
        return yaml.safe_load(f) or {}


def parse_options(text: str, origin: str, example: str) -> dict[str, str]:
    """``"num_samples=4000 seed=0"`` (spaces or commas) -> {"num_samples": "4000", "seed": "0"}."""
    options = {}
    for item in text.replace(",", " ").split():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"ltsam.timm: {origin}: '{item}' is not key=value (e.g. {origin}='{example}')")
        options[key] = value
    return options


def requested(environ: Mapping[str, str], config: Mapping[str, Any] | None, env_key: str, yaml_key: str,
              choices: Sequence[str], default: str, what: str) -> tuple[str, str, Mapping[str, Any]] | None:
    """What train.py's environment (``env_key``) or ``-c`` YAML (``yaml_key``) asks for: (name, where it was
    asked, the YAML's ``<yaml_key>_options`` mapping); None for train.py's own ``default``."""
    config = train_py_config() if config is None else config
    name = environ.get(env_key) or config.get(yaml_key)
    if not name or name == default:
        return None
    origin = env_key if environ.get(env_key) else f"-c YAML key {yaml_key}"
    if name not in choices:
        raise ValueError(f"ltsam.timm: {origin}={name!r} is not {what}; choose one of {', '.join(choices)}")
    yaml_options = config.get(f"{yaml_key}_options") or {}
    if not isinstance(yaml_options, Mapping):
        raise ValueError(f"ltsam.timm: -c YAML key {yaml_key}_options must be a mapping such as "
                         f"{{key: value}}, got {yaml_options!r}")
    return name, origin, yaml_options


def sampler_spec(environ: Mapping[str, str] = os.environ, config: Mapping[str, Any] | None = None
                 ) -> SamplerSpec | None:
    """The sampler asked for by ``LTSAM_SAMPLER`` (+ options) or the ``-c`` YAML keys; None for timm's own."""
    asked = requested(environ, config, ENV_SAMPLER, YAML_SAMPLER, SAMPLERS, "instance", "a sampler")
    if asked is None:
        return None
    name, _, yaml_options = asked
    options = {**yaml_options, **parse_options(environ.get(ENV_SAMPLER_OPTIONS, ""), ENV_SAMPLER_OPTIONS,
                                               "num_samples=4000")}
    spec = SamplerSpec(name)
    for key, value in options.items():
        if key not in _OPTION_TYPES or (key in _OPTION_OWNERS and name not in _OPTION_OWNERS[key]):
            valid = [k for k in _OPTION_TYPES if name in _OPTION_OWNERS.get(k, (name,))]
            raise ValueError(f"ltsam.timm: sampler option '{key}' does not apply to {name}; valid: {', '.join(valid)} "
                             f"({ENV_SAMPLER_OPTIONS} or {YAML_SAMPLER_OPTIONS})")
        try:
            spec = replace(spec, **{key: _OPTION_TYPES[key](value)})
        except ValueError as err:
            raise ValueError(f"ltsam.timm: sampler option {key}={value!r} is not a number") from err
    return spec


# -- what the data set tells about its classes, without decoding an image ------------------------------------


@dataclass(frozen=True)
class DatasetClasses:
    labels: np.ndarray | None  # one label per sample (map-style data sets)
    names: list[str] | None  # class names by index (ImageFolder's sorted folders, torchvision's classes)
    where: str  # how to name the data set in a message
    counts: list[int] | None = None  # per-class counts where the labels are not listed (shards' _info.json)


def dataset_classes(dataset: Any) -> DatasetClasses:
    """Labels and class names of the data set timm built (ImageDataset readers, torchvision data sets)."""
    dataset = getattr(dataset, "dataset", dataset) if type(dataset).__name__ == "AugMixDataset" else dataset
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if isinstance(samples, list):
        labels = np.fromiter((target for _, target in samples), dtype=np.int64, count=len(samples))
        class_to_idx = getattr(reader, "class_to_idx", None)
        names = None
        if isinstance(class_to_idx, dict) and sorted(class_to_idx.values()) == list(range(len(class_to_idx))):
            names = [str(n) for n, _ in sorted(class_to_idx.items(), key=lambda item: item[1])]
        return DatasetClasses(labels, names, f"the training folder '{getattr(reader, 'root', '?')}'")
    targets = getattr(dataset, "targets", None)
    if targets is not None and not isinstance(dataset, IterableDataset):
        classes = getattr(dataset, "classes", None)
        return DatasetClasses(np.asarray(targets, dtype=np.int64), list(map(str, classes)) if classes else None,
                              f"the {type(dataset).__name__} training set")
    layout = getattr(reader, "layout", None)  # ltsam.data.stream.ClassAwareReaderWds
    if layout is not None:
        return DatasetClasses(None, None, f"the shards '{layout.root}' (split {layout.split})",
                              list(layout.class_counts))
    return DatasetClasses(None, None, f"the {type(dataset).__name__} training set")


# -- the sampler in train.py's training loader -----------------------------------------------------------------


def install_sampling(namespace: ModuleType) -> None:
    """Under ``LTSAM_SAMPLER`` (or the YAML key): train.py's data factories build class-aware training data."""
    spec = sampler_spec()
    if spec is None:
        return
    if callable(getattr(namespace, "create_dataset", None)):
        namespace.create_dataset = wrap_create_dataset(namespace.create_dataset, spec)
    if callable(getattr(namespace, "create_loader", None)):
        namespace.create_loader = wrap_create_loader(namespace.create_loader, spec)


def wrap_create_loader(original: Callable[..., Any], spec: SamplerSpec) -> Callable[..., Any]:
    """train.py's ``create_loader`` with ``spec``'s sampler in the training loader (evaluation untouched)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_loader(*args: Any, **kwargs: Any) -> Any:
        arguments = signature.bind(*args, **kwargs).arguments
        if not arguments.get("is_training"):
            return original(*args, **kwargs)
        dataset = arguments["dataset"]
        if getattr(dataset, "reader", None) in _SAMPLER_SPECS:  # a class-aware wds/ stream: it samples itself
            return original(*args, **kwargs)
        if isinstance(dataset, IterableDataset):
            raise ValueError(f"ltsam.timm: {ENV_SAMPLER}={spec.name}: the training set is a stream "
                             f"({type(dataset).__name__}), which no index sampler can re-balance; use a folder "
                             "data set or --dataset wds/ shards")
        labels = dataset_classes(dataset).labels
        if labels is None:
            raise ValueError(f"ltsam.timm: {ENV_SAMPLER}={spec.name}: {type(dataset).__name__} shows no labels "
                             "without decoding (no reader.samples, no targets); use an image folder or a "
                             "torchvision data set (--dataset torch/...)")
        if arguments.get("num_aug_repeats"):
            raise ValueError(f"ltsam.timm: {ENV_SAMPLER}={spec.name} replaces timm's sampler: drop --aug-repeats")
        sampler = create_sampler(spec.name, labels, epochs=spec.epochs or 1, seed=spec.seed or 0,
                                 **spec.sampler_kwargs())
        _SAMPLER_SPECS[sampler] = spec
        if not dist.is_initialized() or dist.get_rank() == 0:
            _logger.info(f"ltsam.timm: {spec.name} sampler over {len(labels)} images of "
                         f"{len(sampler.class_counts)} classes: {len(sampler)} draws per rank per epoch "
                         f"({sampler.num_replicas} rank(s))")
        return create_lt_loader(*args, sampler=sampler, **kwargs)

    return create_loader


def wrap_create_dataset(original: Callable[..., Any], spec: SamplerSpec) -> Callable[..., Any]:
    """train.py's ``create_dataset`` with a class-aware ``wds/`` training stream (everything else untouched)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_dataset(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = {**bound.arguments.pop("kwargs", {}), **bound.arguments}
        if not arguments.get("is_training") or not str(arguments["name"]).startswith("wds/"):
            return original(*args, **kwargs)
        from timm.data import IterableImageDataset
        from timm.data.readers.reader_wds import ReaderWds

        from ltsam.data.balance import MODES
        from ltsam.data.stream import ClassAwareReaderWds

        if spec.name not in MODES:
            raise ValueError(f"ltsam.timm: {ENV_SAMPLER}={spec.name} draws by index; a wds/ stream is re-balanced "
                             f"with one of {', '.join(m for m in MODES if m != 'instance')}")
        accepted = set(inspect.signature(ReaderWds.__init__).parameters) - {"self", "root", "split", "is_training"}
        options = {k: v for k, v in arguments.items() if k in accepted and v is not None}
        options["name"] = str(arguments["name"]).split("/", 1)[1]
        options.update({k: v for k, v in (("num_samples", spec.num_samples), ("seed", spec.seed)) if v is not None})
        try:
            reader = ClassAwareReaderWds(arguments["root"], arguments["split"], mode=spec.name,
                                         num_epochs=spec.epochs or 1, **options)
        except (FileNotFoundError, KeyError) as err:
            raise ValueError(f"ltsam.timm: {ENV_SAMPLER}={spec.name} with --dataset {arguments['name']}: {err}; the "
                             "class-aware stream needs the shards' _info.json with class counts (`python -m "
                             "ltsam.data.shards write` writes them)") from err
        _SAMPLER_SPECS[reader] = spec
        return IterableImageDataset(arguments["root"], reader=reader, split=arguments["split"], is_training=True)

    return create_dataset


def scheduled_epochs(arguments: Mapping[str, Any]) -> int:
    """The epochs train.py will run: its scheduler's total (``--epochs`` + ``--cooldown-epochs`` [+ warmup])."""
    args = arguments["args"]
    total = arguments.get("num_updates_total")
    if total:  # train.py passes num_epochs * updates_per_epoch, num_epochs being create_scheduler_v2's
        accum = max(1, getattr(args, "grad_accum_steps", 1))
        return int(total) // -(-len(arguments["loader"]) // accum)
    warmup = args.warmup_epochs if getattr(args, "warmup_prefix", False) else 0
    return args.epochs + getattr(args, "cooldown_epochs", 0) + warmup


def prepare_epoch(arguments: Mapping[str, Any]) -> None:
    """Before each epoch: the ltsam sampler gets train.py's seed, the scheduled total and the epoch."""
    loader = arguments["loader"]
    reader = getattr(getattr(loader, "dataset", None), "reader", None)
    if reader is not None and reader in _SAMPLER_SPECS:  # wds/: train.py sets the stream's epoch itself
        if _SAMPLER_SPECS[reader].epochs is None:
            reader.class_num_epochs = scheduled_epochs(arguments)
        return
    sampler = getattr(loader, "sampler", None)
    spec = _SAMPLER_SPECS.get(sampler) if sampler is not None else None
    if spec is None:
        return
    if spec.seed is None:
        sampler.seed = arguments["args"].seed  # the same on every rank: one stream, dealt out by rank
    if spec.epochs is None and isinstance(sampler, ClassAwareSampler):
        sampler.epochs = scheduled_epochs(arguments)
    sampler.set_epoch(arguments["epoch"])  # train.py <= 1.0.28 calls set_epoch only when distributed


# -- class counts of the SAM-family optimizers -----------------------------------------------------------------


def counts_source(optimizer: Any) -> str:
    """How to name the optimizer's counts in a message: the file, else the list."""
    source = _COUNTS_SOURCES.get(optimizer)
    return f"the counts file '{source}'" if isinstance(source, (str, os.PathLike)) else "class_counts"


def check_counts(optimizer: Any, dataset: Any) -> None:
    """Once per optimizer, before the first batch: its class counts must be the training set's, in its order."""
    counts = getattr(optimizer, "class_counts", None)
    if counts is None or optimizer in _CHECKED:
        return
    _CHECKED.add(optimizer)
    source = _COUNTS_SOURCES.get(optimizer)
    what = counts_source(optimizer)
    data = dataset_classes(dataset)
    stored_names = _stored_class_names(source)
    if stored_names is not None and data.names is not None and stored_names != data.names:
        position = next((i for i, (a, b) in enumerate(zip(stored_names, data.names)) if a != b),
                        min(len(stored_names), len(data.names)))
        raise ValueError(
            f"ltsam.timm: {what} lists {len(stored_names)} classes that do not match the {len(data.names)} of "
            f"{data.where}: class {position} is {_at(stored_names, position)} in the file but "
            f"{_at(data.names, position)} in the data; {COUNTS_ORDER}: rewrite it from this data set")
    num_classes = len(data.names) if data.names is not None else None
    if data.labels is not None:
        num_classes = max(num_classes or 0, int(data.labels.max()) + 1)
    if data.counts is not None:
        num_classes = len(data.counts)
    if num_classes is not None and num_classes != len(counts):
        raise ValueError(
            f"ltsam.timm: {what} has {len(counts)} classes but {data.where} has {num_classes}; one count per "
            f"class is needed, and {COUNTS_ORDER}")
    actual = np.bincount(data.labels, minlength=len(counts)) if data.labels is not None else data.counts
    if actual is not None:
        actual = np.asarray(actual)
        wrong = np.flatnonzero(actual != np.asarray(counts))
        if wrong.size:
            c = int(wrong[0])
            name = f" ('{data.names[c]}')" if data.names else ""
            raise ValueError(
                f"ltsam.timm: {what} says class {c}{name} has {counts[c]} training images, but {data.where} "
                f"has {int(actual[c])} ({wrong.size} class(es) differ); {COUNTS_ORDER}: write the counts of this "
                "training set, e.g. ltsam.counts.save_class_counts(counts, path, class_names=names)")


def check_batch_labels(optimizer: Any, target: Any) -> None:
    """Where the data set shows no labels up front: a batch label beyond the counts names the counts file."""
    counts = getattr(optimizer, "class_counts", None)
    if counts is None or target.dtype.is_floating_point or target.numel() == 0:
        return
    top = int(target.max())
    if top >= len(counts):
        raise ValueError(f"ltsam.timm: a batch holds label {top}, but {counts_source(optimizer)} has only "
                         f"{len(counts)} classes; {COUNTS_ORDER}: write one count per class of the training set")


def _stored_class_names(source: Any) -> list[str] | None:
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return None
    try:
        data = json.loads(Path(source).read_text())
    except json.JSONDecodeError:
        return None  # load_class_counts already reported it
    names = data.get("class_names") if isinstance(data, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _at(names: list[str], position: int) -> str:
    return f"'{names[position]}'" if position < len(names) else "missing"


# -- the optimizer factory as train.py calls it ------------------------------------------------------------------


def is_train_py(module: ModuleType | None) -> bool:
    """A module that looks like timm's train.py: its argument parsing, train_one_epoch and optimizer factory."""
    return module is not None and all(callable(getattr(module, name, None)) for name in (
        "_parse_args", "train_one_epoch", "create_optimizer_v2")) and hasattr(module, "config_parser")


def guard_train_py(namespace: ModuleType | None) -> None:
    """In train.py: wrap its ``create_optimizer_v2`` so wrong starts stop with the fix (once)."""
    if not is_train_py(namespace) or getattr(namespace.create_optimizer_v2, HOOK_MARKER, False):
        return
    namespace.create_optimizer_v2 = _wrap_create_optimizer(namespace.create_optimizer_v2, namespace)


def _wrap_create_optimizer(original: Callable[..., Any], namespace: ModuleType) -> Callable[..., Any]:
    from ltsam.optim import SAM_FAMILY

    names = {info.name for info in SAM_FAMILY}

    @functools.wraps(original)
    def create_optimizer_v2(*args: Any, **kwargs: Any) -> Any:
        opt = str(kwargs.get("opt", args[1] if len(args) > 1 else "sgd"))
        name = opt.lower().split("_")[-1]
        hooked = getattr(namespace.train_one_epoch, HOOK_MARKER, False)
        if not hooked and (name in names or sampler_spec() is not None):
            what = f"--opt {opt}" if name in names else f"{ENV_SAMPLER}"
            raise ValueError(
                f"ltsam: {what} in timm's train.py needs ltsam's hook into its training loop: {ADD_HOOK} "
                "(`ltsam` alone only registers the optimizers, and train.py's optimizer.step() passes no "
                "closure to take a SAM step with)")
        counts = os.environ.get(ENV_CLASS_COUNTS)
        if counts and name in names and name != "sam":
            given = kwargs.get("class_counts")
            if given is not None and str(given) != counts:
                raise ValueError(f"ltsam.timm: class_counts={given!r} in --opt-kwargs and {ENV_CLASS_COUNTS}="
                                 f"{counts!r} disagree; keep one")
            kwargs["class_counts"] = counts
        optimizer = original(*args, **kwargs)
        if kwargs.get("class_counts") is not None:
            _COUNTS_SOURCES[optimizer] = kwargs["class_counts"]
        return optimizer

    setattr(create_optimizer_v2, HOOK_MARKER, True)
    return create_optimizer_v2

