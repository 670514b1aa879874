"""``create_lt_dataset``: one entry point from a data-set name to a long-tailed data set."""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from ltsam.data import files, lt

LT_DATASETS = (
    "digits-lt",
    "mnist-lt",
    "cifar10-lt",
    "cifar100-lt",
    "imagenet-lt",
    "inat2018",
    "folder",
    "list",
)
DEFAULT_DATASET = "digits-lt"


def _cifar10(root: Path, **kw) -> lt.LTArrayDataset:
    # the shared webdataset shards when present, else the official python pickles
    if (root / "cifar10.json").is_file() or (root / "cifar10" / "cifar10.json").is_file():
        return lt.cifar10_lt_shards(root, **kw)
    return lt.cifar_lt(root, 10, **kw)


def create_lt_dataset(
    name: str = DEFAULT_DATASET,
    root: str | os.PathLike | None = None,
    split: str = "train",
    imb_factor: float | None = None,
    n_max: int | None = None,
    transform=None,
    **kwargs,
) -> Dataset:
    """Build a long-tailed data set by name; every one has ``targets``, ``class_counts``, ``num_classes``.

    ``digits-lt`` (embedded, ``root`` unused), ``mnist-lt`` (``root``: folder of mnist.npz),
    ``cifar10-lt`` (``root``: the webdataset shards folder with cifar10.json, or the folder holding
    ``cifar-10-batches-py``), ``cifar100-lt`` (folder holding ``cifar-100-python``), ``imagenet-lt``
    (image root; ``list_dir=`` for the ImageNet_LT_*.txt files), ``inat2018`` (image root; ``json_dir=``),
    ``folder`` (ImageFolder), ``list`` (``list_file=``, optional ``train_list=``). ``imb_factor`` (max / min)
    and ``n_max`` shape the array sets (defaults: 20 and 144 for digits-lt, 100 elsewhere); the file sets
    are long-tailed as published. Other keywords go to the builder (``seed``, ``allow_empty``, ...).
    """
    key = name.lower()
    if key not in LT_DATASETS:
        raise ValueError(f"unknown long-tailed data set {name!r}; valid names: {', '.join(LT_DATASETS)}")
    profile = {"imb_factor": imb_factor} if imb_factor is not None else {}
    if key == "digits-lt":
        return lt.digits_lt(split, n_max=n_max or lt.DIGITS_N_MAX, transform=transform, **profile, **kwargs)
    if root is None:
        raise ValueError(f"data set {name!r} needs root= the folder that holds its files")
    root = Path(root)
    array_kw = dict(split=split, n_max=n_max, transform=transform, **profile, **kwargs)
    if key == "mnist-lt":
        return lt.mnist_lt(root, **array_kw)
    if key == "cifar10-lt":
        return _cifar10(root, **array_kw)
    if key == "cifar100-lt":
        return lt.cifar_lt(root, 100, **array_kw)
    if n_max is not None or imb_factor is not None:
        raise ValueError(f"{name!r} is long-tailed as published; imb_factor and n_max do not apply")
    if key == "imagenet-lt":
        return files.imagenet_lt(root, split, transform=transform, **kwargs)
    if key == "inat2018":
        return files.inat2018(root, split, transform=transform, **kwargs)
    if key == "folder":
        return files.image_folder(root, split, transform=transform, **kwargs)
    if "list_file" not in kwargs:
        raise ValueError("data set 'list' needs list_file= a 'path label' file (paths relative to root)")
    return files.image_list(kwargs.pop("list_file"), root, transform=transform, **kwargs)
