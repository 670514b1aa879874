"""Long-tailed data sets held in memory as uint8 arrays: digits-LT, MNIST-LT, CIFAR-10/100-LT.

All use the official CIFAR-LT profile (Cao et al. 2019, as in Zemdalk/SSE-SAM): class ``i`` keeps the FIRST
``int(n_max * (1 / IF) ** (i / (C - 1)))`` training images in source order, no shuffle, so a given
``(IF, n_max)`` names one exact subset. Test sets are left balanced. Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

from ltsam.counts import save_class_counts

SPLITS = ("train", "test")


def lt_profile(num_classes: int, n_max: int, imb_factor: float) -> list[int]:
    """Per-class training counts of the exponential CIFAR-LT profile; ``imb_factor`` = max / min."""
    if num_classes < 2 or n_max < 1 or imb_factor < 1:
        raise ValueError(
            f"need num_classes >= 2, n_max >= 1 and imb_factor >= 1, got {num_classes}, {n_max}, {imb_factor}"
        )
    return [int(n_max * (1.0 / imb_factor) ** (i / (num_classes - 1.0))) for i in range(num_classes)]


def first_per_class(targets: Sequence[int], counts: Sequence[int], origin: str) -> np.ndarray:
    """Indices of the first ``counts[c]`` samples of each class, class by class (official CIFAR-LT order)."""
    targets = np.asarray(targets)
    picked = []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(targets == c)
        if len(idx) < n:
            raise ValueError(
                f"{origin}: class {c} has {len(idx)} images but the long-tailed profile asks for {n}; "
                "lower n_max or the imbalance factor"
            )
        picked.append(idx[:n])
    return np.concatenate(picked)


def count_classes(
    targets: Sequence[int], num_classes: int | None, origin: str, allow_empty: bool = False
) -> tuple[int, list[int]]:
    """``(num_classes, counts)`` after checking every label lies in ``[0, num_classes)``.

    A class with no sample breaks re-balancing and the long-tail losses (log 0), so it is an error
    unless ``allow_empty``.
    """
    y = np.asarray(targets, dtype=np.int64)
    if y.size == 0:
        raise ValueError(f"{origin} has no samples")
    if num_classes is None:
        num_classes = int(y.max()) + 1
    bad = np.flatnonzero((y < 0) | (y >= num_classes))
    if bad.size:
        raise ValueError(
            f"{origin}: sample {bad[0]} has label {y[bad[0]]}, outside [0, {num_classes}) "
            f"({bad.size} such samples)"
        )
    counts = np.bincount(y, minlength=num_classes).tolist()
    empty = [c for c, n in enumerate(counts) if n == 0]
    if empty and not allow_empty:
        raise ValueError(
            f"{origin}: classes {empty[:10]} have no training sample ({len(empty)} in all); "
            "pass allow_empty=True if that is intended"
        )
    return num_classes, counts


class LTArrayDataset(Dataset):
    """Images as a uint8 array (N, H, W) or (N, H, W, 3); items are ``(transform(PIL image), label)``.

    ``class_counts`` are the TRAINING split's per-class counts on every split, so a test set can score
    Many/Medium/Few by itself. ``transform`` is a plain attribute, as timm's ``create_loader`` sets it.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: Sequence[int],
        class_counts: Sequence[int],
        transform=None,
        classes: Sequence[str] | None = None,
        keys: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != len(targets):
            raise ValueError(
                f"images must be uint8 (N, H, W[, 3]) matching {len(targets)} labels, got {images.dtype} "
                f"{images.shape}"
            )
        self.images = images
        self.targets = [int(t) for t in targets]
        self.class_counts = [int(n) for n in class_counts]
        self.num_classes = len(self.class_counts)
        self.classes = list(classes) if classes is not None else [str(c) for c in range(self.num_classes)]
        self.keys = list(keys) if keys is not None else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set as (N, C, H, W) floats in [0, 1] and labels: full-batch training of a tiny CNN."""
        x = torch.from_numpy(self.images).float().div_(255)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous(), torch.tensor(self.targets)

    def save_class_counts(self, path: str | os.PathLike):
        return save_class_counts(self.class_counts, path, classes=self.classes)


def _check_split(split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split == "train"


def _make_lt(
    name: str,
    split: str,
    num_classes: int,
    load,
    imb_factor: float,
    n_max: int,
    transform,
    classes: Sequence[str] | None = None,
) -> LTArrayDataset:
    """``load(counts)``: (images, labels, keys) of the training subset; ``load(None)``: the test set."""
    counts = lt_profile(num_classes, n_max, imb_factor)
    images, labels, keys = load(counts if _check_split(split) else None)
    count_classes(labels, num_classes, f"{name} {split} set")
    return LTArrayDataset(images, labels, counts, transform, classes, keys)


# ---------------------------------------------------------------- digits-LT

DIGITS_IMB_FACTOR = 20
DIGITS_N_MAX = 144
DIGITS_TEST_PER_CLASS = 30


def digits_lt(
    split: str = "train",
    imb_factor: float = DIGITS_IMB_FACTOR,
    n_max: int = DIGITS_N_MAX,
    test_per_class: int = DIGITS_TEST_PER_CLASS,
    seed: int = 0,
    transform=None,
) -> LTArrayDataset:
    """scikit-learn's 1,797 8x8 digits, long-tailed, no download: the default when no data set is named.

    Per class, a seeded shuffle (``seed``) holds out the first ``test_per_class`` images as a balanced test
    set; the training set is the CIFAR-LT profile over the rest. Defaults (IF 20, n_max 144, 30 held out):
    train [144, 103, 74, 53, 38, 27, 19, 14, 10, 7] = 489 images, test 30 per class = 300 images.
    Pixels 0..16 are scaled to uint8 0..255 (round(v * 255 / 16)), one channel.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(np.flatnonzero(digits.target == c)) for c in range(10)}
    test = np.concatenate([order[c][:test_per_class] for c in range(10)])
    rest = np.concatenate([order[c][test_per_class:] for c in range(10)])

    def load(counts):
        idx = (
            test
            if counts is None
            else rest[first_per_class(digits.target[rest], counts, "digits training set")]
        )
        return images[idx], digits.target[idx], [f"digits_{i}" for i in idx]

    return _make_lt("digits-lt", split, 10, load, imb_factor, n_max, transform)


# ---------------------------------------------------------------- MNIST-LT

MNIST_N_MAX = 860


def mnist_lt(
    root: str | os.PathLike,
    split: str = "train",
    imb_factor: float = 100,
    n_max: int | None = None,
    transform=None,
) -> LTArrayDataset:
    """MNIST-LT from ``mnist.npz`` (``train_images``/``train_labels``/``test_images``/``test_labels``).

    ``root`` is the npz or its folder. The profile runs over the npz's training images in file order;
    ``n_max`` defaults to 860 (every class of the shared 10,000-image training file has >= 863), giving
    2,130 images at IF 100. The test set is the official 10,000-image test set.
    """
    path = Path(root)
    path = path / "mnist.npz" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file '{path}' not found; pass root= the folder holding mnist.npz")
    with np.load(path) as data:
        arrays = {k: data[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}

    def load(counts):
        if counts is None:
            return arrays["test_images"], arrays["test_labels"], None
        keep = first_per_class(arrays["train_labels"], counts, f"MNIST training set in '{path}'")
        return arrays["train_images"][keep], arrays["train_labels"][keep], None

    return _make_lt("mnist-lt", split, 10, load, imb_factor, n_max or MNIST_N_MAX, transform)


# ---------------------------------------------------------------- CIFAR-LT (python pickles)

_CIFAR_FILES = {
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
        "cifar-10-python.tar.gz",
    ),
    100: (
        "cifar-100-python",
        ["train"],
        ["test"],
        "fine_labels",
        "meta",
        "fine_label_names",
        "cifar-100-python.tar.gz",
    ),
}


def _read_cifar_pickle(path: Path, archive: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR file '{path}' not found; download {archive} from "
            "https://www.cs.toronto.edu/~kriz/cifar.html "
            f"and extract it inside '{path.parent.parent}' (nothing is downloaded for you)"
        )
    with open(path, "rb") as f:
        try:
            return pickle.load(f, encoding="latin1")
        except Exception as err:
            raise ValueError(f"CIFAR file '{path}' is not a readable CIFAR python pickle: {err}") from err


def _load_cifar_files(folder: Path, files: list[str], label_key: str, archive: str, num_classes: int):
    images, labels = [], []
    for name in files:
        entry = _read_cifar_pickle(folder / name, archive)
        y = np.asarray(entry[label_key], dtype=np.int64)
        count_classes(y, num_classes, f"CIFAR file '{folder / name}'", allow_empty=True)
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def cifar_lt(
    root: str | os.PathLike,
    num_classes: int = 10,
    split: str = "train",
    imb_factor: float = 100,
    n_max: int | None = None,
    transform=None,
) -> LTArrayDataset:
    """CIFAR-10-LT / CIFAR-100-LT from the official python files under ``root``.

    ``root`` holds ``cifar-10-batches-py/`` (data_batch_1..5, test_batch) or ``cifar-100-python/``
    (train, test). Labels: CIFAR's own 0..C-1 (CIFAR-100: fine labels). ``n_max`` defaults to 50000 / C;
    IF 100 keeps 12,406 (CIFAR-10) or 10,847 (CIFAR-100) training images.
    """
    if num_classes not in _CIFAR_FILES:
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    sub, train_files, test_files, label_key, meta_name, names_key, archive = _CIFAR_FILES[num_classes]
    folder = Path(root) / sub
    meta = folder / meta_name
    classes = _read_cifar_pickle(meta, archive)[names_key] if meta.is_file() else None

    def load(counts):
        images, labels = _load_cifar_files(
            folder, test_files if counts is None else train_files, label_key, archive, num_classes
        )
        keep = (
            slice(None)
            if counts is None
            else first_per_class(labels, counts, f"CIFAR training set in '{folder}'")
        )
        return images[keep], labels[keep], None

    return _make_lt(
        f"cifar{num_classes}-lt",
        split,
        num_classes,
        load,
        imb_factor,
        n_max or 50000 // num_classes,
        transform,
        classes,
    )


# ---------------------------------------------------------------- CIFAR-10-LT (shards)

_KEY = re.compile(r"^(?P<split>[a-z]+)_(?P<cls>.+)_(?P<index>\d+)$")


@lru_cache(maxsize=4)
def _read_cifar10_shards(
    folder: str, split: str
) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, tuple[bytes]]:
    """(keys, labels, per-class index, JPEG bytes) of one split, read once per process."""

    meta_path = Path(folder) / "cifar10.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"'{meta_path}' not found; pass root= the folder holding the cifar10 shards")
    meta = json.loads(meta_path.read_text())
    urls = [str(Path(folder) / s["file"]) for s in meta["splits"][split]["shards"]]
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"shards listed in '{meta_path}' are missing: {missing[:3]}")
    keys, labels, index, blobs = [], [], [], []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        match = _KEY.match(sample["__key__"])
        if match is None:
            raise ValueError(
                f"{sample['__url__']}: key {sample['__key__']!r} is not '{{split}}_{{class}}_{{index}}'"
            )
        keys.append(sample["__key__"])
        labels.append(int(sample["cls"]))
        index.append(int(match["index"]))
        blobs.append(sample["jpg"])
    return tuple(keys), np.asarray(labels), np.asarray(index), tuple(blobs)


def _decode(blob: bytes, key: str) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    except Exception as err:
        raise ValueError(f"cifar10 shard sample {key!r}: image does not decode: {err}") from err


def cifar10_lt_shards(
    root: str | os.PathLike,
    split: str = "train",
    imb_factor: float = 100,
    n_max: int | None = None,
    transform=None,
) -> LTArrayDataset:
    """CIFAR-10-LT from the webdataset shards in ``root`` (``cifar10.json`` + tar shards).

    Samples are ordered by their within-class ``index`` (from the key ``{split}_{class}_{index}``), so class
    c keeps the images with index < n_c, the same "first n" as the official profile. Only kept images are
    decoded (JPEG to uint8, once); ``keys`` records each image's shard key.
    """
    folder = Path(root) / "cifar10" if (Path(root) / "cifar10").is_dir() else Path(root)
    keys, labels, index, blobs = _read_cifar10_shards(str(folder), "train" if _check_split(split) else "test")
    classes = json.loads((folder / "cifar10.json").read_text())["classes"]

    def load(counts):
        idx = np.arange(len(keys))
        if counts is not None:
            order = np.lexsort((index, labels))  # class-major, then within-class index: "first n" is defined
            idx = order[first_per_class(labels[order], counts, f"cifar10 training shards in '{folder}'")]
        images = np.stack([_decode(blobs[i], keys[i]) for i in idx])
        return images, labels[idx], [keys[i] for i in idx]

    return _make_lt("cifar10-lt", split, len(classes), load, imb_factor, n_max or 5000, transform, classes)
